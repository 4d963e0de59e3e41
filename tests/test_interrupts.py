"""Ctrl-C and SIGTERM, sent for real to the console script running in its own session.

Each command runs as a user runs it (`arc2face-synth ...` in a new session, no Prefect
server given, so `generate` starts its temporary one), is paused (SIGSTOP) the moment it
is seen mid-work, signalled, and continued, so the signal lands there whatever the
machine's speed; it must
exit within 10 s with 130 (SIGINT) or 143 (SIGTERM) and exactly one line on stderr,
leave no process of its session alive (the temporary Prefect server is a uvicorn
child), release its writer lease, commit nothing partial, and leave a dataset that the
same command completes. The engine-level pieces (the write gate, critical sections)
have focused tests at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.reader import DatasetReader
from tests.dataset_factory import make_dataset
from tests.test_bad_inputs import assert_intact, image_hashes, manifest_rows, spec_dict, write_spec

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "flows.cli"]
EXIT_WITHIN_S = 10.0
INTERRUPTED = re.compile(
    r"^interrupted: (\d+) of (\d+) shards committed; re-run the same command to resume$"
)


# --- running and signalling a command --------------------------------------------------------


def start(args: list, tmp: Path) -> subprocess.Popen:
    """The CLI in a new session (its own process group), as a terminal would start it,
    with no Prefect server configured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for(
    condition, process: subprocess.Popen, timeout: float = 400, busy: bool = False
) -> None:
    """Poll until `condition()` (without sleeping when `busy`: for a condition that holds
    only for moments), then SIGSTOP the command where it is: `interrupt` sends the signal
    and continues it, so the signal lands at the point that was seen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the command ended first ({process.returncode}): {out!r} {err!r}")
        assert time.monotonic() < deadline, "timed out waiting for the command"
        time.sleep(0 if busy else 0.02)
    os.kill(process.pid, signal.SIGSTOP)


def session_processes(session: int) -> list[psutil.Process]:
    """Live (not zombie) processes of a session."""
    found = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getsid(process.pid) == session and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def interrupt(
    process: subprocess.Popen, number: int, group: bool
) -> tuple[int, str, str, float]:
    """Send `number` (to the whole process group when `group`); (status, stdout, stderr,
    seconds to exit). Fails if any process of the session is still alive 2 s later.
    The command, paused by `wait_for`, is continued once the signal is sent."""
    session = os.getsid(process.pid)
    children = psutil.Process(process.pid).children(recursive=True)
    sent = time.monotonic()
    if group:
        os.killpg(process.pid, number)
    else:
        os.kill(process.pid, number)
    os.kill(process.pid, signal.SIGCONT)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    took = time.monotonic() - sent
    deadline = time.monotonic() + 2
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [(p.pid, p.name(), " ".join(p.cmdline())[:120]) for p in session_processes(session)]
    for survivor in session_processes(session):
        survivor.kill()
    assert not left, f"processes survived the interrupt: {left} (children were {children})"
    return process.returncode, out.decode(), err.decode(), took


# --- generate ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_job(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A job of 6 one-identity shards, and the same job run to the end without Prefect."""
    from arc2face_engine.job.direct import run_job_directly
    from schemas.job import JobSpec

    tmp = tmp_path_factory.mktemp("long-job")
    raw = spec_dict(tiny_models, tmp / "base", identities__count=6)
    run_job_directly(JobSpec.model_validate(raw))
    return raw


