"""Bad inputs and races against `generate` and `plan`, as a user meets them at the CLI.

Every case in CASES runs the CLI in-process and must end with exit status 2, exactly
one line on stderr (no traceback), naming the problem, and leave every file under the
output byte-identical (a fresh output is not even created). The races below run real
concurrent writers: two `generate` runs on one output, a run killed with SIGKILL and
taken over, an expired lease on an object store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.attempt import begin_shard
from arc2face_engine.dataset.lease import WriterLease, read_lease
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from schemas.errors import LeaseLost, OutputInUse
from schemas.job import JobSpec
from schemas.tables import MANIFEST_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


# --- helpers ------------------------------------------------------------------------------------


def spec_dict(models: Path, out: Path | str, **sections) -> dict:
    """A tiny job: 2 identities x 2 images of 64x64, one identity per shard."""
    raw = {
        "name": "bad inputs",
        "seed": 5,
        "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
        "identities": {"source": "random", "count": 2},
        "variations": {"images_per_identity": 2},
        "generation": {"steps": 2, "batch_size": 4, "height": 64, "width": 64},
        "filter": {"min_similarity": 0.0, "max_attempts": 1},
        "output": {"uri": str(out), "shard_size": 2},
        "compute": {"task_runner": "local", "devices": ["cpu"]},
    }
    for dotted, value in sections.items():
        node = raw
        *path, key = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value
    return raw


def write_spec(folder: Path, raw: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw))
    return path


def tree_hashes(root: Path) -> dict[str, str] | None:
    """sha256 of every file under `root` (None when `root` does not exist)."""
    if not root.exists():
        return None
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def run_cli(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """The console script in this process: (exit status, stdout, stderr)."""
    import transformers.utils.logging as transformers_logging

    from flows import cli

    # The console script sets the model libraries' quiet settings before it imports them;
    # in this process they were imported first, so their weight-loading bars are turned
    # off here (they would add lines to stderr when a test is the first to load models).
    transformers_logging.disable_progress_bar()
    monkeypatch.setattr(sys, "argv", ["arc2face-synth", *map(str, args)])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, expect: str) -> None:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expect in lines[0], lines[0]


def manifest_rows(uri: str) -> list[dict]:
    rows = DatasetReader(uri).manifest().to_pylist()
    return sorted(rows, key=lambda row: row["image_id"])


def image_hashes(root: Path) -> dict[str, str]:
    return {k: v for k, v in (tree_hashes(root / "images") or {}).items()}


def assert_intact(root: Path) -> None:
    """Every manifest row points at a file with its recorded sha256; every part matches
    its checksum sidecar; identities.parquet matches dataset.json."""
    info = json.loads((root / "dataset.json").read_text())
    data = (root / "identities.parquet").read_bytes()
    assert hashlib.sha256(data).hexdigest() == info["identities_sha256"]
    for part in sorted((root / "manifest").glob("part-*.parquet")):
        sidecar = part.with_name(part.name + ".sha256").read_text().strip()
        assert hashlib.sha256(part.read_bytes()).hexdigest() == sidecar
    for row in manifest_rows(str(root)):
        if row["path"]:
            assert hashlib.sha256((root / row["path"]).read_bytes()).hexdigest() == row["sha256"]


# --- shared fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_models, tmp_path_factory) -> Path:
    """A complete dataset of spec_dict(...), made without Prefect."""
    from arc2face_engine.job.direct import run_job_directly

    out = tmp_path_factory.mktemp("base") / "ds"
    info = run_job_directly(JobSpec.model_validate(spec_dict(tiny_models, out)))
    assert info.status == "complete" and info.counts.shards == 2
    return out


@dataclass
class Ctx:
    tmp: Path
    models: Path
    base: Path

    def copy_base(self) -> Path:
        target = self.tmp / "resumed"
        shutil.copytree(self.base, target)
        return target

    def copy_models(self) -> Path:
        target = self.tmp / "models"
        shutil.copytree(self.models, target)
        return target

    def fresh(self) -> Path:
        return self.tmp / "fresh" / "ds"

    def spec(self, out: Path | str | None = None, models: Path | None = None, **sections) -> Path:
        raw = spec_dict(models or self.models, out if out is not None else self.fresh(), **sections)
        return write_spec(self.tmp, raw)


@pytest.fixture
def ctx(base, tiny_models, tmp_path) -> Ctx:
    return Ctx(tmp_path, tiny_models, base)


# --- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # a piece of the one error line
    setup: Callable[[Ctx], tuple[list, Path]]  # -> (CLI args, folder whose files must not change)


def generate_fresh(**sections) -> Callable[[Ctx], tuple[list, Path]]:
    def setup(ctx: Ctx) -> tuple[list, Path]:
        return ["generate", ctx.spec(**sections), "--no-progress"], ctx.fresh()

    return setup


def _embedding_parquet(ctx: Ctx, ids: list[str]) -> Path:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((len(ids), 512)).astype(np.float32)
    path = ctx.tmp / "embeddings.parquet"
    pq.write_table(
        pa.table(
            {
                "identity_id": ids,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), 512),
            }
        ),
        path,
    )
    return path


def identity_ids(*ids: str) -> Callable[[Ctx], tuple[list, Path]]:
    def setup(ctx: Ctx) -> tuple[list, Path]:
        path = _embedding_parquet(ctx, ["id-a", *ids])
        spec = ctx.spec(identities={"source": "file", "path": str(path)})
        return ["generate", spec], ctx.fresh()

    return setup


def embedding_file(name: str, content: Callable[[Path], None]) -> Callable[[Ctx], tuple]:
    def setup(ctx: Ctx) -> tuple[list, Path]:
        path = ctx.tmp / name
        content(path)
        spec = ctx.spec(identities={"source": "file", "path": str(path)})
        return ["generate", spec], ctx.fresh()

    return setup


def _truncated_npy(path: Path) -> None:
    np.save(path, np.ones((4, 512), np.float32))
    path.write_bytes(path.read_bytes()[:300])


def _string_embeddings(path: Path) -> None:
    pq.write_table(pa.table({"embedding": [["x"] * 512]}), path)


def expression_file(table: pa.Table) -> Callable[[Ctx], tuple[list, Path]]:
    def setup(ctx: Ctx) -> tuple[list, Path]:
        path = ctx.tmp / "expressions.parquet"
        pq.write_table(table, path)
        spec = ctx.spec(variations__expressions={"kind": "file", "path": str(path)})
        return ["generate", spec], ctx.fresh()

    return setup


def photos(count: int) -> Callable[[Ctx], tuple[list, Path]]:
    def setup(ctx: Ctx) -> tuple[list, Path]:
        folder = ctx.tmp / "photos"
        folder.mkdir()
        for index in range(count):  # flat grey: no face to find
            Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / f"p{index}.png")
        spec = ctx.spec(identities={"source": "images", "path": str(folder)})
        return ["generate", spec], ctx.fresh()

    return setup


def broken_model(relative: str, mutate: Callable[[Path], None], **sections) -> Callable:
    def setup(ctx: Ctx) -> tuple[list, Path]:
        models = ctx.copy_models()
        mutate(models / relative)
        return ["generate", ctx.spec(models=models, **sections)], ctx.fresh()

    return setup


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 not what the loader expects {")


def delete(path: Path) -> None:
    path.unlink()


def json_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A mutation of a JSON file (a model config) that keeps it valid JSON."""

    def mutate(path: Path) -> None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return mutate


