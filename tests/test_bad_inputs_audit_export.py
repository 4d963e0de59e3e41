"""Bad inputs to audit, export and the torch loader, table-driven, at the level a user acts.

Each case damages a copy of a small dataset (or picks a bad --out), runs the CLI
entry point in-process (`flows.cli.main`, as the console script does) and checks:
the exit status (2 for a refused command, 1 for an audit that finds the fault),
at most one line on stderr and no traceback, and every file of the dataset
unchanged (sha256 before and after; the audit's own audit/ folder aside).
Paths that try to escape must leave nothing outside the output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.errors import UserError
from schemas.tables import MANIFEST_SCHEMA
from tests.dataset_factory import make_dataset, rewrite_part

PART0 = "manifest/part-00000.parquet"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "ds"
    make_dataset(str(root), n_identities=3, images_per_identity=2, shards=2, image_size=32)
    return root


@pytest.fixture
def work(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the dataset under tmp_path/case/ds (tmp_path/outside is outside it)."""
    root = tmp_path / "case" / "ds"
    shutil.copytree(pristine, root)
    (tmp_path / "outside").mkdir()
    return root


# --- helpers ----------------------------------------------------------------------------------


def hashes(root: Path, skip_audit: bool = True) -> dict[str, str]:
    """Every file (and symlink target) under root, by relative path."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if skip_audit and relative.startswith("audit/"):
                continue
            if path.is_symlink():
                found[relative] = "link:" + os.readlink(path)
            else:
                found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def edit_first_accepted(root: Path, **changes) -> dict:
    """Change fields of the first accepted row of part 0 (sidecar refreshed: a writer's bug,
    not a flipped byte, so only the check under test can catch it). Returns the old row."""
    part = root / PART0
    rows = pq.read_table(part).to_pylist()
    index = next(i for i, row in enumerate(rows) if row["accepted"])
    old = dict(rows[index])
    rows[index].update(changes)
    rewrite_part(part, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    return old


def symlink_first_image(root: Path) -> Path:
    """Replace the first accepted image by a symlink to an identical file outside the root."""
    row = edit_first_accepted(root)  # no change: find the row
    image = root / row["path"]
    outside = root.parent.parent / "outside" / "copy.jpg"
    outside.write_bytes(image.read_bytes())  # same bytes: sha256 and size still match
    image.unlink()
    image.symlink_to(outside)
    return outside


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`arc2face-synth ARGS` through the console-script entry point, in this process."""
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["arc2face-synth", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def assert_one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], err


# --- the table ----------------------------------------------------------------------------------

Setup = Callable[[Path, Path], list[str]]  # (dataset root, tmp_path) -> CLI args


@dataclass
class Case:
    name: str
    setup: Setup
    status: int
    words: tuple[str, ...] = ()  # in the one stderr line (exit 2) or the report's problems (1)


def _export(fmt: str, *extra: str) -> Callable[[Path, Path], list[str]]:
    def args(root: Path, tmp: Path) -> list[str]:
        return ["export", str(root), "--format", fmt, "--out", str(tmp / "out"), *extra]

    return args


def _then(change: Callable[[Path, Path], object], command: Setup) -> Setup:
    def setup(root: Path, tmp: Path) -> list[str]:
        change(root, tmp)
        return command(root, tmp)

    return setup


def _audit(root: Path, tmp: Path) -> list[str]:
    return ["audit", str(root)]


def _path_escape(root: Path, tmp: Path) -> None:
    edit_first_accepted(root, path="../../outside/copy.jpg")


def _absolute_path(root: Path, tmp: Path) -> None:
    target = tmp / "outside" / "abs.jpg"
    row = edit_first_accepted(root)
    target.write_bytes((root / row["path"]).read_bytes())
    edit_first_accepted(root, path=str(target))


def _id_escape(root: Path, tmp: Path) -> None:
    edit_first_accepted(root, image_id="../../../../escape")