@pytest.mark.parametrize(
    ("number", "group", "status"),
    [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
    ids=["ctrl-c-to-the-process-group", "sigterm-to-the-process"],
)
def test_generate_stops_within_seconds_commits_nothing_partial_and_resumes(
    long_job: dict, tmp_path: Path, number: int, group: bool, status: int
) -> None:
    base = Path(long_job["output"]["uri"])
    out = tmp_path / "ds"
    spec = write_spec(tmp_path, {**long_job, "output": {**long_job["output"], "uri": str(out)}})
    process = start(["generate", spec, "--no-progress"], tmp_path)
    wait_for(lambda: len(list(out.glob("manifest/part-*.parquet"))) >= 1, process)
    server = [p for p in psutil.Process(process.pid).children() if "uvicorn" in " ".join(p.cmdline())]
    assert server, "the temporary Prefect server (uvicorn) is a child of the command"

    code, stdout, stderr, took = interrupt(process, number, group)

    assert code == status, (stdout, stderr)
    assert took < EXIT_WITHIN_S, f"took {took:.1f} s to exit"
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, stderr  # no event-worker errors, no traceback
    found = INTERRUPTED.match(lines[0])
    assert found, lines[0]
    committed = sorted(out.glob("manifest/part-*.parquet"))
    assert int(found.group(1)) == len(committed) and int(found.group(2)) == 6
    assert 1 <= len(committed) < 6
    assert not (out / layout.LEASE_FILE).exists()  # released
    assert not list(out.glob("manifest/.*.tmp-*"))  # no half-written part or sidecar
    assert_intact(out)  # each committed part matches its sidecar, its rows their files
    for part in committed:  # committed whole: every file its rows name is there
        assert (out / layout.checksum_path_of(part.relative_to(out).as_posix())).exists()

    from arc2face_engine.job.direct import run_job_directly  # the re-run the line asks for
    from schemas.job import load_spec

    info = run_job_directly(load_spec(str(spec)))
    assert info.status == "complete"
    assert manifest_rows(str(out)) == manifest_rows(str(base))
    assert image_hashes(out) == image_hashes(base)


# --- audit and export ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images that reading them all takes a while."""
    root = tmp_path_factory.mktemp("big") / "ds"
    make_dataset(str(root), n_identities=60, images_per_identity=10, shards=6, image_size=96)
    return root


def _reads_dataset_files(pid: int, root: Path) -> bool:
    """Whether the process has a file under `root` open right now."""
    prefix = f"{root}/"
    try:
        with os.scandir(f"/proc/{pid}/fd") as fds:
            return any(os.readlink(fd.path).startswith(prefix) for fd in fds)
    except OSError:  # an fd closed while listed, or the process is gone
        return False


def test_export_interrupted_leaves_no_output_and_no_staging(big_dataset: Path, tmp_path: Path):
    out = tmp_path / "export"
    process = start(
        ["export", big_dataset, "--format", "imagefolder", "--out", out, "--no-progress"], tmp_path
    )
    wait_for(lambda: any(".export-tmp-" in p.name for p in tmp_path.iterdir()), process)
    code, stdout, stderr, took = interrupt(process, signal.SIGINT, group=True)
    assert code == 130 and took < EXIT_WITHIN_S, (stdout, stderr, took)
    assert stderr.strip("\n").split("\n") == [
        f"interrupted: the export stopped before it finished; {out} was not written (an "
        "existing one is unchanged): re-run the same command"
    ]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".export-tmp-" in p.name]


def test_audit_interrupted_writes_no_report(big_dataset: Path, tmp_path: Path):
    dataset = tmp_path / "ds"
    shutil.copytree(big_dataset, dataset)
    process = start(["audit", dataset, "--no-progress"], tmp_path)
    wait_for(lambda: _reads_dataset_files(process.pid, dataset / "images"), process, busy=True)
    code, stdout, stderr, took = interrupt(process, signal.SIGTERM, group=False)
    assert code == 143 and took < EXIT_WITHIN_S, (stdout, stderr, took)
    assert stderr.strip("\n").split("\n") == [
        f"interrupted: the audit of {dataset} stopped before writing its report; "
        "re-run the same command"
    ]
    assert not (dataset / layout.AUDIT_DIR).exists()


# --- the pieces ------------------------------------------------------------------------------


def test_stop_writes_waits_for_the_commit_in_progress_and_refuses_the_next(
    tmp_path: Path, monkeypatch
) -> None:
    """A commit that started lands whole; after the stop, nothing is written."""
    from arc2face_engine.dataset import writer as writer_module
    from arc2face_engine.dataset.writer import DatasetWriter, WritesStopped
    from schemas.tables import MANIFEST_SCHEMA

    monkeypatch.setattr(writer_module, "_GATE", writer_module._WriteGate())
    writer = DatasetWriter(str(tmp_path / "ds"))
    in_commit, release = threading.Event(), threading.Event()
    original = writer._put

    def slow_put(relative, data, **options):
        if relative.endswith(".sha256"):
            in_commit.set()
            assert release.wait(10)
        return original(relative, data, **options)

    monkeypatch.setattr(writer, "_put", slow_put)
    committing = threading.Thread(
        target=writer.commit_shard, args=(0, MANIFEST_SCHEMA.empty_table())
    )
    committing.start()
    assert in_commit.wait(10)
    stopped = []
    stopping_thread = threading.Thread(target=lambda: stopped.append(writer_module.stop_writes(10)))
    stopping_thread.start()
    time.sleep(0.2)
    assert not stopped  # waits for the commit in progress
    release.set()
    committing.join(10)
    stopping_thread.join(10)
    assert stopped == [True]
    assert DatasetReader(str(tmp_path / "ds")).manifest_parts() == [layout.manifest_part(0)]
    assert DatasetReader(str(tmp_path / "ds")).damaged_parts() == []  # whole: part + sidecar
    with pytest.raises(WritesStopped):
        writer.commit_shard(1, MANIFEST_SCHEMA.empty_table())
    with pytest.raises(WritesStopped):
        writer.write_image(1, "x", b"data", "jpg")
    assert not (tmp_path / "ds" / layout.image_dir(1)).exists()


def test_a_stop_inside_a_critical_section_waits_for_its_end() -> None:
    from arc2face_engine import stopping

    events = []
    with stopping.critical():
        stopping.defer_or_run(lambda: events.append("stopped"))
        events.append("rename")
        with stopping.critical():  # nested: the outermost end counts
            events.append("second file")
        assert events == ["rename", "second file"]
    assert events == ["rename", "second file", "stopped"]
    stopping.defer_or_run(lambda: events.append("at once"))
    assert events[-1] == "at once"
