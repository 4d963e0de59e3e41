"""Dataset IO: layout, atomic shard commit, resume checks and the streaming reader,
on a local folder and on an S3 API served on loopback by moto."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pytest

from arc2face_engine.dataset import attempt as attempt_module
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.attempt import ShardAttempt, ShardSuperseded, begin_shard
from arc2face_engine.dataset.lease import WriterLease
from arc2face_engine.dataset.reader import DatasetNotFound, DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.identities.sources import build_identities_table
from schemas.errors import DatasetCorrupt, LeaseLost, SpecError, UserError
from schemas.tables import IDENTITIES_SCHEMA, MANIFEST_SCHEMA, DatasetInfo

pytest_plugins = ["tests.s3_fixture"]


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path) -> tuple[str, dict]:
    """(uri, storage_options) of an empty dataset location."""
    if request.param == "local":
        return str(tmp_path / "ds"), {}
    uri, options = request.getfixturevalue("s3_uri")
    return uri + "/ds", options


def manifest_rows(shard: int, identity: int, variants: int, paths: dict[str, tuple]) -> list[dict]:
    rows = []
    for variant in range(variants):
        image_id = f"id-{identity:06d}-v{variant:04d}-a00"
        path, sha, size = paths.get(image_id, (None, None, None))
        rows.append(
            {
                "image_id": image_id,
                "identity_id": f"id-{identity:06d}",
                "label": identity,
                "shard": shard,
                "variant": variant,
                "attempt": 0,
                "seed": 1000 * identity + variant,
                "path": path,
                "sha256": sha,
                "size_bytes": size,
                "width": 8,
                "height": 8,
                "pose_name": "yaw+00",
                "pose_yaw": 0.0,
                "pose_pitch": 0.0,
                "pose_roll": 0.0,
                "expression_name": None,
                "expression": None,
                "scheduler": "dpmsolver++",
                "steps": 25,
                "guidance": 3.0,
                "controlnet_scale": 1.0,
                "expression_scale": 1.0,
                "face_count": 1,
                "det_score": 0.9,
                "bbox": [0.0, 0.0, 8.0, 8.0],
                "keypoints": [1.0] * 10,
                "measured_yaw": 1.0,
                "measured_pitch": 2.0,
                "measured_roll": 3.0,
                "face_embedding": [0.0] * 512,
                "feature_norm": 20.0 + variant,
                "similarity": 0.5 + variant / 100,
                "predicted_gender": "female",
                "gender_probability": 0.8,
                "predicted_age": 30.0 + variant,
                "skin_ita": 35.0,
                "skin_tone": "intermediate",
                "accepted": variant % 2 == 0,
                "reject_reason": None if variant % 2 == 0 else "low_similarity",
                "source": "generated",
                "source_label": None,
                "source_name": None,
            }
        )
    return rows


def write_shard(writer: DatasetWriter, shard: int, identity: int, variants: int = 3) -> pa.Table:
    paths = {}
    for variant in range(variants):
        image_id = f"id-{identity:06d}-v{variant:04d}-a00"
        paths[image_id] = writer.write_image(shard, image_id, f"{image_id}-bytes".encode(), "jpg")
    table = pa.Table.from_pylist(
        manifest_rows(shard, identity, variants, paths), schema=MANIFEST_SCHEMA
    )
    writer.commit_shard(shard, table)
    return table


def some_identities(count: int) -> pa.Table:
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((count, 512)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return build_identities_table(embeddings, "random", [f"row {i}" for i in range(count)])


def dataset_info(spec_hash: str = "a" * 64) -> DatasetInfo:
    return DatasetInfo(
        name="t", status="in_progress", spec={"name": "t"}, spec_hash=spec_hash, created_at="now"
    )


def test_layout_paths():
    assert layout.manifest_part(0) == "manifest/part-00000.parquet"
    assert layout.manifest_part(123456) == "manifest/part-123456.parquet"
    assert (
        layout.image_path(7, "id-000001-v0002-a00", ".jpg")
        == "images/00007/id-000001-v0002-a00.jpg"
    )
    assert layout.shard_of_part("bucket/x/manifest/part-00042.parquet") == 42
    assert layout.shard_of_part("manifest/.part-00042.parquet.tmp-abc") is None
    assert layout.join("bucket/ds", "images/00000/a.jpg") == "bucket/ds/images/00000/a.jpg"
    for bad in ("../x", "/etc/passwd", "a//b"):
        with pytest.raises(ValueError):
            layout.join("root", bad)
    with pytest.raises(ValueError):
        layout.image_path(0, "../escape", "jpg")


def test_round_trip(target):
    uri, options = target
    writer = DatasetWriter(uri, options)
    assert writer.check_compatible("a" * 64) is None  # empty output: a fresh start
    writer.write_dataset_json(dataset_info())
    identities = some_identities(3)
    writer.write_identities(identities)
    tables = [write_shard(writer, shard, identity=shard) for shard in (1, 0)]
    assert writer.committed_shards() == {0, 1}

    reader = DatasetReader(uri, options)
    assert reader.info().spec_hash == "a" * 64
    assert reader.has_identities()
    assert reader.identities().equals(identities)
    assert reader.identities().schema.equals(IDENTITIES_SCHEMA, check_metadata=False)
    assert reader.manifest_parts() == ["manifest/part-00000.parquet", "manifest/part-00001.parquet"]
    manifest = reader.manifest()
    assert manifest.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    assert manifest.to_pylist() == tables[1].to_pylist() + tables[0].to_pylist()
    for row in manifest.to_pylist():
        data = reader.read_image_bytes(row["path"])
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["size_bytes"]
        with reader.open(row["path"]) as handle:
            assert handle.read() == data


def test_iter_manifest_streams_batches_and_columns(tmp_path):
    writer = DatasetWriter(str(tmp_path))
    for shard in range(3):
        write_shard(writer, shard, identity=shard, variants=5)
    reader = DatasetReader(str(tmp_path))
    batches = list(reader.iter_manifest(columns=["image_id", "accepted"], batch_size=2))
    assert [batch.num_rows for batch in batches] == [2, 2, 1] * 3  # never crosses parts
    assert batches[0].schema.names == ["image_id", "accepted"]
    assert reader.manifest(columns=["similarity"]).num_rows == 15


def test_empty_dataset_reads_as_empty(tmp_path):
    reader = DatasetReader(str(tmp_path / "none"))
    assert reader.manifest_parts() == []
    assert reader.manifest().schema.equals(MANIFEST_SCHEMA)
    assert reader.manifest(columns=["image_id"]).num_rows == 0
    assert not reader.has_identities()
    with pytest.raises(DatasetNotFound, match=r"dataset\.json missing"):
        reader.info()
    assert issubclass(DatasetNotFound, UserError)


def leased(writer: DatasetWriter) -> WriterLease:
    return WriterLease(writer.fs, writer.root, writer.uri, settle_s=0.0)


def write_attempt(attempt: ShardAttempt, identity: int, variants: int = 3) -> pa.Table:
    """Write a shard's images and commit it through one attempt; returns its rows."""
    paths = {}
    for variant in range(variants):
        image_id = f"id-{identity:06d}-v{variant:04d}-a00"
        paths[image_id] = attempt.write_image(image_id, f"{image_id}-bytes".encode(), "jpg")
    rows = manifest_rows(attempt.shard, identity, variants, paths)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    attempt.commit(table)
    return table


