"""Expression banks: file formats, validation and clamping, the random prior, SMIRK errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from arc2face_engine.controls.expressions import (
    EXPRESSION_STD,
    Expression,
    ExpressionBank,
    clamp_to_ranges,
    extract_with_smirk,
    load_expression_bank,
)
from schemas.errors import BankError, ModelFileMissing
from schemas.tables import EXPRESSION_DIM


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def in_range_rows(count: int, seed: int = 0) -> np.ndarray:
    """Valid vectors: small expression values, eyelids in [0, 1], jaw inside its limits."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(scale=0.5, size=(count, EXPRESSION_DIM))
    rows[:, 50:52] = rng.uniform(0, 1, size=(count, 2))
    rows[:, 52] = rng.uniform(0, 0.3, size=count)
    rows[:, 53:55] = rng.uniform(-0.2, 0.2, size=(count, 2))
    return rows.astype(np.float32)


def test_expression_dim_is_55():
    assert EXPRESSION_DIM == 55 == 50 + 2 + 3


def test_parquet_round_trip(tmp_path: Path):
    rows = in_range_rows(3)
    bank = ExpressionBank.from_arrays(["smile", "frown", "o"], rows, "test")
    bank.save(str(tmp_path / "bank.parquet"))
    loaded = ExpressionBank.from_file(str(tmp_path / "bank.parquet"))
    assert loaded.names == ["smile", "frown", "o"]
    np.testing.assert_array_equal(loaded.values(), rows)
    assert all(e.values.dtype == np.float32 and e.values.shape == (55,) for e in loaded)
    schema = pq.read_schema(tmp_path / "bank.parquet")
    assert schema.field("values").type == pa.list_(pa.float32(), 55)


@pytest.mark.parametrize("name", ["bank.yaml", "bank.yml"])
def test_save_yaml_round_trip(tmp_path: Path, name: str):
    rows = in_range_rows(2)
    bank = ExpressionBank.from_arrays(["smile", "frown"], rows, "test")
    bank.save(str(tmp_path / name))
    assert list(yaml.safe_load((tmp_path / name).read_text())) == ["smile", "frown"]
    loaded = ExpressionBank.from_file(str(tmp_path / name))
    assert loaded.names == ["smile", "frown"]
    np.testing.assert_array_equal(loaded.values(), bank.values())


@pytest.mark.parametrize("name", ["exp.npy", "exp.csv", "exp"])
def test_save_refuses_other_suffixes(tmp_path: Path, name: str):
    with pytest.raises(BankError, match=r"use \.parquet, \.yaml, \.yml") as error:
        ExpressionBank.neutral().save(str(tmp_path / name))
    message = one_line(error)
    assert name in message
    assert ("lose the names" in message) == name.endswith(".npy")
    assert not (tmp_path / name).exists()


def test_yaml_save_refuses_duplicate_names(tmp_path: Path):
    rows = in_range_rows(2)
    bank = ExpressionBank.from_arrays(["same", "same"], rows, "test")
    with pytest.raises(BankError, match="'same' repeats"):
        bank.save(str(tmp_path / "bank.yaml"))


def test_parquet_round_trip_on_s3(s3_uri):
    uri, storage_options = s3_uri
    bank = ExpressionBank.random(4, seed=3)
    bank.save(f"{uri}/exp.parquet", storage_options=storage_options)
    loaded = ExpressionBank.from_file(f"{uri}/exp.parquet", storage_options=storage_options)
    np.testing.assert_array_equal(loaded.values(), bank.values())


def test_parquet_with_scalar_columns(tmp_path: Path):
    rows = in_range_rows(2)
    columns = {"name": ["a", "b"], **{f"e{i}": rows[:, i] for i in range(55)}}
    pq.write_table(pa.table(columns), tmp_path / "wide.parquet")
    loaded = ExpressionBank.from_file(str(tmp_path / "wide.parquet"))
    assert loaded.names == ["a", "b"]
    np.testing.assert_allclose(loaded.values(), rows)


def test_npy_round_trip(tmp_path: Path):
    rows = in_range_rows(4)
    np.save(tmp_path / "bank.npy", rows)
    loaded = ExpressionBank.from_file(str(tmp_path / "bank.npy"))
    assert loaded.names == ["exp-000", "exp-001", "exp-002", "exp-003"]
    np.testing.assert_array_equal(loaded.values(), rows)