def output_at(where: Callable[[Ctx], tuple[Path | str, Path]]) -> Callable:
    def setup(ctx: Ctx) -> tuple[list, Path]:
        uri, watched = where(ctx)
        return ["generate", ctx.spec(out=uri)], watched

    return setup


def _a_file(ctx: Ctx) -> tuple[Path, Path]:
    path = ctx.tmp / "a-file"
    path.write_text("not a folder")
    return path, path


def _under_a_file(ctx: Ctx) -> tuple[Path, Path]:
    path = ctx.tmp / "a-file"
    path.write_text("not a folder")
    return path / "ds", path


def resumed(mutate: Callable[[Ctx, Path], Path | None], **sections) -> Callable:
    """generate on a copy of the complete base dataset after `mutate(ctx, copy)`, which
    may return another models directory to use."""

    def setup(ctx: Ctx) -> tuple[list, Path]:
        copy = ctx.copy_base()
        models = mutate(ctx, copy)
        return ["generate", ctx.spec(out=copy, models=models, **sections)], copy

    return setup


def _changed_unet(ctx: Ctx, _copy: Path) -> Path:
    """Valid weights, other values: the file opens but decides other pixels."""
    from safetensors.torch import load_file, save_file

    models = ctx.copy_models()
    path = models / "arc2face" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, path)
    return models


def _changed_vae_config(ctx: Ctx, _copy: Path) -> Path:
    models = ctx.copy_models()
    path = models / "vae" / "config.json"
    config = json.loads(path.read_text())
    config["scaling_factor"] = 0.5
    path.write_text(json.dumps(config))
    return models