def shard_files(writer: DatasetWriter, shard: int) -> list[str]:
    folder = writer.path(layout.image_dir(shard))
    writer.fs.invalidate_cache()
    return sorted(path.rsplit("/", 1)[1] for path in writer.fs.find(folder))


def test_crash_before_commit_leaves_shard_uncommitted_and_rewritable(target):
    uri, options = target
    with leased(DatasetWriter(uri, options)) as lease:
        writer = DatasetWriter(uri, options, lease.token)
        # An interrupted attempt: one image the redo writes again, one it does not.
        writer.write_image(4, "id-000004-v0000-a00", b"half a shard", "jpg")
        writer.write_image(4, "id-000004-v0009-a00", b"rejected by the redo", "jpg")
        assert writer.committed_shards() == set()
        assert DatasetReader(uri, options).manifest_parts() == []
        attempt = begin_shard(writer, 4)
        table = write_attempt(attempt, identity=4)
        assert writer.committed_shards() == {4}
        # After the commit, exactly the files the part names are left, and no claim.
        assert shard_files(writer, 4) == sorted(
            path.rsplit("/", 1)[1] for path in table.column("path").to_pylist()
        )
        assert not writer.fs.exists(attempt.claim_path)
        assert begin_shard(writer, 4) is None  # committed: nothing to do, not an error


def test_attempts_only_under_a_live_lease(tmp_path):
    unleased = DatasetWriter(str(tmp_path))
    unleased.write_image(1, "id-000001-v0000-a00", b"another run's file", "jpg")
    with pytest.raises(ValueError, match="hold the writer lease"):
        begin_shard(unleased, 1)
    stale = DatasetWriter(str(tmp_path), lease_token="not-the-holder")
    with leased(unleased), pytest.raises(LeaseLost, match="no longer holds"):
        begin_shard(stale, 1)
    assert (tmp_path / "images" / "00001" / "id-000001-v0000-a00.jpg").exists()