def _identity_slash(root: Path, tmp: Path) -> None:
    edit_first_accepted(root, identity_id="id/../../x")


def _symlink(root: Path, tmp: Path) -> None:
    symlink_first_image(root)


def _json_text(text: str) -> Callable[[Path, Path], None]:
    def change(root: Path, tmp: Path) -> None:
        (root / "dataset.json").write_text(text)

    return change


def _flip_part(root: Path, tmp: Path) -> None:
    flip_byte(root / PART0, 0.3)


def _alter_part(root: Path, tmp: Path) -> None:
    """Bytes in the middle of part 0 changed; it still reads, with other values."""
    from tests.damage import alter_part_keeping_it_readable

    alter_part_keeping_it_readable(root / PART0)


def _in_progress(root: Path, tmp: Path) -> None:
    """A dataset still being generated: in progress, shard 1 not committed yet."""
    info = json.loads((root / "dataset.json").read_text())
    info["status"] = "in_progress"
    (root / "dataset.json").write_text(json.dumps(info))
    (root / "manifest" / "part-00001.parquet").unlink()


def _drop_sidecar(root: Path, tmp: Path) -> None:
    (root / f"{PART0}.sha256").unlink()


def _flip_identities(root: Path, tmp: Path) -> None:
    flip_byte(root / "identities.parquet", 0.4)


def _part_symlink(root: Path, tmp: Path) -> None:
    part = root / "manifest" / "part-00001.parquet"
    outside = tmp / "outside" / "part.parquet"
    shutil.copy(part, outside)
    part.unlink()
    part.symlink_to(outside)


def _out_nonempty(root: Path, tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "stale.txt").write_text("old export")
    return _export("imagefolder")(root, tmp)


def _out_file(root: Path, tmp: Path) -> list[str]:
    (tmp / "out").write_text("a file")
    return _export("imagefolder")(root, tmp)


def _out_under_file(root: Path, tmp: Path) -> list[str]:
    (tmp / "blocker").write_text("a file")
    return ["export", str(root), "--format", "recordio", "--out", str(tmp / "blocker" / "x")]


def _out_inside(root: Path, tmp: Path) -> list[str]:
    return ["export", str(root), "--format", "imagefolder", "--out", str(root / "exported")]


def _out_is_root(root: Path, tmp: Path) -> list[str]:
    return ["export", str(root), "--format", "imagefolder", "--out", str(root), "--overwrite"]


def _out_holds_dataset(root: Path, tmp: Path) -> list[str]:
    return ["export", str(root), "--format", "hf", "--out", str(root.parent), "--overwrite"]


def _out_protocol(root: Path, tmp: Path) -> list[str]:
    return ["export", str(root), "--format", "hf", "--out", "foo://bucket/x"]