def test_single_npy_vector_is_one_expression(tmp_path: Path):
    np.save(tmp_path / "one.npy", in_range_rows(1)[0])
    assert len(ExpressionBank.from_file(str(tmp_path / "one.npy"))) == 1


def test_yaml_round_trip(tmp_path: Path):
    rows = in_range_rows(2)
    content = {"smile": rows[0].tolist(), "surprise": rows[1].tolist()}
    (tmp_path / "bank.yaml").write_text(yaml.safe_dump(content))
    loaded = ExpressionBank.from_file(str(tmp_path / "bank.yaml"))
    assert loaded.names == ["smile", "surprise"]
    np.testing.assert_array_equal(loaded.values(), rows)


@pytest.mark.parametrize("suffix", ["parquet", "npy", "yaml"])
def test_wrong_length_names_the_row(tmp_path: Path, suffix: str):
    good, short = in_range_rows(1)[0].tolist(), in_range_rows(1)[0][:54].tolist()
    path = tmp_path / f"bank.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.table({"name": ["ok", "short"], "values": [good, short]}), path)
    elif suffix == "yaml":
        path.write_text(yaml.safe_dump({"ok": good, "short": short}))
    else:
        np.save(path, np.zeros((2, 54)))
    with pytest.raises(BankError) as error:
        ExpressionBank.from_file(str(path))
    message = one_line(error)
    assert str(path) in message and "54 values" in message
    assert ("row 1" in message) if suffix != "npy" else ("row 0" in message)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_rejected(tmp_path: Path, bad: float):
    rows = in_range_rows(3).astype(np.float64)
    rows[2, 7] = bad
    np.save(tmp_path / "bank.npy", rows)
    with pytest.raises(BankError) as error:
        ExpressionBank.from_file(str(tmp_path / "bank.npy"))
    assert "row 2" in one_line(error)


def test_out_of_range_values_are_clamped_with_a_count(tmp_path: Path):
    rows = in_range_rows(2).astype(np.float64)
    rows[0, 3] = 7.0  # expression > 3
    rows[1, 50] = -0.5  # eyelid < 0
    rows[1, 52] = -0.1  # jaw opening < 0
    rows[1, 54] = 0.9  # jaw side > 0.2
    np.save(tmp_path / "bank.npy", rows)
    with pytest.warns(UserWarning, match="clamped 4 value"):
        bank = ExpressionBank.from_file(str(tmp_path / "bank.npy"))
    values = bank.values()
    assert values[0, 3] == 3.0 and values[1, 50] == 0.0
    assert values[1, 52] == 0.0 and values[1, 54] == pytest.approx(0.2)
    untouched = np.ones_like(rows, dtype=bool)
    untouched[[0, 1, 1, 1], [3, 50, 52, 54]] = False
    np.testing.assert_allclose(values[untouched], rows[untouched], rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bank.csv", b"a,b\n", "unknown type"),
        ("bank.yaml", b"- just\n- a list\n", "not a mapping"),
        ("bank.yaml", b"smile: [1, 2\n", "not valid YAML"),
        ("bank.yaml", b"smile: [a, b]\n", "non-numeric"),
        ("bank.parquet", b"PAR1 nope", "not valid Parquet"),
        ("bank.npy", b"\x93NUMPY garbage", "not a numeric .npy"),
    ],
)
def test_bad_files_are_one_line_bank_errors(
    tmp_path: Path, name: str, content: bytes, expected: str
):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BankError) as error:
        ExpressionBank.from_file(str(tmp_path / name))
    message = one_line(error)
    assert name in message and expected in message


def test_missing_file_is_a_bank_error(tmp_path: Path):
    with pytest.raises(BankError) as error:
        ExpressionBank.from_file(str(tmp_path / "nope.npy"))
    assert "does not exist" in one_line(error)


def test_random_prior_is_reproducible_and_in_range():
    first = ExpressionBank.random(6, seed=11)
    np.testing.assert_array_equal(first.values(), ExpressionBank.random(6, seed=11).values())
    assert not np.array_equal(first.values(), ExpressionBank.random(6, seed=12).values())
    assert first.names == [f"rand-{i:03d}" for i in range(6)]

    wide = ExpressionBank.random(4000, seed=0, spread=3.0).values()
    np.testing.assert_array_equal(wide, clamp_to_ranges(wide).astype(np.float32))
    assert wide[:, :50].min() == -3.0 and wide[:, :50].max() == 3.0  # spread 3 hits the clamp
    assert (wide[:, 50:52] >= 0).all() and (wide[:, 50:52] <= 1).all()
    assert (wide[:, 52] >= 0).all() and (np.abs(wide[:, 53:55]) <= 0.2 + 1e-7).all()