def test_a_superseded_attempt_cannot_write_or_replace_the_commit(target, monkeypatch):
    """A paused attempt (a zombie worker) resumes after another attempt re-ran and
    committed its shard: it writes nothing more, its commit is refused, and even one
    that slipped past its claim check cannot replace the committed part."""
    monkeypatch.setattr(attempt_module, "FENCE_FRESH_S", 0.0)  # every check re-reads
    uri, options = target
    with leased(DatasetWriter(uri, options)) as lease:
        writer = DatasetWriter(uri, options, lease.token)
        zombie = begin_shard(writer, 6)
        zombie.write_image("id-000006-v0000-a00", b"zombie bytes", "jpg")
        rerun = begin_shard(writer, 6)  # the scheduler re-ran the shard elsewhere
        with pytest.raises(ShardSuperseded):
            zombie.write_image("id-000006-v0001-a00", b"zombie bytes", "jpg")
        committed = write_attempt(rerun, identity=6)
        part = writer.fs.cat_file(writer.path(layout.manifest_part(6)))
        late = committed.set_column(
            committed.schema.get_field_index("similarity"),
            "similarity",
            pa.array([0.1] * committed.num_rows, pa.float32()),
        )
        with pytest.raises(ShardSuperseded):
            zombie.commit(late)
        # The residual window: a write that slipped past its last claim check.
        monkeypatch.setattr(zombie, "check", lambda force=False: None)
        with pytest.raises(ShardSuperseded, match="committed by another attempt first"):
            zombie.commit(late)
        assert writer.fs.cat_file(writer.path(layout.manifest_part(6))) == part
        sidecar = writer.fs.cat_file(writer.path(layout.part_checksum_path(6)))
        assert sidecar.decode().strip() == hashlib.sha256(part).hexdigest()
        assert begin_shard(writer, 6) is None


def test_interrupted_local_rename_is_not_a_commit(tmp_path, monkeypatch):
    """Crash between writing the temp file and renaming it: the shard is not committed."""
    writer = DatasetWriter(str(tmp_path))

    def crash(src, dst):
        raise KeyboardInterrupt("killed mid-commit")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(writer, 2, identity=2)
    monkeypatch.undo()
    assert writer.committed_shards() == set()
    assert not (tmp_path / "manifest" / "part-00002.parquet").exists()


def test_half_written_temp_file_is_ignored_and_cleared(tmp_path):
    (tmp_path / "manifest").mkdir()
    stale = tmp_path / "manifest" / ".part-00003.parquet.tmp-deadbeef"
    stale.write_bytes(b"PAR1 truncated")  # a process killed mid-write left this
    sidecar = tmp_path / "manifest" / "part-00003.parquet.sha256"
    sidecar.write_text("0" * 64 + "\n")  # killed between the checksum and the part
    with leased(DatasetWriter(str(tmp_path))) as lease:
        writer = DatasetWriter(str(tmp_path), lease_token=lease.token)
        assert writer.committed_shards() == set()
        assert DatasetReader(str(tmp_path)).manifest_parts() == []
        write_attempt(begin_shard(writer, 3), identity=3)
        assert stale.exists()  # not worth a listing of manifest/ per shard
        writer.clear_leftovers()  # when the dataset is complete (lifecycle.finalize_dataset)
    assert sorted(os.listdir(tmp_path / "manifest")) == [
        "part-00003.parquet",
        "part-00003.parquet.sha256",
    ]
    part = (tmp_path / "manifest" / "part-00003.parquet").read_bytes()
    assert sidecar.read_text() == hashlib.sha256(part).hexdigest() + "\n"


def test_object_store_commit_is_one_put(s3_uri, monkeypatch):
    """On S3 the part is written by a single pipe_file call of the complete bytes,
    after its checksum sidecar."""
    uri, options = s3_uri
    writer = DatasetWriter(uri + "/ds", options)
    puts = []
    original = writer.fs.pipe_file

    def record(path, data, **kwargs):
        puts.append((path, len(data)))
        return original(path, data, **kwargs)

    monkeypatch.setattr(writer.fs, "pipe_file", record)
    table = pa.Table.from_pylist(manifest_rows(0, 0, 2, {}), schema=MANIFEST_SCHEMA)
    writer.commit_shard(0, table)
    # the checksum sidecar first (CONTRACTS.md), then the part: the part stays the commit
    assert [path.rsplit("/", 2)[-2:] for path, _ in puts] == [
        ["manifest", "part-00000.parquet.sha256"],
        ["manifest", "part-00000.parquet"],
    ]
    assert writer.fs.size(puts[1][0]) == puts[1][1]