AUDIT_FAILS = [
    Case("audit path ../", _then(_path_escape, _audit), 1, ("unsafe_paths",)),
    Case("audit absolute path", _then(_absolute_path, _audit), 1, ("unsafe_paths",)),
    Case("audit image_id ../", _then(_id_escape, _audit), 1, ("unsafe_paths",)),
    Case("audit identity_id with /", _then(_identity_slash, _audit), 1, ("unsafe_paths",)),
    Case("audit image symlink out", _then(_symlink, _audit), 1, ("unsafe_paths",)),
    Case("audit part symlink out", _then(_part_symlink, _audit), 1, ("part-00001",)),
    Case("audit dataset.json {x", _then(_json_text("{x"), _audit), 1, ("dataset_json",)),
    Case("audit dataset.json name 3", _then(_json_text('{"name": 3}'), _audit), 1, ("dataset_json",)),
    Case("audit dataset.json list", _then(_json_text("[1, 2]"), _audit), 1, ("dataset_json",)),
    Case("audit flipped part byte", _then(_flip_part, _audit), 1, ("checksum_mismatches",)),
    Case("audit part altered, still readable", _then(_alter_part, _audit), 1,
         ("checksum_mismatches", PART0)),
    Case("audit part without sidecar", _then(_drop_sidecar, _audit), 1, ("missing_checksums",)),
    Case("audit flipped identities byte", _then(_flip_identities, _audit), 1, ("identities",)),
]
def _gallery(kind: str) -> Setup:
    def setup(root: Path, tmp: Path) -> list[str]:
        import numpy as np

        gallery = tmp / "outside" / "gallery.npy"
        if kind == "wrong shape":
            np.save(gallery, np.zeros((3, 128), np.float32))
        elif kind == "pickled":
            np.save(gallery, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        return ["audit", str(root), "--gallery", str(gallery)]

    return setup


AUDIT_REFUSED = [
    Case("audit --gallery missing", _gallery("missing"), 2, ("gallery", "not found")),
    Case("audit --gallery wrong shape", _gallery("wrong shape"), 2, ("512",)),
    Case("audit --gallery pickled .npy", _gallery("pickled"), 2, ("not a readable .npy",)),
    Case("audit --radius 5", lambda root, tmp: ["audit", str(root), "--radius", "5"], 2,
         ("radius",)),
    Case("audit no dataset", lambda root, tmp: ["audit", str(tmp / "nothing")], 2,
         ("no dataset",)),
    Case("audit unknown protocol", lambda root, tmp: ["audit", "foo://bucket/ds"], 2,
         ("foo://",)),
]  # fmt: skip
FORMATS = ("imagefolder", "webdataset", "recordio", "hf")
EXPORT_REFUSED = [
    *(Case(f"export {fmt} path ../", _then(_path_escape, _export(fmt)), 2, ("../",))
      for fmt in FORMATS),
    *(Case(f"export {fmt} image_id ../", _then(_id_escape, _export(fmt)), 2, ("escape",))
      for fmt in FORMATS),
    *(Case(f"export {fmt} symlink out", _then(_symlink, _export(fmt)), 2, ("symlink",))
      for fmt in FORMATS),
    Case("export absolute path", _then(_absolute_path, _export("webdataset")), 2, ("absolute",)),
    Case("export identity_id with /", _then(_identity_slash, _export("hf")), 2, ("identity_id",)),
    Case("export corrupt dataset.json", _then(_json_text("{x"), _export("recordio")), 2,
         ("dataset.json",)),
    Case("export dataset.json name 3", _then(_json_text('{"name": 3}'), _export("hf")), 2,
         ("dataset.json",)),
    *(Case(f"export {fmt} part altered, still readable", _then(_alter_part, _export(fmt)), 2,
           (f"manifest part {PART0}", "is damaged", "--redo-damaged")) for fmt in FORMATS),
    Case("export part without sidecar", _then(_drop_sidecar, _export("recordio")), 2,
         (PART0, "no checksum sidecar")),
    Case("export in progress", _then(_in_progress, _export("recordio")), 2,
         ("not complete", "1 of 2 shards missing", "--allow-incomplete")),
    Case("export --out not empty", _out_nonempty, 2, ("not empty", "--overwrite")),
    Case("export --out is a file", _out_file, 2, ("is a file",)),
    Case("export --out under a file", _out_under_file, 2, ("under a file",)),
    Case("export --out inside the dataset", _out_inside, 2, ("inside the dataset",)),
    Case("export --out is the dataset", _out_is_root, 2, ("inside the dataset",)),
    Case("export --out holds the dataset", _out_holds_dataset, 2, ("holds the dataset",)),
    Case("export --out unknown protocol", _out_protocol, 2, ("foo://",)),
    Case("export unknown label mode", _export("recordio", "--labels", "x"), 2, ("label mode",)),
    Case("export --dali on imagefolder", _export("imagefolder", "--dali"), 2, ("recordio",)),
    Case("export unknown format", _export("tfrecord"), 2, ("unknown export format",)),
    Case("export from unknown protocol",
         lambda root, tmp: ["export", "foo://b/ds", "--format", "hf", "--out", str(tmp / "out")],
         2, ("foo://",)),
    Case("export no dataset", lambda root, tmp: _export("hf")(tmp / "nothing", tmp), 2,
         ("no dataset",)),
    Case("export webdataset dotted key",
         _then(lambda root, tmp: edit_first_accepted(root, image_id="id-000000.v0"),
               _export("webdataset")), 2, ("dot",)),
]  # fmt: skip


@pytest.mark.parametrize(
    "case", AUDIT_FAILS + AUDIT_REFUSED + EXPORT_REFUSED, ids=lambda case: case.name
)
def test_bad_input(case: Case, work: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    args = case.setup(work, tmp_path)
    out_before = hashes(tmp_path / "out", skip_audit=False) if (tmp_path / "out").is_dir() else None
    before = hashes(work)
    outside_before = hashes(tmp_path / "outside")
    status, stdout, err = run_cli([*args, "--no-progress"], monkeypatch, capsys)
    assert status == case.status, (stdout, err)
    assert hashes(work) == before  # nothing committed changed
    assert hashes(tmp_path / "outside") == outside_before  # nothing written outside
    assert not list(tmp_path.rglob("escape*"))
    if case.status == 2:
        assert_one_line(err, *case.words)
        out = tmp_path / "out"
        if out_before is not None:
            assert hashes(out, skip_audit=False) == out_before  # a refused export touches nothing
        elif out.is_dir():
            pytest.fail(f"a refused export created {out}")
        assert not [p for p in tmp_path.rglob("*") if ".export-tmp-" in p.name]
    else:
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
        report = json.loads((work / "audit" / "report.json").read_text())  # still written
        assert not report["passed"]
        problems = " | ".join(report["problems"])
        for word in case.words:
            assert word in problems, problems


# --- the loader ---------------------------------------------------------------------------------

LOADER_REFUSED = [
    ("path ../", _path_escape, "../"),
    ("absolute path", _absolute_path, "absolute"),
    ("symlink out", _symlink, "symlink"),
    ("corrupt dataset.json", _json_text("{x"), "dataset.json"),
]


@pytest.mark.parametrize("name,change,word", LOADER_REFUSED, ids=[c[0] for c in LOADER_REFUSED])
def test_loader_refuses(name, change, word, work: Path, tmp_path: Path) -> None:
    from arc2face_engine.loader import Arc2FaceDataset

    change(work, tmp_path)
    before = hashes(work)
    with pytest.raises(UserError) as raised:
        Arc2FaceDataset(str(work))
    message = str(raised.value)
    assert "\n" not in message and word in message, message
    if name != "corrupt dataset.json":
        assert "row" in message  # names the row
    assert hashes(work) == before


@pytest.mark.parametrize(
    "damage",
    [_alter_part, lambda root, tmp: (root / PART0).write_bytes((root / PART0).read_bytes()[:-9])],
    ids=["altered, still readable", "truncated"],
)
def test_loader_refuses_a_damaged_part_naming_it(damage, work: Path, tmp_path: Path) -> None:
    """A typed exception naming the part, never pyarrow's own error (which names no file)."""
    from arc2face_engine import DamagedPart
    from arc2face_engine.loader import Arc2FaceDataset

    damage(work, tmp_path)
    with pytest.raises(DamagedPart) as raised:
        Arc2FaceDataset(str(work))
    assert raised.value.part == PART0
    message = str(raised.value)
    assert "\n" not in message and PART0 in message and "--redo-damaged" in message


def test_loader_and_export_refuse_an_incomplete_dataset_unless_allowed(
    work: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from arc2face_engine import DatasetIncomplete
    from arc2face_engine.loader import Arc2FaceDataset

    _in_progress(work, tmp_path)
    with pytest.raises(DatasetIncomplete, match=r"1 of 2 shards missing.*allow_incomplete=True"):
        Arc2FaceDataset(str(work))
    partial = Arc2FaceDataset(str(work), allow_incomplete=True)
    assert len(partial) == len(pq.read_table(work / PART0).filter(pa.compute.field("accepted")))
    args = [*_export("imagefolder")(work, tmp_path), "--allow-incomplete", "--no-progress"]
    status, stdout, err = run_cli(args, monkeypatch, capsys)
    assert status == 0, (stdout, err)
    assert f"exported {len(partial)} images" in stdout


# --- end to end through the console script ----------------------------------------------------


def test_console_script_one_line_and_exit_2(work: Path, tmp_path: Path) -> None:
    _path_escape(work, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "export", str(work), "--format", "imagefolder",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert_one_line(done.stderr, "manifest", "../")
    assert not (tmp_path / "out").exists()


# --- what is not an error -----------------------------------------------------------------------


def test_in_progress_is_not_a_count_failure(work: Path, monkeypatch, capsys) -> None:
    info = json.loads((work / "dataset.json").read_text())
    info["status"] = "in_progress"
    info["counts"].update(shards=5, committed_shards=1, images=3, accepted=2)
    (work / "dataset.json").write_text(json.dumps(info))
    (work / "images" / "00004").mkdir()
    (work / "images" / "00004" / "being-written.jpg").write_bytes(b"partial")
    status, stdout, _err = run_cli(["audit", str(work), "--no-progress"], monkeypatch, capsys)
    assert status == 0, stdout
    assert "in progress" in stdout
    report = json.loads((work / "audit" / "report.json").read_text())
    assert report["in_progress"] and report["integrity"]["count_mismatches"]["count"] == 0
    assert report["integrity"]["uncommitted_leftovers"]["count"] == 1


def test_live_lease_means_in_progress_expired_does_not(work: Path) -> None:
    import datetime as dt

    from arc2face_engine.audit import audit_dataset

    lease = work / ".writer-lease.json"
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
    lease.write_text(json.dumps({"owner": "host:123", "expires_at": future.isoformat()}))
    report = audit_dataset(str(work), write_report=False)
    assert report.in_progress and "host:123" in report.in_progress_reason and report.passed
    lease.write_text(json.dumps({"owner": "host:123", "expires_at": 1.0}))
    report = audit_dataset(str(work), write_report=False)
    assert not report.in_progress and report.passed
    assert report.integrity.orphan_files.count == 0  # the lease file is not an orphan


def test_hostile_spec_gallery_is_a_warning(work: Path) -> None:
    """A gallery named by the dataset (not the user) that cannot be used does not stop the audit."""
    from arc2face_engine.audit import audit_dataset

    info = json.loads((work / "dataset.json").read_text())
    info["spec"]["identities"] = {"exclusion": {"gallery": str(work / "dataset.json")}}
    (work / "dataset.json").write_text(json.dumps(info))
    report = audit_dataset(str(work), write_report=False)
    assert report.leakage is None and any("unusable" in w for w in report.warnings)


def test_failed_export_leaves_no_output(work: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An export that dies half-way (a missing image in the second shard) leaves no output
    that looks complete: nothing at --out, no staging folder."""
    victim = sorted((work / "images" / "00001").iterdir())[-1]
    victim.unlink()
    status, _, err = run_cli([*_export("imagefolder")(work, tmp_path), "--no-progress"],
                             monkeypatch, capsys)  # fmt: skip
    assert status == 2 and "is missing" in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.rglob("*") if ".export-tmp-" in p.name]


def test_overwrite_replaces_instead_of_merging(work: Path, tmp_path: Path, monkeypatch,
                                               capsys) -> None:  # fmt: skip
    out = tmp_path / "out"
    (out / "99999").mkdir(parents=True)
    (out / "99999" / "stale.jpg").write_bytes(b"stale class")
    args = _export("imagefolder", "--overwrite", "--no-progress")(work, tmp_path)
    status, stdout, _ = run_cli(args, monkeypatch, capsys)
    assert status == 0, stdout
    assert not (out / "99999").exists() and (out / "labels.csv").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00000", "00001", "00002"]
