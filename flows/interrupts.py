"""Ctrl-C and SIGTERM for the CLI: stop within seconds, commit nothing partial, leave
nothing running, say so in one line.

On the first SIGINT or SIGTERM the main thread stops where it is (nothing more is
submitted or written from it) and a thread started beforehand shuts the process down:

1. stdout and stderr go to /dev/null: Prefect's client-side errors (its event and log
   workers lose their server below) cannot flood the console;
2. `dataset.writer.stop_writes()`: no write or commit starts any more in this process,
   and the commits in progress land (a shard is committed whole or not at all);
3. every child process (the temporary Prefect server, a local Dask cluster) is sent
   SIGTERM, then SIGKILL, and reaped;
4. the writer leases this process holds are released; registered undo steps run (an
   export's staging folder is removed);
5. the command's one line (`interrupted: ...`) is written and the process exits at
   once (`os._exit`: Prefect's exit handlers would drain events for minutes) with status
   130 after SIGINT, 143 after SIGTERM (128 + the signal, the shell's convention).

In-flight shards are abandoned: their images are uncommitted leftovers that the next run
clears and redoes, exactly as after a crash. A watchdog ends the process with the same
status if this takes more than `DEADLINE_S`. A second signal meanwhile is ignored.
A stop that arrives inside `arc2face_engine.stopping.critical()` (a rename that must
finish) waits for its end.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from arc2face_engine import stopping

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
SIGNALS = tuple(EXIT_STATUS)
DEADLINE_S = 9.0  # after the signal: the promise is "exit within 10 s"
STOP_WRITES_S = 3.0
CHILD_GRACE_S = 2.0
FALLBACK_LINE = "interrupted: committed work is kept; re-run the same command to resume"

Describe = Callable[[], str]


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.describe: Describe = lambda: FALLBACK_LINE
        self.signal: int | None = None
        self.signalled = threading.Event()  # the watchdog starts counting
        self.shut_down = threading.Event()  # the shutdown thread starts working
        self.console_fd: int | None = None


_state = _State()


def describe_with(describe: Describe) -> None:
    """Set the line printed when this command is interrupted (called by each command,
    once it knows what it is doing; it should start with `interrupted: `)."""
    _state.describe = describe


@contextmanager
def handling() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as described above while the block runs (the CLI's
    main); the previous handlers are restored afterwards (in-process callers, tests)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in SIGNALS}
    _start_helpers()
    for number in SIGNALS:
        signal.signal(number, _on_signal)
    _state.installed = True
    _state.describe = lambda: FALLBACK_LINE  # until the command says what it does
    try:
        yield
    finally:
        _state.installed = False
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def kept_inside_flows() -> Iterator[None]:
    """Inside a flow body: put this module's handlers back (Prefect's flow engine swaps in
    its own SIGTERM handler, which unwinds the flow through its task runner and exit
    handlers). A no-op unless the CLI installed them, so deployment runs keep Prefect's."""
    if not _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in SIGNALS}
    for number in SIGNALS:
        signal.signal(number, _on_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# --- the signal -------------------------------------------------------------------------------


def _on_signal(number: int, _frame: object) -> None:
    if _state.signal is not None:
        return  # already stopping: a second Ctrl-C changes nothing
    _state.signal = number
    _state.signalled.set()  # the deadline runs from now
    stopping.defer_or_run(_stop_main_thread)


def _stop_main_thread() -> None:
    """Hand over to the shutdown thread and keep the main thread where it is until the
    process exits: it submits and writes nothing more."""
    _state.shut_down.set()
    while True:
        time.sleep(3600)


def _start_helpers() -> None:
    """The shutdown thread and the watchdog, started before any signal: starting a thread
    from a signal handler could wait on a lock the interrupted code holds."""
    if getattr(_start_helpers, "started", False):
        return
    _start_helpers.started = True  # type: ignore[attr-defined]
    threading.Thread(target=_shutdown_when_asked, name="interrupt-shutdown", daemon=True).start()
    threading.Thread(target=_watchdog, name="interrupt-watchdog", daemon=True).start()


def _exit_status() -> int:
    return EXIT_STATUS.get(_state.signal, 130)


def _shutdown_when_asked() -> None:
    _state.shut_down.wait()
    _silence_console()
    line = FALLBACK_LINE
    try:
        from arc2face_engine.dataset import lease, writer

        writer.stop_writes(STOP_WRITES_S)
        stop_children(CHILD_GRACE_S)
        lease.release_held()
        stopping.run_undo()
        line = _state.describe()
    except BaseException:  # the line and the exit status matter more than the cause
        pass
    _finish(line)


def _watchdog() -> None:
    _state.signalled.wait()
    time.sleep(DEADLINE_S)
    _silence_console()
    try:
        stop_children(0.0)
    finally:
        _finish(FALLBACK_LINE)


_finish_lock = threading.Lock()


def _finish(line: str) -> None:
    with _finish_lock:  # the shutdown thread and the watchdog: one line, one exit
        fd = _state.console_fd if _state.console_fd is not None else 2
        try:
            os.write(fd, (" ".join(line.split()) + "\n").encode("utf-8", "replace"))
        finally:
            os._exit(_exit_status())


def _silence_console() -> None:
    """Point fds 1 and 2 at /dev/null, keeping a copy of stderr for the final line."""
    if _state.console_fd is not None:
        return
    try:
        _state.console_fd = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass


# --- child processes --------------------------------------------------------------------------


def stop_children(grace_s: float) -> None:
    """SIGTERM every descendant, SIGKILL those alive after `grace_s`, and reap our own."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.send_signal(signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(children, timeout=grace_s if grace_s > 0 else 0.5)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=1.0)
