"""Datasets in the released schema: loading, bad rows reported by index, missing columns named, image sizes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from qlora_rft.data import load_split, resize_image
from qlora_rft.errors import DataError
from qlora_rft.tasks import get_task
from qlora_rft.tasks.synthetic import write_parquet

TASK = get_task("classification")


def _png(colour=(200, 0, 0), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(tmp_path, rows, name="train.parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_synthetic_source_is_generated_and_loaded():
    data = load_split("synthetic:shapes", "train", TASK)
    assert len(data) == 512 and not data.skipped
    assert data.examples[0].solution.startswith("<answer>") and "shape" in data.examples[0].problem


def test_parquet_file_with_released_schema(tmp_path):
    rows = [{"image": Image.new("RGB", (30, 30), "red"), "problem": "q?", "solution": "<answer>red</answer>"}]
    path = tmp_path / "train.parquet"
    write_parquet(rows, path)
    data = load_split(str(path), "train", TASK)
    assert len(data) == 1 and data.examples[0].problem == "q?"


def test_bad_rows_are_skipped_with_their_index_or_refused(tmp_path):
    good = {"image": {"bytes": _png(), "path": None}, "problem": "q", "solution": "<answer>red</answer>"}
    rows = [
        good,
        {"image": {"bytes": b"not an image", "path": None}, "problem": "q", "solution": "<answer>red</answer>"},
        {**good, "solution": "<answer></answer>"},
        good,
    ]
    path = _write(tmp_path, rows)
    data = load_split(str(path), "train", TASK)
    assert [e.index for e in data.examples] == [0, 3]
    assert [b.index for b in data.skipped] == [1, 2]
    assert "image does not decode" in data.skipped[0].reason and "does not parse" in data.skipped[1].reason
    with pytest.raises(DataError, match="row 1: image does not decode"):
        load_split(str(path), "train", TASK, on_bad_row="error")


def test_missing_column_names_the_column_and_the_file(tmp_path):
    path = _write(tmp_path, [{"image": {"bytes": _png(), "path": None}, "question": "q", "solution": "x"}])
    with pytest.raises(DataError, match=r"has no column 'problem'.*train.parquet|train.parquet.*no column 'problem'"):
        load_split(str(path), "train", TASK)


def test_missing_source_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        load_split(str(tmp_path / "nothing-here"), "train", TASK)


def test_resize_follows_qwen_rule():
    image = Image.new("RGB", (1000, 500))
    resized = resize_image(image, min_pixels=3136, max_pixels=401408)
    w, h = resized.size
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 401408
    assert abs(w / h - 2.0) < 0.1
    tiny = resize_image(Image.new("RGB", (20, 20)), min_pixels=3136, max_pixels=401408)
    assert tiny.size[0] * tiny.size[1] >= 3136


def test_lisa_json_file_with_an_image_root(tmp_path):
    import json

    from qlora_rft.tasks.grounding import problem

    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (50, 40), "blue").save(images / "a.png")
    records = [
        {"image": "a.png", "text": "the thing to sit on", "box": [10, 20, 300, 400]},
        {"image": "missing.png", "problem": problem("x"), "solution": "<answer>(1,2),(3,4)</answer>"},
    ]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(records))
    data = load_split(str(path), "val", get_task("grounding"), image_root=str(images))
    assert [e.index for e in data.examples] == [0]
    assert data.examples[0].solution == "<answer>(10,20),(300,400)</answer>"
    assert [b.index for b in data.skipped] == [1] and "image does not decode" in data.skipped[0].reason
