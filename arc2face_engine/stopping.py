"""What the engine needs to know about a command being stopped (SIGINT, SIGTERM).

The orchestration side (flows/interrupts.py) owns the signals; the engine only marks
what must not be cut in the middle and what must be undone:

- `critical()`: a few steps in the main thread that must run to their end once started
  (an export's final rename, the audit report's two files). A stop that arrives inside
  waits for the end of the outermost one.
- `undo_on_stop(callback)`: something to remove if the command is stopped while the
  block runs (an export's staging folder); `run_undo()` runs them, newest first.

Plain Python, no signal handling here: importing this module changes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# `_depth` and `_deferred` are only touched by the main thread (where signal handlers run
# too), so they need no lock; `_undo` is shared with the thread that stops the process.
_depth = 0
_deferred: Callable[[], None] | None = None
_undo_lock = threading.Lock()
_undo: dict[int, Callable[[], None]] = {}
_next_key = 0
UNDO_LOCK_TIMEOUT_S = 1.0


@contextmanager
def critical() -> Iterator[None]:
    """Run the block to its end even if a stop arrives meanwhile (see `defer_or_run`)."""
    global _depth, _deferred
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are handled in the main thread only: nothing to defer elsewhere
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        action, _deferred = (_deferred, None) if _depth == 0 else (None, _deferred)
        if action is not None:
            action()


def defer_or_run(action: Callable[[], None]) -> None:
    """Run `action` now, or at the end of the critical section the main thread is in.
    Called by a signal handler (which runs in the main thread)."""
    global _deferred
    if _depth > 0:
        _deferred = action
    else:
        action()


@contextmanager
def undo_on_stop(callback: Callable[[], None]) -> Iterator[None]:
    """While the block runs, a stopped command calls `callback` on its way out."""
    global _next_key
    with _undo_lock:
        key = _next_key
        _next_key += 1
        _undo[key] = callback
    try:
        yield
    finally:
        with _undo_lock:
            _undo.pop(key, None)


def run_undo() -> None:
    """Call every registered undo callback, newest first; one failing does not stop the rest."""
    # The main thread may be paused while holding the lock: do not wait for it long.
    locked = _undo_lock.acquire(timeout=UNDO_LOCK_TIMEOUT_S)
    try:
        callbacks = [_undo[key] for key in sorted(_undo, reverse=True)]
        _undo.clear()
    finally:
        if locked:
            _undo_lock.release()
    for callback in callbacks:
        try:
            callback()
        except Exception:  # best effort on the way out
            continue
