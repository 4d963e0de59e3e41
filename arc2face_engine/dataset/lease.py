"""One writer per output: a lease file with an owner, a heartbeat and an expiry.

`<dataset root>/.writer-lease.json` names the run that is writing the dataset
(host, pid, run id) and when it last proved it is alive. A second `generate` on
a live output is refused; a lease whose heartbeat is older than its time-to-live
(or whose process on this host is gone) was left by a killed run and is taken
over.

Object stores have no portable create-if-absent, so taking a lease is "write,
wait, re-read": of two runs that write at nearly the same moment, the one whose
record is read back wins and the other backs off. On local disks a fresh lease is
created with a hard link (atomic create-if-absent). The expiry is generous
(`LEASE_TTL_S`, eight heartbeats): a run is only taken over after it stopped
refreshing for minutes, not after one slow write.

Workers (threads or Dask processes) do not hold the lease; they carry its token
and `verify` it (one small read) before they delete leftovers of a shard or
commit one, so a run that lost its lease never deletes or commits anything.

The leases a process holds are listed (`release_held`): an interrupted run releases
them on its way out, wherever its main thread stopped (flows/interrupts.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from fsspec import AbstractFileSystem

from arc2face_engine.dataset import layout
from schemas.errors import LeaseLost, OutputInUse

HEARTBEAT_S = 15.0
LEASE_TTL_S = 120.0
SETTLE_S = 1.0  # object stores: time between writing a lease and reading it back
LOCAL_SETTLE_S = 0.1
MAX_LEASE_BYTES = 64 * 1024

_HELD: set[WriterLease] = set()
_HELD_LOCK = threading.Lock()


def release_held() -> int:
    """Release every lease this process holds (an interrupted run on its way out); returns
    how many it released."""
    with _HELD_LOCK:
        held = list(_HELD)
    for lease in held:
        lease.release()
    return len(held)


@dataclass(frozen=True)
class LeaseRecord:
    """The content of the lease file."""

    run_id: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    ttl_s: float

    @property
    def expires_at(self) -> float:
        return self.heartbeat_at + self.ttl_s

    def is_live(self, now: float | None = None) -> bool:
        """Not expired, and (on this host) its process still exists."""
        now = time.time() if now is None else now
        if now >= self.expires_at:
            return False
        return not (self.host == socket.gethostname() and not _process_exists(self.pid))

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (
            f"run {self.run_id} (host {self.host}, pid {self.pid}, last heartbeat "
            f"{max(0.0, now - self.heartbeat_at):.0f} s ago, expires in "
            f"{max(0.0, self.expires_at - now):.0f} s)"
        )


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or a pid we cannot judge: assume alive
    return True


def read_lease(fs: AbstractFileSystem, root: str) -> LeaseRecord | None:
    """The lease at `root`, or None when there is none. A lease file that cannot be
    parsed proves nobody's ownership and reads as an expired lease."""
    path = layout.join(root, layout.LEASE_FILE)
    fs.invalidate_cache(root)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        if len(raw) > MAX_LEASE_BYTES:
            raise ValueError("lease file too large")
        data = json.loads(raw)
        return LeaseRecord(
            run_id=str(data["run_id"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            acquired_at=float(data["acquired_at"]),
            heartbeat_at=float(data["heartbeat_at"]),
            ttl_s=float(data["ttl_s"]),
        )
    except (ValueError, KeyError, TypeError):
        return LeaseRecord("<unreadable lease>", "?", -1, 0.0, 0.0, 0.0)


def check_free(fs: AbstractFileSystem, root: str, uri: str) -> LeaseRecord | None:
    """Raise OutputInUse when a live lease is on the output; return a stale one (or None).
    Reads only: preflight calls it before anything is written."""
    record = read_lease(fs, root)
    if record is not None and record.is_live():
        raise OutputInUse(
            f"output {uri} is being written by {record.describe()}: wait for that run to "
            "finish (or stop it), or choose another output.uri"
        )
    return record


def verify(fs: AbstractFileSystem, root: str, uri: str, token: str) -> None:
    """Raise LeaseLost unless the lease at `root` is live and held by `token`."""
    record = read_lease(fs, root)
    if record is None or record.run_id != token:
        holder = "nobody" if record is None else record.describe()
        raise LeaseLost(
            f"this run no longer holds the writer lease on {uri} (now held by {holder}); "
            "it stopped without deleting or committing anything: re-run once the other "
            "run is done, or choose another output.uri"
        )
    if time.time() >= record.expires_at:
        raise LeaseLost(
            f"this run's writer lease on {uri} expired (no heartbeat for "
            f"{time.time() - record.heartbeat_at:.0f} s): re-run the same command to resume"
        )


class WriterLease:
    """Hold the output's lease for the duration of a `with` block, refreshed by a
    background heartbeat thread."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        root: str,
        uri: str,
        *,
        ttl_s: float = LEASE_TTL_S,
        heartbeat_s: float = HEARTBEAT_S,
        settle_s: float | None = None,
    ) -> None:
        if not heartbeat_s * 2 <= ttl_s:
            raise ValueError(f"ttl {ttl_s} s must be at least two heartbeats ({heartbeat_s} s)")
        self.fs, self.root, self.uri = fs, root, uri
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.local = layout.is_local(fs)
        self.settle_s = (
            settle_s if settle_s is not None else (LOCAL_SETTLE_S if self.local else SETTLE_S)
        )
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # why the heartbeat found the lease gone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquired_at = 0.0

    @property
    def path(self) -> str:
        return layout.join(self.root, layout.LEASE_FILE)

    def __enter__(self) -> WriterLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # --- acquire / release ----------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise OutputInUse naming the live holder."""
        stale = check_free(self.fs, self.root, self.uri)
        now = time.time()
        self._acquired_at = now
        record = self._record(now)
        if self.local and stale is None:
            self._create_local(record)
        else:
            self._write(record)
        time.sleep(self.settle_s)  # let a racing writer's record land before judging
        current = read_lease(self.fs, self.root)
        if current is None or current.run_id != self.token:
            holder = "another run" if current is None else current.describe()
            raise OutputInUse(
                f"output {self.uri} was taken by {holder} while this run started: wait for "
                "that run to finish, or choose another output.uri"
            )
        self._thread = threading.Thread(target=self._beat, name="writer-lease", daemon=True)
        self._thread.start()
        with _HELD_LOCK:
            _HELD.add(self)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still ours."""
        with _HELD_LOCK:
            _HELD.discard(self)
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None
        current = read_lease(self.fs, self.root)
        if current is not None and current.run_id == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)

    # --- heartbeat ------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the lease; if still ours, push its heartbeat (and expiry) forward."""
        current = read_lease(self.fs, self.root)
        if current is None or current.run_id != self.token:
            holder = "nobody" if current is None else current.describe()
            self.lost = f"lease on {self.uri} lost to {holder}"
            self._stop.set()
            return
        self._write(self._record(time.time()))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except Exception:  # a failed refresh is retried at the next beat;
                continue  # the expiry allows several misses before anyone may take over

    # --- file IO --------------------------------------------------------------------------

    def _record(self, now: float) -> LeaseRecord:
        return LeaseRecord(
            run_id=self.token,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=self._acquired_at,
            heartbeat_at=now,
            ttl_s=self.ttl_s,
        )

    def _encode(self, record: LeaseRecord) -> bytes:
        return (json.dumps(asdict(record), indent=2) + "\n").encode("utf-8")

    def _temp_path(self) -> str:
        return f"{self.path}.tmp-{uuid.uuid4().hex}"

    def _write(self, record: LeaseRecord) -> None:
        """Replace the lease in one step (temp file + rename locally, one PUT elsewhere)."""
        data = self._encode(record)
        try:
            if not self.local:
                self.fs.pipe_file(self.path, data)
                return
            self._ensure_root()
            temp = self._temp_path()
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                os.replace(temp, self.path)
            finally:
                if os.path.exists(temp):
                    os.remove(temp)
        except OSError as error:
            raise (layout.write_failure(self.uri, self.path, error) or error) from None

    def _create_local(self, record: LeaseRecord) -> None:
        """Create the lease only if absent: link a complete temp file into place."""
        try:
            self._ensure_root()
            temp = self._temp_path()
            try:
                with open(temp, "wb") as handle:
                    handle.write(self._encode(record))
                os.link(temp, self.path)  # fails if another run created it first
            except FileExistsError:
                return  # the read-back in acquire() names the winner
            finally:
                if os.path.exists(temp):
                    os.remove(temp)
        except OSError as error:
            raise (layout.write_failure(self.uri, self.path, error) or error) from None

    def _ensure_root(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
