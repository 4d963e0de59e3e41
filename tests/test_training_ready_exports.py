"""Training-ready exports: label map, 112x112 by default, HF dataset card, DALI RecordIO, and a
default RecordIO export that trains arcface_torch's IResNet for one step."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from arc2face_engine.exports import export_dataset
from schemas.tables import MANIFEST_SCHEMA
from tests.dataset_factory import make_dataset, rewrite_part
from tests.test_exports import read_indexed, unpack_irheader

FORMATS = ("imagefolder", "webdataset", "recordio", "hf")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory):
    """3 identities; identity 1 has no accepted image (every row rejected)."""
    root = tmp_path_factory.mktemp("ready") / "ds"
    result = make_dataset(str(root), n_identities=3, images_per_identity=2, shards=1,
                          reject_every=0)  # fmt: skip
    part = root / "manifest" / "part-00000.parquet"
    rows = pq.read_table(part).to_pylist()
    for row in rows:
        if row["identity_id"] == "id-000001":
            row.update(accepted=False, reject_reason="low_similarity")
    rewrite_part(part, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    return result


def _label_map(out: Path) -> list[dict]:
    with open(out / "label_map.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("fmt", FORMATS)
def test_label_map_names_every_label(made, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / fmt
    result = export_dataset(made.uri, str(out), fmt)
    assert result.dropped == 1 and result.images == 4
    assert _label_map(out) == [
        {"label": "0", "identity_id": "id-000000", "source_label": "0", "images": "2"},
        {"label": "1", "identity_id": "id-000002", "source_label": "2", "images": "2"},
    ]


def test_dataset_labels_keep_empty_classes(made, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    result = export_dataset(made.uri, str(out), "recordio", labels="dataset")
    assert result.dropped == 1 and result.identities == 3
    assert [row["images"] for row in _label_map(out)] == ["2", "0", "2"]
    assert (out / "property").read_text() == "3,112,112\n"
    records = read_indexed(out)
    header = unpack_irheader(records[0])[1]
    labels = {int(unpack_irheader(records[i])[1]) for i in range(1, int(header[0]))}
    assert labels == {0, 2}  # identity 1's class exists, with no image


def test_alignment_is_the_default_and_no_align_keeps_the_size(made, tmp_path: Path) -> None:
    aligned = tmp_path / "aligned"
    export_dataset(made.uri, str(aligned), "imagefolder")
    sizes = {Image.open(path).size for path in aligned.glob("*/*.jpg")}
    assert sizes == {(112, 112)}
    kept = tmp_path / "kept"
    export_dataset(made.uri, str(kept), "imagefolder", align=False)
    assert {Image.open(path).size for path in kept.glob("*/*.jpg")} == {(64, 64)}


def test_hf_card_has_yaml_metadata_and_loads(made, tmp_path: Path, monkeypatch, caplog) -> None:
    import json
    import logging

    info_path = Path(made.uri) / "dataset.json"
    info = json.loads(info_path.read_text())
    info["spec"]["license"] = "cc-by-nc-4.0"
    info_path.write_text(json.dumps(info))
    out = tmp_path / "hf"
    export_dataset(made.uri, str(out), "hf")
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["license"] == "cc-by-nc-4.0"
    features = {feature["name"]: feature["dtype"] for feature in metadata["dataset_info"]["features"]}
    assert features["image"] == "image"
    assert features["label"] == {"class_label": {"names": {"0": "id-000000", "1": "id-000002"}}}
    assert features["similarity"] == "float32" and features["accepted"] == "bool"
    # num_bytes: the Arrow size of the rows (datasets ignores a split without it, warning)
    split = metadata["dataset_info"]["splits"]
    assert [(s["name"], s["num_examples"]) for s in split] == [("train", 4)]
    num_bytes = split[0]["num_bytes"]
    assert metadata["dataset_info"]["dataset_size"] == num_bytes > 0
    parquet_bytes = sum(path.stat().st_size for path in out.glob("data/*.parquet"))
    assert metadata["dataset_info"]["download_size"] == parquet_bytes
    assert metadata["configs"][0]["data_files"][0]["path"] == "data/train-*"
    # the Hub's loader reads the card: the folder alone is enough
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import datasets

    with caplog.at_level(logging.WARNING, logger="datasets"):
        loaded = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    warned = [record.getMessage() for record in caplog.records if record.name.startswith("datasets")]
    assert warned == []  # e.g. "The `splits` field in YAML is malformed ..."
    assert len(loaded) == 4 and loaded.features["label"].names == ["id-000000", "id-000002"]
    assert num_bytes == loaded.data.nbytes  # the rows as datasets holds them in Arrow
    assert loaded[0]["image"].size == (112, 112)


def test_dali_recordio_is_images_only_keys_0_to_n(made, tmp_path: Path) -> None:
    out = tmp_path / "dali"
    result = export_dataset(made.uri, str(out), "recordio", dali=True, shuffle_seed=3)
    records = read_indexed(out)
    assert sorted(records) == list(range(result.images)) == [0, 1, 2, 3]
    keys = [int(line.split("\t")[0]) for line in (out / "train.idx").read_text().splitlines()]
    assert keys == [0, 1, 2, 3]  # file order is key order, as shuffle_rec.py writes
    names = [row["identity_id"] for row in _label_map(out)]
    ids = []
    for key in keys:
        flag, label, record_id, _, body = unpack_irheader(records[key])
        assert flag == 0 and 1 <= record_id <= 4  # the MXFaceDataset index is kept in the id
        assert Image.open(io.BytesIO(body)).size == (112, 112)
        ids.append(record_id)
        assert names[int(label)] in ("id-000000", "id-000002")
    assert sorted(ids) == [1, 2, 3, 4]
    again = tmp_path / "dali2"
    export_dataset(made.uri, str(again), "recordio", dali=True, shuffle_seed=3)
    assert (again / "train.rec").read_bytes() == (out / "train.rec").read_bytes()


# --- arcface_torch's IResNet, one training step -------------------------------------------------
# Architecture facts from insightface recognition/arcface_torch/backbones/iresnet.py: a 3x3
# stem (64, stride 1) + BN + PReLU, four stages of IBasicBlocks (BN, conv3x3, BN, PReLU,
# conv3x3 with the stage's stride 2, BN; 1x1 conv + BN shortcut) of 64/128/256/512 channels,
# then BN, flatten, fc from 512*7*7 to 512 and a BatchNorm1d: the input must be 112x112.
# iresnet18 has [2, 2, 2, 2] blocks, the smallest depth arcface_torch ships.


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_features: int = 512) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        stages, inplanes = [], 64
        for planes, blocks in zip((64, 128, 256, 512), layers, strict=True):
            stage = [IBasicBlock(inplanes, planes, 2)]
            stage += [IBasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def arcface_loss(embeddings, weight, labels, s: float = 64.0, m: float = 0.5) -> torch.Tensor:
    """ArcFace (additive angular margin) on normalised embeddings and class centres."""
    cosine = nn.functional.normalize(embeddings) @ nn.functional.normalize(weight).T
    target = cosine.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)
    cosine = cosine.scatter(1, labels[:, None], torch.cos(torch.acos(target) + m))
    return nn.functional.cross_entropy(s * cosine, labels)


def mx_face_batch(folder: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What arcface_torch's MXFaceDataset serves: images range(1, header0.label[0]), label from
    the header, RGB, (x / 255 - 0.5) / 0.5; read with the tests' independent RecordIO reader."""
    records = read_indexed(folder)
    first_identity = int(unpack_irheader(records[0])[1][0])
    images, labels = [], []
    for index in range(1, first_identity):
        _, label, _, _, body = unpack_irheader(records[index])
        pixels = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.float32)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1) / 255.0)
        labels.append(int(label))
    num_classes = int((folder / "property").read_text().split(",")[0])
    return (torch.stack(images) - 0.5) / 0.5, torch.tensor(labels), num_classes


def test_default_recordio_trains_iresnet_one_step(made, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    export_dataset(made.uri, str(out), "recordio")  # default options
    images, labels, num_classes = mx_face_batch(out)
    assert images.shape == (4, 3, 112, 112) and num_classes == 2
    torch.manual_seed(0)
    model = IResNet()
    centres = nn.Parameter(torch.randn(num_classes, 512) * 0.01)
    optimizer = torch.optim.SGD([*model.parameters(), centres], lr=0.1, momentum=0.9)
    before = model.fc.weight.detach().clone()
    loss = arcface_loss(model(images), centres, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert not torch.equal(before, model.fc.weight)  # the step changed the weights
