"""Hostile archives are data, not instructions: names leaving the source (`..`, absolute,
links), RecordIO offsets and lengths that lie, WebDataset key collisions, files that are
no image or are too large: each is a manifest row with its reason, nothing is read from
outside the source and nothing is written outside --out."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.exports.recordio import IndexedRecordWriter, encode_record, pack
from arc2face_engine.imports.base import MAX_IMAGE_BYTES
from arc2face_engine.ingest.direct import run_import_directly
from schemas.imports import parse_import_spec
from tests.dataset_factory import face_like_image, jpeg_bytes

SECRET = b"\xff\xd8\xff\xe0 top secret bytes outside the source"


def face_jpeg(index: int) -> bytes:
    return jpeg_bytes(face_like_image(64, index, np.random.default_rng(index)))


def tree(root: Path, skip: Path) -> dict[str, bytes]:
    """Every file under `root` except those under `skip`, with its bytes."""
    found = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == skip or skip in Path(folder).parents:
            dirs[:] = []
            continue
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                found[str(path)] = path.read_bytes()
    return found


def import_hostile(source: Path, fmt: str, tmp_path: Path, models: Path, **options) -> dict:
    """Import `source` into tmp_path/out; checks nothing outside out changed and that no
    byte of SECRET's file reached the dataset; returns the rows by source name (a list
    when a name repeats)."""
    out = tmp_path / "out"
    before = tree(tmp_path, out)
    spec = parse_import_spec(dict(source=str(source), format=fmt, out=str(out),
                                  models_dir=str(models), **options))  # fmt: skip
    run_import_directly(spec)
    assert tree(tmp_path, out) == before  # nothing written (or changed) outside --out
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_bytes(), path
    rows: dict = {}
    for row in DatasetReader(str(out)).manifest().to_pylist():
        name = row["source_name"]
        rows[name] = [*rows[name], row] if isinstance(rows.get(name), list) else (
            [rows[name], row] if name in rows else row)  # fmt: skip
    return rows


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header states width x height (with valid CRCs) and holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_hostile_image_folder(tiny_models, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(SECRET)
    source = tmp_path / "src"
    alice = source / "alice"
    alice.mkdir(parents=True)
    (alice / "good.jpg").write_bytes(face_jpeg(1))
    (alice / "escape.jpg").symlink_to(outside / "secret.jpg")
    (alice / "inside.jpg").symlink_to(alice / "good.jpg")
    (alice / "loop").symlink_to(alice, target_is_directory=True)
    (alice / "notes.txt").write_text("no image")
    (alice / "truncated.jpg").write_bytes(face_jpeg(2)[:200])
    (alice / "huge.png").write_bytes(png_header(20_000, 20_000))  # a decompression bomb
    (alice / "wide.png").write_bytes(png_header(16_385, 10))  # small, but over the side bound
    with open(alice / "big.jpg", "wb") as handle:  # sparse: over the byte bound, never read
        handle.truncate(MAX_IMAGE_BYTES + 1)
    (source / "evil").symlink_to(outside, target_is_directory=True)

    rows = import_hostile(source, "imagefolder", tmp_path, tiny_models)
    reasons = {name: row["reject_reason"] for name, row in rows.items()}
    assert reasons["alice/escape.jpg"] == "unsafe_name"
    assert reasons["alice/loop"] == "unsafe_name"  # links to folders are never followed
    assert reasons["evil"] == "unsafe_name" and rows["evil"]["label"] == -1
    assert reasons["alice/notes.txt"] == reasons["alice/truncated.jpg"] == "unreadable"
    assert reasons["alice/huge.png"] == reasons["alice/big.jpg"] == "too_large"
    assert reasons["alice/wide.png"] == "too_large"
    assert rows["alice/inside.jpg"]["sha256"] == rows["alice/good.jpg"]["sha256"]  # stays inside
    refused = [row for row in rows.values() if row["reject_reason"] in ("unsafe_name", "too_large")]
    assert all(row["path"] is None and row["sha256"] is None for row in refused)


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
         link: str = "") -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = len(data), kind, link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_hostile_webdataset(tiny_models, tmp_path):
    source = tmp_path / "wds"
    source.mkdir()
    with tarfile.open(source / "shard-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "good.jpg", face_jpeg(1))
        _add(tar, "good.cls", b"0")
        _add(tar, "../escape.jpg", face_jpeg(2))
        _add(tar, "../escape.cls", b"0")
        _add(tar, "/abs/evil.jpg", face_jpeg(3))
        _add(tar, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "link.cls", b"0")
        _add(tar, "text.jpg", b"not an image at all")
        _add(tar, "text.cls", b"1")
        _add(tar, "twice.jpg", face_jpeg(4))
        _add(tar, "twice.jpg", face_jpeg(5))
        _add(tar, "twice.cls", b"0")
        _add(tar, "good.jpg", face_jpeg(6))  # the key `good` again, in a later run
        _add(tar, "good.cls", b"0")
    rows = import_hostile(source, "webdataset", tmp_path, tiny_models)
    good = rows.pop("shard-000000.tar:good.jpg")  # two samples of the key `good`
    assert [row["reject_reason"] for row in good][1] == "duplicate_key"
    assert good[0]["reject_reason"] != "duplicate_key"
    reasons = {name.split(":", 1)[1]: row["reject_reason"] for name, row in rows.items()}
    labels = {name.split(":", 1)[1]: row["source_label"] for name, row in rows.items()}
    assert reasons["../escape.jpg"] == reasons["/abs/evil.jpg"] == "unsafe_name"
    assert labels["../escape.jpg"] is None  # its label member is unsafe too: ignored
    assert reasons["link.jpg"] == "unsafe_name" and labels["link.jpg"] == "0"  # a link member
    assert reasons["text.jpg"] == "unreadable"
    assert reasons["twice.jpg"] == "duplicate_key"  # a field given twice


def _record_file(folder: Path, records: list[tuple[int, bytes]]) -> dict[int, int]:
    """train.rec/train.idx from (key, payload) pairs; returns key -> offset."""
    folder.mkdir(parents=True, exist_ok=True)
    offsets = {}
    with open(folder / "train.rec", "wb") as rec, open(folder / "train.idx", "wb") as idx:
        writer = IndexedRecordWriter(rec, idx)
        for key, payload in records:
            offsets[key] = writer.position
            writer.write(key, payload)
    return offsets


def test_hostile_recordio(tiny_models, tmp_path):
    folder = tmp_path / "rec"
    images = {key: pack(0 if key < 3 else 1, face_jpeg(key), key) for key in range(1, 7)}
    images[5] = pack(0, face_jpeg(5), 5)  # in identity 1's range, but says label 0
    records = [*images.items(), (7, pack((1, 3), b"", 7)), (8, pack((3, 7), b"", 8)),
               (0, pack((7, 9), b"", 0, 1))]  # fmt: skip
    offsets = _record_file(folder, records)
    size = (folder / "train.rec").stat().st_size
    with open(folder / "train.rec", "r+b") as rec:  # key 4 claims more bytes than the file holds
        rec.seek(offsets[4] + 4)
        rec.write(struct.pack("<I", (1 << 29) - 4))
    lines = (folder / "train.idx").read_text().splitlines()
    lines = [f"2\t{offsets[2] + 12}" if line.startswith("2\t") else line for line in lines]
    lines = [f"6\t{size + 1000}" if line.startswith("6\t") else line for line in lines]
    (folder / "train.idx").write_text("\n".join([*lines, "garbage line"]) + "\n")

    rows = import_hostile(folder, "recordio", tmp_path, tiny_models, aligned=False)
    reason = {int(name.split("key ")[1].split()[0]) if "key" in name else name: row["reject_reason"]
              for name, row in rows.items()}  # fmt: skip
    assert reason[2] == "bad_record"  # offset inside a record: no magic number there
    assert reason[4] == "bad_record"  # length runs past the end of the file
    assert reason[5] == "bad_record"  # its header disagrees with its identity range
    assert reason[6] == "bad_record"  # offset past the end of the file
    assert reason["train.idx line 10"] == "bad_record"
    assert reason[1] != "bad_record" and reason[3] != "bad_record"
    labels = {row["source_label"] for row in rows.values()}
    assert labels == {"0", "1", None}  # the garbage line has no label


def test_recordio_payload_over_the_image_bound_is_never_read(tiny_models, tmp_path):
    folder = tmp_path / "rec"
    small = pack(0, face_jpeg(1), 0)
    _record_file(folder, [(0, small)])
    with open(folder / "train.rec", "ab") as rec, open(folder / "train.idx", "a") as idx:
        offset = rec.tell()
        rec.write(struct.pack("<II", 0xCED7230A, MAX_IMAGE_BYTES + (1 << 20)))
        rec.write(pack(0, b"", 1))
        idx.write(f"1\t{offset}\n")
    with open(folder / "train.rec", "r+b") as rec:  # sparse: the bytes it claims exist
        rec.truncate(offset + 8 + MAX_IMAGE_BYTES + (1 << 20))
    rows = import_hostile(folder, "recordio", tmp_path, tiny_models, aligned=False)
    assert rows["train.rec key 1"]["reject_reason"] == "too_large"
    assert rows["train.rec key 0"]["reject_reason"] != "too_large"


def test_recordio_records_split_at_the_magic_number_are_joined(tiny_models, tmp_path):
    payload = pack(0, face_jpeg(1) + b"\0" * (-len(face_jpeg(1)) % 4) + struct.pack("<I", 0xCED7230A) * 2, 0)
    assert encode_record(payload).count(struct.pack("<I", 0xCED7230A)) > 1
    _record_file(tmp_path / "rec", [(0, payload)])
    rows = import_hostile(tmp_path / "rec", "recordio", tmp_path, tiny_models, aligned=False)
    assert rows["train.rec key 0"]["reject_reason"] != "bad_record"
    assert rows["train.rec key 0"]["size_bytes"] == len(payload) - 24  # the image bytes, whole


def test_hostile_hf_parquet(tiny_models, tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    image = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    images = [{"bytes": face_jpeg(1), "path": "a.jpg"}, None,
              {"bytes": b"plain text", "path": "t.jpg"}, {"bytes": face_jpeg(2), "path": "n.jpg"}]  # fmt: skip
    table = pa.table({"image": pa.array(images, image), "label": pa.array(["x", "x", "x", None])})
    pq.write_table(table, source / "train.parquet")
    rows = import_hostile(source, "hf", tmp_path, tiny_models)
    assert rows["train.parquet#1"]["reject_reason"] == "unreadable"  # null image
    assert rows["train.parquet#2"]["reject_reason"] == "unreadable"  # not an image
    assert rows["train.parquet#3"]["reject_reason"] == "no_label"
    assert rows["train.parquet#0"]["source_label"] == "x"
    with pytest.raises(Exception, match="no column 'cls'"):
        run_import_directly(parse_import_spec(dict(
            source=str(source), format="hf", out=str(tmp_path / "o2"),
            models_dir=str(tiny_models), label_field="cls")))  # fmt: skip
