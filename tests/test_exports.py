"""Exports: RecordIO read back by an independent parser, ImageFolder, WebDataset, HF Parquet."""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arc2face_engine.dataset.reader import DatasetNotFound
from arc2face_engine.exports import DamagedDataset, ExportError, export_dataset
from arc2face_engine.exports.recordio import encode_record, pack
from tests.dataset_factory import make_dataset

MAGIC = 0xCED7230A


# --- an independent RecordIO reader (dmlc-core semantics, written from the format spec) ------


def read_records(rec: bytes, offset: int) -> bytes:
    """Reassemble the logical record starting at `offset`."""
    pieces = []
    while True:
        magic, lrecord = struct.unpack_from("<II", rec, offset)
        assert magic == MAGIC, f"no magic at {offset}"
        cflag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
        pieces.append(rec[offset + 8 : offset + 8 + length])
        offset += 8 + ((length + 3) // 4) * 4
        if cflag in (0, 3):
            return struct.pack("<I", MAGIC).join(pieces)
        assert cflag in (1, 2)


def unpack_irheader(payload: bytes) -> tuple[int, object, int, int, bytes]:
    flag, label, record_id, id2 = struct.unpack_from("<IfQQ", payload)
    body = payload[24:]
    if flag > 0:
        label = np.frombuffer(body[: 4 * flag], dtype=np.float32).tolist()
        body = body[4 * flag :]
    return flag, label, record_id, id2, body


def read_indexed(folder: Path) -> dict[int, bytes]:
    rec = (folder / "train.rec").read_bytes()
    index = {}
    for line in (folder / "train.idx").read_text().splitlines():
        key, offset = line.split("\t")
        index[int(key)] = read_records(rec, int(offset))
    return index


def test_encode_record_hand_computed_layout() -> None:
    magic = struct.pack("<I", MAGIC)
    assert encode_record(b"abcde") == magic + struct.pack("<I", 5) + b"abcde\0\0\0"
    assert encode_record(b"") == magic + struct.pack("<I", 0)
    # magic at aligned offsets 4 and 12 splits; the unaligned one at 18 does not
    payload = b"1234" + magic + b"5678" + magic + b"9a" + magic + b"b"
    expected = (
        magic + struct.pack("<I", (1 << 29) | 4) + b"1234"
        + magic + struct.pack("<I", (2 << 29) | 4) + b"5678"
        + magic + struct.pack("<I", (3 << 29) | 7) + b"9a" + magic + b"b" + b"\0"
    )  # fmt: skip
    assert encode_record(payload) == expected
    assert read_records(expected, 0) == payload
    # magic at offset 0 and at the very end
    edge = magic + b"xyzw" + magic
    encoded = encode_record(edge)
    assert encoded[:8] == magic + struct.pack("<I", (1 << 29) | 0)
    assert read_records(encoded, 0) == edge


def test_irheader_with_magic_id_round_trips() -> None:
    payload = pack(7.0, b"jpeg-bytes", record_id=MAGIC)  # id's low word == magic at offset 8
    encoded = encode_record(payload)
    assert struct.unpack_from("<I", encoded, 4)[0] >> 29 == 1  # split into continuation parts
    flag, label, record_id, id2, body = unpack_irheader(read_records(encoded, 0))
    assert (flag, label, record_id, id2, body) == (0, 7.0, MAGIC, 0, b"jpeg-bytes")


@pytest.fixture
def dataset(tmp_path: Path):
    return make_dataset(str(tmp_path / "ds"), n_identities=4, images_per_identity=3, shards=2)


def _files(made) -> dict[str, bytes]:
    """image_id -> file bytes of every image the factory wrote."""
    return {Path(path).stem: (Path(made.uri) / path).read_bytes() for path in made.image_paths}


def _accepted_ids(root: str) -> dict[str, str]:
    """image_id -> identity_id of accepted rows, read straight from the manifest."""
    rows = {}
    for part in sorted((Path(root) / "manifest").glob("part-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            if row["accepted"]:
                rows[row["image_id"]] = row["identity_id"]
    return rows


def _insert_magic_comment(path: Path) -> None:
    """Put a JPEG comment holding the magic at file offset 8 (payload offset 32: aligned)."""
    data = path.read_bytes()
    comment = b"xx" + struct.pack("<I", MAGIC) + b"yy"
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    path.write_bytes(data[:2] + segment + data[2:])


def test_recordio_round_trip(dataset, tmp_path: Path) -> None:
    first = sorted(_accepted_ids(dataset.uri))[0]  # identity 0 lives in shard 0
    _insert_magic_comment(Path(dataset.uri) / f"images/00000/{first}.jpg")
    out = tmp_path / "rec"
    result = export_dataset(dataset.uri, str(out), "recordio", align=False)
    accepted = _accepted_ids(dataset.uri)
    assert result.images == len(accepted) == 12 and result.identities == 4
    assert (out / "property").read_text() == "4,64,64\n"

    records = read_indexed(out)
    flag, label, record_id, id2, _ = unpack_irheader(records[0])
    n_images = len(accepted)
    assert (flag, record_id, id2) == (2, 0, 1) and label == [n_images + 1, n_images + 1 + 4]
    # MXFaceDataset: images are range(1, header0.label[0])
    by_identity: dict[int, list[str]] = {}
    files = _files(dataset)
    for index in range(1, int(label[0])):
        flag, image_label, record_id, _, body = unpack_irheader(records[index])
        assert flag == 0 and record_id == index
        image_id = next(key for key, data in files.items() if data == body)  # byte-identical JPEG
        assert Image.open(io.BytesIO(body)).size == (64, 64)
        by_identity.setdefault(int(image_label), []).append(image_id)
    assert sorted(i for ids in by_identity.values() for i in ids) == sorted(accepted)
    for new_label, ids in by_identity.items():
        assert {accepted[i] for i in ids} == {f"id-{new_label:06d}"}
    # identity records: (start, end) ranges that cover each label's images
    for position, key in enumerate(range(int(label[0]), int(label[1]))):
        _, (start, end), _, _, body = unpack_irheader(records[key])
        assert body == b"" and end - start == len(by_identity[position])
        assert {int(unpack_irheader(records[i])[1]) for i in range(int(start), int(end))} == {
            position
        }
    # the crafted JPEG really produced a continuation record in the file
    rec = (out / "train.rec").read_bytes()
    flags = []
    offset = 0
    while offset < len(rec):
        _, lrecord = struct.unpack_from("<II", rec, offset)
        flags.append(lrecord >> 29)
        offset += 8 + (((lrecord & ((1 << 29) - 1)) + 3) // 4) * 4
    assert 1 in flags and 3 in flags


def test_imagefolder(dataset, tmp_path: Path) -> None:
    out = tmp_path / "folder"
    result = export_dataset(dataset.uri, str(out), "imagefolder")
    accepted = _accepted_ids(dataset.uri)
    with open(out / "labels.csv") as handle:
        labels = list(csv.DictReader(handle))
    assert [row["identity_id"] for row in labels] == [f"id-{i:06d}" for i in range(4)]
    exported = sorted(out.glob("*/*.jpg"))
    assert len(exported) == result.images == len(accepted)
    for path in exported:
        assert accepted[path.stem] == labels[int(path.parent.name)]["identity_id"]
        Image.open(path).load()


def test_include_rejected_exports_every_file(dataset, tmp_path: Path) -> None:
    result = export_dataset(
        dataset.uri, str(tmp_path / "all"), "imagefolder", include_rejected=True
    )
    assert result.images == len(dataset.image_paths) > 12


def test_webdataset_read_back_with_library(dataset, tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "wds"
    result = export_dataset(dataset.uri, str(out), "webdataset", samples_per_shard=5, align=False)
    assert len(result.files) == 4  # 12 samples, 5 per shard, and label_map.csv
    urls = [str(out / f"shard-{i:06d}.tar") for i in range(3)]
    samples = list(
        wds.WebDataset(urls, shardshuffle=False)
        .decode("pil")
        .to_tuple("__key__", "jpg", "cls", "json")
    )
    accepted = _accepted_ids(dataset.uri)
    assert sorted(key for key, *_ in samples) == sorted(accepted)
    for key, image, label, meta in samples:
        assert image.size == (64, 64)
        assert meta["identity_id"] == accepted[key] == f"id-{label:06d}"
        assert meta["label"] == label and meta["accepted"] is True


def test_hf_parquet_loads_with_datasets(dataset, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import datasets

    out = tmp_path / "hf"
    result = export_dataset(dataset.uri, str(out), "hf", rows_per_file=7, align=False)
    assert len(result.files) == 4  # two Parquet files, label_map.csv, README.md
    loaded = datasets.load_dataset(
        "parquet", data_files=sorted(str(p) for p in (out / "data").glob("*.parquet")),
        split="train", cache_dir=str(tmp_path / "hf-cache"),
    )  # fmt: skip
    assert isinstance(loaded.features["image"], datasets.Image)
    names = loaded.features["label"].names
    assert names == [f"id-{i:06d}" for i in range(4)]
    accepted = _accepted_ids(dataset.uri)
    assert len(loaded) == len(accepted)
    files = _files(dataset)
    for row in loaded:
        assert row["image"].size == (64, 64)
        assert names[row["label"]] == accepted[row["image_id"]] == row["identity_id"]
        with Image.open(io.BytesIO(files[row["image_id"]])) as original:
            assert np.array_equal(
                np.asarray(original.convert("RGB")), np.asarray(row["image"].convert("RGB"))
            )


def test_webdataset_json_is_valid(dataset, tmp_path: Path) -> None:
    import tarfile

    out = tmp_path / "wds1"
    export_dataset(dataset.uri, str(out), "wds")
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[2]).read())
    assert names[:3] == [f"{meta['image_id']}.{ext}" for ext in ("jpg", "cls", "json")]


def test_unknown_format_is_a_user_error(dataset, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown export format 'tfrecord'"):
        export_dataset(dataset.uri, str(tmp_path / "x"), "tfrecord")


def test_missing_dataset_is_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match=r"no dataset at .*nope"):
        export_dataset(str(tmp_path / "nope"), str(tmp_path / "out"), "imagefolder")


def _one_line_naming(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message and "arc2face-synth audit" in message, message
    for word in words:
        assert word in message, message


def test_corrupt_manifest_part_names_the_part(tmp_path: Path) -> None:
    made = make_dataset(str(tmp_path / "ds"), n_identities=2, images_per_identity=2)
    (tmp_path / "ds" / "manifest" / "part-00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(
        DamagedDataset, match=r"manifest part .*part-00001\.parquet of dataset .* is damaged"
    ) as e:
        export_dataset(made.uri, str(tmp_path / "out"), "imagefolder")
    _one_line_naming(e, made.uri)


def test_damaged_images_name_the_image(tmp_path: Path) -> None:
    made = make_dataset(str(tmp_path / "ds"), n_identities=2, images_per_identity=2)
    first = sorted(_accepted_ids(made.uri))[0]
    broken = Path(made.uri) / f"images/00000/{first}.jpg"
    broken.write_bytes(b"garbage, not an image")
    with pytest.raises(DamagedDataset, match="cannot be decoded") as e:
        export_dataset(made.uri, str(tmp_path / "out"), "imagefolder")
    _one_line_naming(e, f"images/00000/{first}.jpg")
    broken.unlink()
    with pytest.raises(DamagedDataset, match="is missing") as e:
        export_dataset(made.uri, str(tmp_path / "out2"), "recordio")
    _one_line_naming(e, f"images/00000/{first}.jpg")


def test_align_exports_112_crops_by_default(dataset, tmp_path: Path) -> None:
    out = tmp_path / "aligned"
    result = export_dataset(dataset.uri, str(out), "recordio")
    assert (out / "property").read_text() == "4,112,112\n"
    records = read_indexed(out)
    body = unpack_irheader(records[1])[4]
    assert Image.open(io.BytesIO(body)).size == (112, 112)
    assert result.images == 12


def test_export_from_s3(s3_uri, tmp_path: Path) -> None:
    uri, options = s3_uri
    made = make_dataset(f"{uri}/ds", n_identities=2, images_per_identity=2, shards=1,
                        storage_options=options)  # fmt: skip
    result = export_dataset(made.uri, f"{uri}/out", "imagefolder", storage_options=options)
    assert result.images == 4
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{uri}/out", **options)
    assert len(fs.glob(f"{root}/*/*.jpg")) == 4 and fs.exists(f"{root}/labels.csv")


def test_object_store_out_checks(s3_uri) -> None:
    """--out on an object store: a non-empty prefix, an object, or a prefix inside the
    dataset is refused with nothing written; --overwrite replaces instead of merging."""
    import fsspec

    uri, options = s3_uri
    made = make_dataset(f"{uri}/ds", n_identities=2, images_per_identity=2, shards=1,
                        storage_options=options)  # fmt: skip
    fs, bucket = fsspec.core.url_to_fs(uri, **options)
    fs.pipe(f"{bucket}/out/stale/old.jpg", b"stale class")
    fs.pipe(f"{bucket}/single-object", b"not a folder")
    before = {path: fs.cat(path) for path in fs.find(bucket)}

    def export(out: str, **kwargs):
        return export_dataset(made.uri, out, "imagefolder", storage_options=options, **kwargs)

    refusals = [
        (f"{uri}/out", "is not empty: pass --overwrite"),
        (f"{uri}/single-object", "is a file"),
        (f"{uri}/ds/exported", "is inside the dataset"),
    ]
    for out, message in refusals:
        with pytest.raises(ExportError, match=message):
            export(out)
        fs.invalidate_cache()
        assert {path: fs.cat(path) for path in fs.find(bucket)} == before, out

    assert export(f"{uri}/out", overwrite=True).images == 4
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/stale/old.jpg")
    assert len(fs.glob(f"{bucket}/out/*/*.jpg")) == 4