def _edit_json(relative: str, edit: Callable[[dict], None]) -> Callable[[Ctx, Path], None]:
    def mutate(_ctx: Ctx, copy: Path) -> None:
        path = copy / relative
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return mutate


def _write(relative: str, content: bytes) -> Callable[[Ctx, Path], None]:
    def mutate(_ctx: Ctx, copy: Path) -> None:
        (copy / relative).write_bytes(content)

    return mutate


def _alter_part(_ctx: Ctx, copy: Path) -> None:
    """Bytes changed in the middle of a committed part; it still parses (issue 17)."""
    from tests.damage import alter_part_keeping_it_readable

    alter_part_keeping_it_readable(copy / layout.manifest_part(1))


def _truncate_identities(_ctx: Ctx, copy: Path) -> None:
    truncate(copy / layout.IDENTITIES)


def _truncate_identities_unrecorded(ctx: Ctx, copy: Path) -> None:
    _edit_json(layout.DATASET_JSON, lambda info: info.update(identities_sha256=None))(ctx, copy)
    truncate(copy / layout.IDENTITIES)


def _rewritten_identities(_ctx: Ctx, copy: Path) -> None:
    """Valid Parquet, other bytes (rows reversed): the recorded checksum catches it."""
    table = pq.read_table(copy / layout.IDENTITIES)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), copy / layout.IDENTITIES)


def _lease(host: str, pid: int, age_s: float, ttl_s: float = 120.0) -> Callable:
    def mutate(_ctx: Ctx, copy: Path) -> None:
        now = time.time()
        record = {
            "run_id": "feedface" * 4,
            "host": host,
            "pid": pid,
            "acquired_at": now - age_s,
            "heartbeat_at": now - age_s,
            "ttl_s": ttl_s,
        }
        (copy / layout.LEASE_FILE).write_text(json.dumps(record))

    return mutate


def _plan(*extra: str) -> Callable[[Ctx], tuple[list, Path]]:
    def setup(ctx: Ctx) -> tuple[list, Path]:
        return ["plan", ctx.spec(), *extra], ctx.fresh()

    return setup


def _raw_spec(text: str) -> Callable[[Ctx], tuple[list, Path]]:
    def setup(ctx: Ctx) -> tuple[list, Path]:
        path = ctx.tmp / "raw.yaml"
        path.write_text(text)
        return ["generate", path], ctx.fresh()

    return setup


def _foreign_files(ctx: Ctx) -> tuple[Path, Path]:
    folder = ctx.tmp / "someone-elses"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder, folder