def test_random_prior_follows_its_documented_stds():
    values = ExpressionBank.random(4000, seed=1).values().astype(np.float64)
    np.testing.assert_allclose(values[:, :50].std(axis=0), EXPRESSION_STD, rtol=0.1)
    assert values[:, 0].std() > 2 * values[:, 49].std()  # decays like PCA components
    assert 0.1 < values[:, 50:52].mean() < 0.3  # eyelids mostly open
    assert np.corrcoef(values[:, 50], values[:, 51])[0, 1] > 0.8  # blinks are symmetric
    assert values[:, 52].mean() == pytest.approx(0.1 * np.sqrt(2 / np.pi), rel=0.1)


def test_spread_zero_is_neutral_and_neutral_is_zeros():
    assert not ExpressionBank.random(3, seed=0, spread=0.0).values().any()
    neutral = ExpressionBank.neutral()
    assert neutral.names == ["neutral"]
    assert neutral[0].values.dtype == np.float32 and not neutral[0].values.any()
    assert neutral[0].values.shape == (55,)


def test_random_rejects_bad_arguments():
    with pytest.raises(BankError):
        ExpressionBank.random(0, seed=0)
    with pytest.raises(BankError):
        ExpressionBank.random(2, seed=0, spread=-1.0)


class Section:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_load_expression_bank_dispatches_on_kind(tmp_path: Path):
    assert load_expression_bank({"kind": "none"}) is None
    assert load_expression_bank(Section(kind="neutral", path=None)).names == ["neutral"]
    random = load_expression_bank(Section(kind="random", count=3, spread=0.5), seed=4)
    np.testing.assert_array_equal(
        random.values(), ExpressionBank.random(3, seed=4, spread=0.5).values()
    )
    ExpressionBank.neutral().save(str(tmp_path / "n.parquet"))
    from_file = load_expression_bank({"kind": "file", "path": str(tmp_path / "n.parquet")})
    assert from_file.names == ["neutral"]
    with pytest.raises(BankError) as error:
        load_expression_bank({"kind": "file", "path": None})
    assert "needs a path" in one_line(error)
    with pytest.raises(BankError):
        load_expression_bank({"kind": "grimace"})


def test_smirk_without_files_names_the_missing_files(tmp_path: Path):
    with pytest.raises(ModelFileMissing) as error:
        extract_with_smirk(str(tmp_path / "photos"), tmp_path / "models")
    message = one_line(error)
    assert "SMIRK_em1.pt" in message and "face_landmarker.task" in message
    assert "github.com/georgeretsi/smirk" in message

    (tmp_path / "models" / "smirk").mkdir(parents=True)
    (tmp_path / "models" / "smirk" / "SMIRK_em1.pt").write_bytes(b"x")
    with pytest.raises(ModelFileMissing) as error:
        extract_with_smirk(str(tmp_path / "photos"), tmp_path / "models")
    message = one_line(error)
    assert "face_landmarker.task" in message and "SMIRK_em1.pt," not in message


def test_photo_folder_in_a_file_section_routes_to_smirk(tmp_path: Path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ModelFileMissing):
        load_expression_bank(
            {"kind": "file", "path": str(tmp_path / "photos")}, models_dir=tmp_path / "models"
        )


def test_expression_is_frozen():
    expression = Expression("e", np.zeros(55, np.float32))
    with pytest.raises(AttributeError):
        expression.name = "f"  # type: ignore[misc]


def test_smirk_crop_centres_the_landmark_box_at_1_4_scale():
    from arc2face_engine.controls.expressions import _crop_face

    image = np.zeros((300, 400, 3), np.uint8)
    image[100:200, 150:250] = 255  # the landmarks' box, 100 px square
    landmarks = np.array([[150.0, 100.0], [250.0, 200.0], [200.0, 150.0]])
    crop = _crop_face(image, landmarks)
    assert crop.shape == (224, 224, 3)
    rows, cols = np.nonzero(crop[..., 0] > 127)
    assert (rows.mean(), cols.mean()) == pytest.approx((111.5, 111.5), abs=1.0)
    assert cols.max() - cols.min() + 1 == pytest.approx(224 / 1.4, abs=2)