def test_commit_validates_the_table(tmp_path):
    writer = DatasetWriter(str(tmp_path))
    rows = manifest_rows(0, 0, 2, {})
    with pytest.raises(ValueError, match="missing \\['similarity'\\]"):
        writer.commit_shard(0, pa.Table.from_pylist(rows).drop_columns(["similarity"]))
    with pytest.raises(ValueError, match="holds rows of shards"):
        writer.commit_shard(1, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    rows[0]["identity_id"] = None
    with pytest.raises(ValueError, match="'identity_id' holds nulls"):
        writer.commit_shard(0, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    twice = manifest_rows(0, 0, 1, {}) * 2
    with pytest.raises(ValueError, match="repeats an image_id"):
        writer.commit_shard(0, pa.Table.from_pylist(twice, schema=MANIFEST_SCHEMA))
    assert writer.committed_shards() == set()


def test_identities_are_validated(tmp_path):
    writer = DatasetWriter(str(tmp_path))
    table = some_identities(3)
    shuffled = table.set_column(
        1, IDENTITIES_SCHEMA.field("label"), pa.array([0, 2, 1], pa.int32())
    )
    with pytest.raises(ValueError, match=r"labels must be 0\.\.N-1"):
        writer.write_identities(shuffled)
    with pytest.raises(ValueError, match="does not match its schema"):
        writer.write_identities(table.drop_columns(["provenance"]))


def test_check_compatible(target):
    uri, options = target
    writer = DatasetWriter(uri, options)
    writer.write_dataset_json(dataset_info("a" * 64))
    write_shard(writer, 0, identity=0)
    resumed = writer.check_compatible("a" * 64)
    assert resumed is not None and resumed.spec_hash == "a" * 64
    with pytest.raises(SpecError) as caught:
        writer.check_compatible("b" * 64)
    message = str(caught.value)
    assert message == (
        f"output {uri} already holds a dataset made from a different spec "
        f"(hash {'a' * 12} != {'b' * 12}): choose a new output.uri or delete it"
    )


def test_non_empty_output_without_dataset_json_is_refused(target):
    uri, options = target
    writer = DatasetWriter(uri, options)
    writer.write_bytes("notes.txt", b"someone else's files")
    with pytest.raises(SpecError, match=r"is not empty and holds no dataset\.json"):
        writer.check_compatible("a" * 64)


def test_corrupt_dataset_json_is_a_user_error(tmp_path):
    writer = DatasetWriter(str(tmp_path))
    writer.write_bytes(layout.DATASET_JSON, b"{not json")
    with pytest.raises(DatasetCorrupt, match=r"corrupt dataset\.json \(top level: Invalid JSON"):
        writer.check_compatible("a" * 64)
    writer.write_bytes(layout.DATASET_JSON, b'{"name": 3}')
    with pytest.raises(DatasetCorrupt, match=r"corrupt dataset\.json \(name: Input should be"):
        writer.check_compatible("a" * 64)


def test_dataset_json_round_trip_and_overwrite(target):
    uri, options = target
    writer = DatasetWriter(uri, options)
    assert writer.read_dataset_json() is None
    info = dataset_info()
    writer.write_dataset_json(info)
    info.status = "complete"
    info.counts.images = 12
    writer.write_dataset_json(info)
    assert writer.read_dataset_json() == info
    assert DatasetReader(uri, options).info() == info


def test_the_flow_waits_for_a_superseded_shard_to_be_committed(tmp_path):
    """A paused worker's attempt returns superseded while the attempt that took its shard
    over is still at work: the wait before finalize sees that attempt's commit, and names
    a shard nobody commits once its time is up."""
    import threading

    from arc2face_engine.job.lifecycle import wait_for_commits
    from schemas.job import parse_spec

    spec = parse_spec({"name": "x", "output": {"uri": str(tmp_path / "ds")}})
    with leased(DatasetWriter(spec.output.uri)) as lease:
        writer = DatasetWriter(spec.output.uri, lease_token=lease.token)
        rerun = begin_shard(writer, 4)
        late = threading.Timer(1.0, lambda: write_attempt(rerun, identity=4))
        late.start()
        assert wait_for_commits(spec, [4], timeout_s=30, every_s=0.1) == []
        late.join()
        assert wait_for_commits(spec, [4, 5], timeout_s=0.3, every_s=0.1) == [5]