CASES = [
    # identity ids from files (validated at preflight, never mapped)
    Case("id-with-slash", "row 1 has identity_id 'a/b'", identity_ids("a/b")),
    Case("id-with-space", "identity_id 'a b'", identity_ids("a b")),
    Case("id-dotdot", "identity_id '..'", identity_ids("..")),
    Case("id-dotdot-inside", "identity_id 'x..y'", identity_ids("x..y")),
    Case("id-absolute", "identity_id '/etc'", identity_ids("/etc")),
    Case("id-backslash", "identity_id 'a\\\\b'", identity_ids("a\\b")),
    Case("id-empty", "identity_id ''", identity_ids("")),
    Case("id-too-long", "identity_id 'xxxx", identity_ids("x" * 200)),
    Case("id-leading-dot", "identity_id '.hidden'", identity_ids(".hidden")),
    Case("id-duplicate", "repeats identity_id 'id-a'", identity_ids("id-a")),
    # counts that would allocate without bound
    Case("count-1e12", "identities.count", generate_fresh(identities__count=1e12)),
    Case(
        "per-identity-1e9",
        "images_per_identity",
        generate_fresh(variations__images_per_identity=1e9),
    ),
    Case("shard-size-1e9", "output.shard_size", generate_fresh(output__shard_size=10**9)),
    Case("attempts-1e6", "filter.max_attempts", generate_fresh(filter__max_attempts=10**6)),
    Case(
        "expressions-1e9",
        "expressions.count",
        generate_fresh(variations__expressions={"kind": "random", "count": 10**9}),
    ),
    Case("height-1e6", "generation.height", generate_fresh(generation__height=10**6)),
    Case(
        "pose-grid-huge",
        "more than 4096",
        generate_fresh(
            variations__poses={
                "kind": "procedural",
                "yaw": list(range(-90, 91)),
                "pitch": list(range(-45, 46)),
            }
        ),
    ),
    # identity and bank files
    Case("embeddings-truncated-npy", "embedding file", embedding_file("e.npy", _truncated_npy)),
    Case(
        "embeddings-not-parquet",
        "not a valid Parquet file",
        embedding_file("e.parquet", lambda p: p.write_bytes(b"PAR1 nope")),
    ),
    Case(
        "embeddings-strings",
        "column 'embedding' has type",
        embedding_file("s.parquet", _string_embeddings),
    ),
    Case(
        "expressions-string-values",
        "column 'values' holds list<element: string>",
        expression_file(pa.table({"name": ["a"], "values": [["x"] * 55]})),
    ),
    Case(
        "expressions-string-columns",
        "column 'e0' holds string",
        expression_file(pa.table({f"e{i}": ["x"] for i in range(55)})),
    ),
    Case("photos-without-faces", "no face found in any of the 3 photos", photos(3)),
    Case("photos-none", "no .jpg/.jpeg/.png/.webp files", photos(0)),
    # model files that do not open
    Case(
        "unet-truncated",
        "arc2face/diffusion_pytorch_model.safetensors does not open as safetensors",
        broken_model("arc2face/diffusion_pytorch_model.safetensors", truncate),
    ),
    Case(
        "vae-garbage",
        "vae/diffusion_pytorch_model.safetensors does not open",
        broken_model("vae/diffusion_pytorch_model.safetensors", garbage),
    ),
    Case(
        "encoder-bin-truncated",
        "encoder/pytorch_model.bin does not open as PyTorch checkpoint",
        broken_model("encoder/pytorch_model.bin", truncate),
    ),
    Case(
        "arcface-onnx-garbage",
        "antelopev2/arcface.onnx does not open as ONNX model",
        broken_model("antelopev2/arcface.onnx", garbage),
    ),
    Case(
        "detector-onnx-truncated",
        "scrfd_10g_bnkps.onnx does not open as ONNX model",
        broken_model("antelopev2/scrfd_10g_bnkps.onnx", truncate),
    ),
    Case(
        "vocab-not-json",
        "tokenizer/vocab.json does not open as JSON",
        broken_model("tokenizer/vocab.json", garbage),
    ),
    Case(
        "tokenizer-config-truncated",
        "tokenizer/tokenizer_config.json does not open",
        broken_model("tokenizer/tokenizer_config.json", truncate),
    ),
    Case(
        "unet-config-not-json",
        "arc2face/config.json does not open as JSON",
        broken_model("arc2face/config.json", garbage),
    ),
    Case(
        "scheduler-config-truncated",
        "scheduler_config.json does not open",
        broken_model("scheduler/scheduler_config.json", truncate),
    ),
    Case(
        "controlnet-truncated",
        "controlnet/diffusion_pytorch_model.safetensors does not open",
        broken_model(
            "controlnet/diffusion_pytorch_model.safetensors",
            truncate,
            variations__poses={"kind": "procedural"},
        ),
    ),
    Case(
        "expression-adapter-truncated",
        "exp_adapter/exp_adapter.bin does not open",
        broken_model(
            "exp_adapter/exp_adapter.bin", truncate, variations__expressions={"kind": "neutral"}
        ),
    ),
    Case(
        "encoder-missing", "missing model file", broken_model("encoder/pytorch_model.bin", delete)
    ),
    # model configs that open but do not fit what they configure
    Case(
        "scheduler-config-without-num-train-timesteps",
        "scheduler_config.json is not a diffusers scheduler config (no num_train_timesteps)",
        broken_model(
            "scheduler/scheduler_config.json", json_edit(lambda c: c.pop("num_train_timesteps"))
        ),
    ),
    Case(
        "scheduler-config-unknown-beta-schedule",
        "scheduler_config.json does not configure DPMSolverMultistepScheduler",
        broken_model(
            "scheduler/scheduler_config.json", json_edit(lambda c: c.update(beta_schedule="wobbly"))
        ),
    ),
    Case(
        "unet-config-does-not-fit-its-weights",
        "arc2face/config.json does not fit",
        broken_model(
            "arc2face/config.json", json_edit(lambda c: c.update(block_out_channels=[32, 48]))
        ),
    ),
    Case(
        "controlnet-config-does-not-fit-its-weights",
        "controlnet/config.json does not fit",
        broken_model(
            "controlnet/config.json",
            json_edit(lambda c: c.update(layers_per_block=2)),
            variations__poses={"kind": "procedural"},
        ),
    ),
    # output locations
    Case("output-is-a-file", "is a file: set output.uri to a folder", output_at(_a_file)),
    Case("output-under-a-file", "is a file, not a folder", output_at(_under_a_file)),
    Case(
        "unknown-protocol",
        "Protocol not known: foo",
        output_at(lambda ctx: ("foo://bucket/ds", ctx.fresh())),
    ),
    Case(
        "protocol-without-package",
        "install gcsfs",
        output_at(lambda ctx: ("gs://bucket/ds", ctx.fresh())),
    ),
    Case(
        "not-writable-filesystem",
        "cannot write",
        output_at(lambda ctx: (f"/sys/arc2face-{os.getpid()}/ds", ctx.fresh())),
    ),
    Case("foreign-folder", "is not empty and holds no dataset.json", output_at(_foreign_files)),
    # resuming what would mix models or read damaged files
    Case(
        "resume-changed-unet",
        "arc2face/diffusion_pytorch_model.safetensors differs",
        resumed(_changed_unet),
    ),
    Case("resume-changed-vae-config", "vae/config.json differs", resumed(_changed_vae_config)),
    Case(
        "resume-other-precision",
        "was generated at fp16 but this run would use fp32",
        resumed(_edit_json(layout.DATASET_JSON, lambda info: info.update(precision="fp16"))),
    ),
    Case(
        "resume-different-spec",
        "made from a different spec",
        resumed(lambda c, p: None, generation__steps=3),
    ),
    Case(
        "resume-part-altered-still-parses",
        "manifest part manifest/part-00001.parquet of dataset",
        resumed(_alter_part),
    ),
    Case(
        "resume-part-without-checksum",
        "part-00001.parquet of dataset",
        resumed(lambda _ctx, copy: (copy / layout.part_checksum_path(1)).unlink()),
    ),
    Case(
        "resume-identities-truncated", "damaged identities.parquet", resumed(_truncate_identities)
    ),
    Case(
        "resume-identities-truncated-unrecorded",
        "damaged identities.parquet",
        resumed(_truncate_identities_unrecorded),
    ),
    Case(
        "resume-identities-rewritten",
        "sha256 differs from dataset.json",
        resumed(_rewritten_identities),
    ),
    Case(
        "resume-dataset-json-not-json",
        "corrupt dataset.json",
        resumed(_write("dataset.json", b"{x")),
    ),
    Case(
        "resume-dataset-json-wrong-type",
        "corrupt dataset.json (name: Input should be a valid string)",
        resumed(_write("dataset.json", b'{"name": 3}')),
    ),
    Case(
        "resume-dataset-json-list", "corrupt dataset.json", resumed(_write("dataset.json", b"[]"))
    ),
    # live writers
    Case(
        "lease-other-host-live",
        "is being written by run feedface",
        resumed(_lease("elsewhere", 1, 5)),
    ),
    Case(
        "lease-this-host-live-pid",
        f"host {socket.gethostname()}, pid {os.getpid()}",
        resumed(_lease(socket.gethostname(), os.getpid(), 5)),
    ),
    # the spec and plan options
    Case("spec-not-yaml", "is not valid YAML", _raw_spec("name: [unclosed")),
    Case("spec-precision-typo", "models.precision", generate_fresh(models__precision="fp64")),
    Case(
        "plan-negative-throughput",
        "--throughput must be a positive number",
        _plan("--throughput", "-5"),
    ),
    Case(
        "plan-nan-throughput",
        "--throughput must be a positive number",
        _plan("--throughput", "nan"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, ctx: Ctx, monkeypatch, capsys):
    args, watched = case.setup(ctx)
    before = tree_hashes(watched)
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2, (out, err)
    assert_one_line_error(err, case.expect)
    assert tree_hashes(watched) == before


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)


# --- races and faults during a run ---------------------------------------------------------------


def _spec(ctx: Ctx, out: Path) -> JobSpec:
    return JobSpec.model_validate(spec_dict(ctx.models, out))


@pytest.mark.usefixtures("prefect_harness")
def test_second_generate_on_a_live_output_is_refused_and_the_first_completes(ctx: Ctx, monkeypatch):
    """Run A holds the lease (paused at its first commit); run B, another process, is
    refused in one line naming A; A then completes an intact dataset."""
    from flows.generate import generate_dataset

    out = ctx.tmp / "shared"
    spec_path = write_spec(ctx.tmp, spec_dict(ctx.models, out))
    at_commit, resume_a = threading.Event(), threading.Event()
    original = DatasetWriter.commit_shard

    def paused_commit(self, shard, table, **options):
        at_commit.set()
        assert resume_a.wait(300)
        return original(self, shard, table, **options)

    monkeypatch.setattr(DatasetWriter, "commit_shard", paused_commit)
    outcome: dict = {}
    run_a = threading.Thread(
        target=lambda: outcome.update(info=generate_dataset(_spec(ctx, out))), daemon=True
    )
    run_a.start()
    try:
        assert at_commit.wait(300), "run A never reached its first commit"
        holder = read_lease(*layout.open_dataset_fs(str(out)))
        run_b = subprocess.run(
            [sys.executable, "-m", "flows.cli", "generate", str(spec_path)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        resume_a.set()
        run_a.join(300)
    assert run_b.returncode == 2, run_b.stderr
    assert_one_line_error(run_b.stderr, f"is being written by run {holder.run_id}")
    assert outcome["info"].status == "complete"
    assert_intact(out)
    assert manifest_rows(str(out)) == manifest_rows(str(ctx.base))
    assert not (out / layout.LEASE_FILE).exists()  # released at the end


@pytest.mark.usefixtures("prefect_harness")
def test_lease_left_by_a_killed_run_is_taken_over(ctx: Ctx):
    """SIGKILL a writer after its first commit; the next generate takes its lease over
    (its process is gone) and the dataset equals an uninterrupted one."""
    from flows.generate import generate_dataset

    out = ctx.tmp / "killed"
    spec_path = write_spec(ctx.tmp, spec_dict(ctx.models, out))
    script = (
        "import sys; from schemas.job import load_spec; "
        "from arc2face_engine.job.direct import run_job_directly; "
        "run_job_directly(load_spec(sys.argv[1]))"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(spec_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list((out / "manifest").glob("part-*.parquet")):
            assert writer.poll() is None, "the writer ended before its first commit"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(60)
    left = read_lease(*layout.open_dataset_fs(str(out)))
    assert left is not None and left.pid == writer.pid and not left.is_live()
    info = generate_dataset(_spec(ctx, out))
    assert info.status == "complete"
    assert_intact(out)
    assert manifest_rows(str(out)) == manifest_rows(str(ctx.base))
    assert image_hashes(out) == image_hashes(ctx.base)


def test_expired_lease_of_another_host_is_taken_over(ctx: Ctx):
    """A lease whose heartbeat stopped longer ago than its expiry (a host that died):
    the uncommitted shard is redone and the dataset completes."""
    from arc2face_engine.job.direct import run_job_directly

    copy = ctx.copy_base()
    (copy / layout.manifest_part(1)).unlink()  # shard 1 was in flight when the host died
    _lease("dead-host", 4242, age_s=600)(ctx, copy)
    info = run_job_directly(_spec(ctx, copy))
    assert info.status == "complete"
    assert_intact(copy)
    assert manifest_rows(str(copy)) == manifest_rows(str(ctx.base))
    assert not (copy / layout.LEASE_FILE).exists()


CRASH_IN_SHARD_1 = """
import os, signal, sys, time
from pathlib import Path
from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.job.direct import run_job_directly
from schemas.job import load_spec

out = Path(sys.argv[2])
write_image = DatasetWriter.write_image

def write_then_crash(self, shard, image_id, data, ext):
    written = write_image(self, shard, image_id, data, ext)
    if shard == 1:  # shard 1 half written, shard 0 committed: the power goes out
        deadline = time.monotonic() + 120
        while not (out / "manifest" / "part-00000.parquet").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    return written

DatasetWriter.write_image = write_then_crash
run_job_directly(load_spec(sys.argv[1]))
"""


def _crash_in_shard_1(ctx: Ctx, out: Path) -> Path:
    """A real crash: a writer process SIGKILLed after shard 0 committed, while it writes
    shard 1's images. Returns the spec path."""
    spec_path = write_spec(ctx.tmp, spec_dict(ctx.models, out))
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_IN_SHARD_1, str(spec_path), str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=600,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    assert (out / layout.manifest_part(0)).exists() and not (out / layout.manifest_part(1)).exists()
    assert list((out / layout.image_dir(1)).iterdir())  # the crash left shard 1 half done
    return spec_path


@pytest.mark.usefixtures("prefect_harness")
def test_resume_after_a_crash_records_and_verifies_checksums(ctx: Ctx, monkeypatch, capsys):
    """Crash mid-run, resume with the same command: the committed shard is kept byte for
    byte (checked against its sidecar, not redone), the half-written one is redone, and
    the dataset equals an uninterrupted run. A committed part damaged after the crash is
    refused by the resume, naming it and the repair."""
    out = ctx.tmp / "crashed"
    spec_path = _crash_in_shard_1(ctx, out)
    damaged = ctx.tmp / "crashed-then-damaged"
    shutil.copytree(out, damaged)
    kept = (out / layout.manifest_part(0)).read_bytes()

    code, stdout, err = run_cli(["generate", spec_path, "--no-progress"], monkeypatch, capsys)
    assert code == 0, (stdout, err)
    assert (out / layout.manifest_part(0)).read_bytes() == kept
    assert_intact(out)  # sidecars, identities_sha256 and image sha256s all hold
    assert manifest_rows(str(out)) == manifest_rows(str(ctx.base))
    assert image_hashes(out) == image_hashes(ctx.base)
    info = json.loads((out / layout.DATASET_JSON).read_text())
    assert info["status"] == "complete" and info["identities_sha256"]

    from tests.damage import alter_part_keeping_it_readable

    alter_part_keeping_it_readable(damaged / layout.manifest_part(0))
    before = tree_hashes(damaged)
    spec_path = write_spec(ctx.tmp, spec_dict(ctx.models, damaged), "damaged.yaml")
    code, _, err = run_cli(["generate", spec_path, "--no-progress"], monkeypatch, capsys)
    assert code == 2, err
    assert_one_line_error(err, "manifest part manifest/part-00000.parquet of dataset")
    assert "--redo-damaged" in err
    assert tree_hashes(damaged) == before


@pytest.mark.usefixtures("prefect_harness")
def test_redo_damaged_sets_damaged_shards_aside_and_regenerates_them(
    ctx: Ctx, monkeypatch, capsys
):
    """`generate --redo-damaged` on a dataset whose part 1 was altered (still readable):
    part, sidecar and images of shard 1 move to damaged/<time>/, shard 1 alone is redone,
    and the dataset equals the undamaged one (rows and image bytes); the audit passes."""
    from tests.damage import alter_part_keeping_it_readable

    copy = ctx.copy_base()
    alter_part_keeping_it_readable(copy / layout.manifest_part(1))
    altered = (copy / layout.manifest_part(1)).read_bytes()
    kept = (copy / layout.manifest_part(0)).read_bytes()
    spec_path = write_spec(ctx.tmp, spec_dict(ctx.models, copy))

    code, stdout, err = run_cli(
        ["generate", spec_path, "--no-progress", "--redo-damaged"], monkeypatch, capsys
    )
    assert code == 0, (stdout, err)
    assert "redone 1 damaged shards (00001); their damaged files are kept in" in stdout
    assert (copy / layout.manifest_part(0)).read_bytes() == kept  # not redone
    assert manifest_rows(str(copy)) == manifest_rows(str(ctx.base))
    assert image_hashes(copy) == image_hashes(ctx.base)
    assert_intact(copy)
    (aside,) = (copy / layout.DAMAGED_DIR).iterdir()
    assert (aside / layout.manifest_part(1)).read_bytes() == altered
    assert (aside / layout.part_checksum_path(1)).exists()
    assert {p.name for p in (aside / layout.image_dir(1)).iterdir()} == {
        p.name for p in (ctx.base / layout.image_dir(1)).iterdir()
    }
    code, _, err = run_cli(["audit", copy, "--no-progress"], monkeypatch, capsys)
    assert code == 0, err


@pytest.mark.usefixtures("prefect_harness")
def test_disk_full_mid_run_is_one_line_and_keeps_the_commits(ctx: Ctx, monkeypatch, capsys):
    """The disk fills after the run's first commit: later writes fail, the run ends in one
    line, and the shard committed earlier in the same run survives whole; a re-run once
    there is space completes the dataset."""
    import errno

    out = ctx.fresh()
    spec_path = write_spec(ctx.tmp, spec_dict(ctx.models, out))
    commits = []
    commit_shard, ensure_parent = DatasetWriter.commit_shard, DatasetWriter._ensure_parent

    def counted_commit(self, shard, table, **options):
        written = commit_shard(self, shard, table, **options)
        commits.append(shard)
        return written

    def full_after_first_commit(self, path):  # every write goes through here first
        if commits:
            raise OSError(errno.ENOSPC, "No space left on device")
        return ensure_parent(self, path)

    monkeypatch.setattr(DatasetWriter, "commit_shard", counted_commit)
    monkeypatch.setattr(DatasetWriter, "_ensure_parent", full_after_first_commit)
    code, stdout, err = run_cli(["generate", spec_path, "--no-progress"], monkeypatch, capsys)
    assert code == 2, (stdout, err)
    assert_one_line_error(err, "no space left on the device: free space or choose another")
    (first,) = commits
    assert sorted(out.glob("manifest/part-*.parquet")) == [out / layout.manifest_part(first)]
    assert DatasetReader(str(out)).damaged_parts() == []  # committed whole, before the fault
    for row in manifest_rows(str(out)):
        if row["path"]:
            assert hashlib.sha256((out / row["path"]).read_bytes()).hexdigest() == row["sha256"]

    monkeypatch.undo()
    code, stdout, err = run_cli(["generate", spec_path, "--no-progress"], monkeypatch, capsys)
    assert code == 0, (stdout, err)
    assert manifest_rows(str(out)) == manifest_rows(str(ctx.base))
    assert image_hashes(out) == image_hashes(ctx.base)


@pytest.mark.usefixtures("prefect_harness")
def test_model_file_broken_after_preflight_fails_the_shard_once_naming_it(
    ctx: Ctx, monkeypatch, capsys
):
    """A weights file that breaks between preflight and the shard (a disk going bad, a
    sync overwriting it) is a user error: not retried, and the message names the file."""
    from arc2face_engine.job import preflight

    models = ctx.copy_models()
    out = ctx.fresh()
    spec_path = write_spec(ctx.tmp, spec_dict(models, out))
    real_preflight = preflight.preflight

    def preflight_then_break(spec, **options):
        built = real_preflight(spec, **options)
        truncate(models / "arc2face" / "diffusion_pytorch_model.safetensors")
        return built

    monkeypatch.setattr(preflight, "preflight", preflight_then_break)
    code, _out, err = run_cli(["generate", spec_path, "--no-progress"], monkeypatch, capsys)
    assert code == 2, err
    assert_one_line_error(err, "arc2face/diffusion_pytorch_model.safetensors")
    assert "re-run the same command" not in err
    assert not list((out / "manifest").glob("part-*.parquet"))


# --- the lease on an object store ----------------------------------------------------------------


def test_lease_on_an_object_store(s3_uri):
    uri, options = s3_uri
    writer = DatasetWriter(uri + "/ds", options)
    first = WriterLease(writer.fs, writer.root, writer.uri, ttl_s=2.0, heartbeat_s=0.5)
    with first:
        with pytest.raises(OutputInUse, match=f"being written by run {first.token}"):
            WriterLease(writer.fs, writer.root, writer.uri).acquire()
        beat = read_lease(writer.fs, writer.root).heartbeat_at
        time.sleep(2.5)  # longer than the ttl: only the heartbeat keeps it live
        current = read_lease(writer.fs, writer.root)
        assert current.run_id == first.token and current.heartbeat_at > beat
        assert current.is_live()
        leased = DatasetWriter(uri + "/ds", options, lease_token=first.token)
        leased.write_image(0, "id-a-v0000-a00", b"in flight", "jpg")
        with pytest.raises(LeaseLost):
            begin_shard(DatasetWriter(uri + "/ds", options, lease_token="someone-else"), 0)
        assert writer.fs.exists(writer.path("images/00000/id-a-v0000-a00.jpg"))
    assert read_lease(writer.fs, writer.root) is None  # released

    # A lease whose heartbeat stopped (its run was killed) is taken over after its ttl.
    stale = WriterLease(writer.fs, writer.root, writer.uri, ttl_s=1.0, heartbeat_s=0.5)
    stale.acquire()
    stale._stop.set()  # the run dies: no more heartbeats, no release
    stale._thread.join()
    time.sleep(1.2)
    with WriterLease(writer.fs, writer.root, writer.uri) as taker:
        assert read_lease(writer.fs, writer.root).run_id == taker.token
        with pytest.raises(LeaseLost, match="no longer holds"):
            DatasetWriter(uri + "/ds", options, lease_token=stale.token).commit_shard(
                0, MANIFEST_SCHEMA.empty_table()
            )


def test_skipped_photos_are_listed_before_anything_is_written(ctx: Ctx, capsys):
    """Identities from photos are built at preflight, in plain Python: the skipped files
    reach the console (not Prefect's log) and nothing is written yet."""
    from arc2face_engine.job import preflight
    from tests.test_job_identities import _disc_photo

    folder = ctx.tmp / "photos"
    folder.mkdir()
    _disc_photo(folder / "a.png", (64, 64))
    _disc_photo(folder / "empty.png", None)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    raw = spec_dict(ctx.models, ctx.fresh(), identities={"source": "images", "path": str(folder)})
    preflight.preflight(JobSpec.model_validate(raw))
    printed = capsys.readouterr().out
    assert "skipped empty.png: no face detected" in printed
    assert "skipped broken.jpg: cannot decode" in printed
    assert not ctx.fresh().exists()
