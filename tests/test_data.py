"""Datasets in the released schema: loading, bad rows reported by index, missing columns named, image sizes;
images checked at load (decoded in full, the resize rule), high bit depths, large images kept resized, empty data."""

from __future__ import annotations

import io
import json
import warnings
from functools import partial

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from qlora_rft.data import Example, load_split, open_image, resize_image, to_rgb
from qlora_rft.errors import DataError
from qlora_rft.tasks import get_task
from qlora_rft.tasks.synthetic import write_parquet

TASK = get_task("classification")
PIXELS = dict(min_pixels=3136, max_pixels=401408, factor=28)  # data.* defaults, Qwen2-VL's token side
load_split = partial(load_split, **PIXELS)


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


def test_only_a_source_named_as_a_hub_dataset_is_ever_fetched(tmp_path, monkeypatch):
    import os

    import datasets

    fetched = []

    def load_dataset(name, *args, **kwargs):
        fetched.append(name)
        raise datasets.exceptions.DatasetNotFoundError(f"no {name} here")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    for missing in ("data/x", "x", "data/ViRFT_COCO_8_cate_4_shot", "./x", "~/nowhere/x"):
        with pytest.raises(DataError, match=f"{missing} does not exist .no such file or folder, relative to "
                                            f"{tmp_path}.: name a local file or folder, or a dataset of the Hugging "
                                            "Face hub as hub:ORG/NAME"):
            load_split(missing, "train", TASK)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(DataError, match="pipe is neither a regular file nor a folder"):
        load_split("pipe", "train", TASK)
    assert fetched == []
    with pytest.raises(DataError, match="cannot load split 'train' of hub:org/name: no org/name here"):
        load_split("hub:org/name", "train", TASK)
    assert fetched == ["org/name"]


def test_an_empty_data_source_is_refused_at_load():
    from qlora_rft.config import load_config
    from qlora_rft.errors import ConfigError

    with pytest.raises(ConfigError, match="data.train is empty: name the training data"):
        load_config(None, ["data.train="])


def test_resize_follows_qwen_rule():
    image = Image.new("RGB", (1000, 500))
    resized = resize_image(image, **PIXELS)
    w, h = resized.size
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 401408
    assert abs(w / h - 2.0) < 0.1
    tiny = resize_image(Image.new("RGB", (20, 20)), **PIXELS)
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
    assert [(b.index, b.reason) for b in data.skipped] == [(1, f"image {images / 'missing.png'} does not exist")]


# ----------------------------------------------------------------------------- images checked at load


def _encoded(image: Image.Image, format="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def _row(image_bytes: bytes) -> dict:
    return {"image": {"bytes": image_bytes, "path": None}, "problem": "q", "solution": "<answer>red</answer>"}


def _noise(size) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_truncated_jpeg_is_a_bad_row_at_load(tmp_path):
    jpeg = _encoded(_noise((64, 48)), "JPEG")
    path = _write(tmp_path, [_row(_png()), _row(jpeg[: len(jpeg) // 2])])
    data = load_split(str(path), "train", TASK)
    assert [e.index for e in data.examples] == [0] and [b.index for b in data.skipped] == [1]
    assert "image does not decode" in data.skipped[0].reason and "truncated" in data.skipped[0].reason
    with pytest.raises(DataError, match="row 1: image does not decode.*truncated"):
        load_split(str(path), "train", TASK, on_bad_row="error")


def test_images_the_resize_rule_refuses_are_bad_rows(tmp_path):
    # qwen-vl-utils refuses an aspect ratio over 200; a 300x30 image under max_pixels=7056 would resize to 252x0.
    path = _write(tmp_path, [_row(_png(size=(201, 1))), _row(_png(size=(300, 30))), _row(_png())])
    data = load_split(str(path), "train", TASK, min_pixels=3136, max_pixels=7056, factor=28)
    assert [e.index for e in data.examples] == [2] and [b.index for b in data.skipped] == [0, 1]
    assert "201x1" in data.skipped[0].reason and "aspect ratio must be smaller than 200" in data.skipped[0].reason
    assert "300x30" in data.skipped[1].reason and "252x0" in data.skipped[1].reason
    with pytest.raises(DataError, match="row 0: image 201x1 .*aspect ratio"):
        load_split(str(path), "train", TASK, on_bad_row="error", min_pixels=3136, max_pixels=7056, factor=28)
    assert len(load_split(str(path), "train", TASK, **PIXELS).examples) == 2


def test_high_bit_depth_greyscale_is_scaled_by_its_bit_depth(tmp_path):
    values = np.array([[0, 32896, 65535, 1028]], dtype=np.uint16)  # 8-bit: 0, 128, 255, 4
    png = _encoded(Image.fromarray(values))
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    path = _write(tmp_path, [_row(png)])
    image = open_image(load_split(str(path), "train", TASK).examples[0])
    assert image.mode == "RGB" and np.asarray(image)[0, :, 0].tolist() == [0, 128, 255, 4]
    assert np.asarray(image)[0, 2].tolist() == [255, 255, 255]
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert np.asarray(to_rgb(big_endian))[0, :, 1].tolist() == [0, 128, 255, 4]
    as_int = Image.open(io.BytesIO(_encoded(Image.fromarray(values.astype(np.int32)), "TIFF")))
    assert as_int.mode == "I" and np.asarray(to_rgb(as_int))[0, :, 2].tolist() == [0, 128, 255, 4]
    unit_floats = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))  # 0..1 -> 0..255
    assert np.asarray(to_rgb(unit_floats))[0, :, 0].tolist() == [0, 64, 255]
    byte_floats = Image.fromarray(np.array([[0.0, 64.0, 255.0, 300.0]], dtype=np.float32))  # 0..255 as they are
    assert np.asarray(to_rgb(byte_floats))[0, :, 0].tolist() == [0, 64, 255, 255]


def test_other_modes_become_rgb_as_pil_converts_them():
    for mode, colour in (("P", 3), ("LA", (90, 200)), ("RGBA", (10, 20, 30, 0)), ("CMYK", (0, 255, 0, 0)),
                         ("L", 77), ("1", 1)):
        image = Image.new(mode, (3, 2), colour)
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB"))), mode


def test_large_image_is_decoded_once_and_kept_at_its_resized_size(tmp_path):
    original = _noise((400, 300))  # 120000 pixels, over 16 x max_pixels
    pixels = dict(min_pixels=3136, max_pixels=6272, factor=28)
    path = _write(tmp_path, [_row(_encoded(original)), _row(_png())])
    out = io.StringIO()
    data = load_split(str(path), "train", TASK, console=Console(file=out, width=200), **pixels)
    assert data.downsized == [0]
    expected = resize_image(original, **pixels)
    with Image.open(io.BytesIO(data.examples[0].image["bytes"])) as kept:
        assert kept.size == expected.size == (84, 56)
    assert np.array_equal(np.asarray(resize_image(open_image(data.examples[0]), **pixels)), np.asarray(expected))
    assert data.examples[1].image["bytes"] == _png()  # small images are kept as they are
    assert "1 large image" in out.getvalue() and "400x300" in out.getvalue()


def test_decompression_bomb_is_a_bad_row_and_a_large_image_no_hidden_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    bomb, large = _noise((100, 100)), _noise((70, 60))  # over 2x the limit: PIL refuses; between 1x and 2x: warns
    path = _write(tmp_path, [_row(_encoded(bomb)), _row(_encoded(large))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_split(str(path), "train", TASK, console=Console(file=io.StringIO()))
    assert [b.index for b in data.skipped] == [0] and "decompression bomb" in data.skipped[0].reason
    assert data.downsized == [1]
    assert np.array_equal(np.asarray(resize_image(open_image(data.examples[0]), **PIXELS)),
                          np.asarray(resize_image(large, **PIXELS)))


def test_empty_data_is_a_one_line_data_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("problem", pa.string()), ("solution", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty\.parquet split 'train' has no rows"):
        load_split(str(tmp_path / "empty.parquet"), "train", TASK)
    (tmp_path / "folder").mkdir()
    pq.write_table(schema.empty_table(), tmp_path / "folder" / "test-00000.parquet")
    with pytest.raises(DataError, match=r"folder split 'test' has no rows"):
        load_split(str(tmp_path / "folder"), "test", TASK)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json split 'val' has no rows"):
        load_split(str(tmp_path / "empty.json"), "val", get_task("grounding"))
    bad = _write(tmp_path, [_row(b"junk"), _row(b"junk")])
    with pytest.raises(DataError, match=r"train\.parquet split 'train' has no usable rows: all 2 are bad "
                                        r"\(row 0: image does not decode"):
        load_split(str(bad), "train", TASK)


def test_detection_images_are_checked_before_the_model_loads(tmp_path, capsys):
    from qlora_rft.config import load_config
    from qlora_rft.evaluation.runner import detection_items

    (tmp_path / "ok.png").write_bytes(_encoded(_noise((400, 300))))
    (tmp_path / "cut.jpg").write_bytes(_encoded(_noise((64, 48)), "JPEG")[:300])
    coco = {"images": [{"id": 1, "file_name": "ok.png", "width": 400, "height": 300},
                       {"id": 2, "file_name": "cut.jpg", "width": 64, "height": 48},
                       {"id": 3, "file_name": "gone.png", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50]}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    overrides = ["data.task=detection", f"eval.annotations={tmp_path / 'ann.json'}", "eval.classes=all",
                 "data.max_pixels=6272"]
    with pytest.raises(DataError, match=r"cut\.jpg.*image does not decode"):
        detection_items(load_config(None, [*overrides, "data.on_bad_row=error"]))
    items = detection_items(load_config(None, overrides))
    assert [it.key for it in items] == ["1|cat", "1|dog"]
    assert items[0].example.image is items[1].example.image  # decoded once for every class
    assert Image.open(io.BytesIO(items[0].example.image["bytes"])).size == (84, 56)
    err = capsys.readouterr().err
    assert "skipped 2 of 3 images" in err and "gone.png" in err and "1 large image" in err
    (tmp_path / "ok.png").unlink()
    with pytest.raises(DataError, match="no usable images"):
        detection_items(load_config(None, overrides))



def test_only_regular_files_are_images_so_a_fifo_never_blocks(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "good.png").write_bytes(_png())
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    rows = [{"image": name, "problem": "What colour?", "solution": "<answer>red</answer>"}
            for name in ("good.png", "pipe.png", "link.png", "folder.png")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    def hung(*_):
        raise TimeoutError("loading blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        data = load_split(str(tmp_path / "train.jsonl"), "train", TASK)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [ex.index for ex in data.examples] == [0]
    assert [(b.index, b.reason) for b in data.skipped] == [
        (1, f"image {tmp_path / 'pipe.png'} is not a regular file"),
        (2, f"image {tmp_path / 'link.png'} is not a regular file"),
        (3, f"image {tmp_path / 'folder.png'} is not a regular file")]

    root = Path(__file__).parents[1]  # the process: one line, exit 2, before any model loads
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "qlora_rft", "eval", "configs/tiny_demo.yaml",
                           f"data.eval={tmp_path / 'train.jsonl'}", "data.eval_split=train", "data.on_bad_row=error",
                           f"eval.output_dir={tmp_path / 'eval'}"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"row 1: image {tmp_path / 'pipe.png'} is not a regular file" in proc.stderr


def test_a_row_holding_a_vision_token_is_a_bad_row_decided_at_load(tmp_path, capsys):
    from qlora_rft.cli import main

    (tmp_path / "a.png").write_bytes(_png())
    rows = [{"image": "a.png", "problem": "What colour?", "solution": "<answer>red</answer>"},
            {"image": "a.png", "problem": "What colour? <|image_pad|>", "solution": "<answer>red</answer>"},
            {"image": "a.png", "problem": "What colour?", "solution": "<answer>red<|vision_start|></answer>"},
            {"image": "a.png", "problem": "Compare <|video_pad|> with it", "solution": "<answer>red</answer>"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_split(str(tmp_path / "train.jsonl"), "train", TASK)
    assert [ex.index for ex in data.examples] == [0]
    assert [(b.index, b.reason) for b in data.skipped] == [
        (1, "problem holds the vision token <|image_pad|> (the processor would take it for an image slot)"),
        (2, "solution holds the vision token <|vision_start|> (the processor would take it for an image slot)"),
        (3, "problem holds the vision token <|video_pad|> (the processor would take it for an image slot)")]
    code = main(["eval", "configs/tiny_demo.yaml", f"data.eval={tmp_path / 'train.jsonl'}", "data.eval_split=train",
                 "data.on_bad_row=error", f"eval.output_dir={tmp_path / 'eval'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "row 1: problem holds the vision token <|image_pad|>" in err


def test_a_json_list_is_rows_as_a_jsonl_holds_them_unless_the_task_has_forms_of_its_own(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    (tmp_path / "img" / "b.png").write_bytes(_png((0, 0, 200)))
    rows = [{"image": "img/a.png", "problem": "What colour?", "solution": "<answer>red</answer>", "hint": "warm"},
            {"images": ["img/a.png", "img/b.png"], "problem": "Which is red?", "solution": "<answer>first</answer>",
             "hint": "left"}]
    (tmp_path / "train.json").write_text("\ufeff" + json.dumps(rows))  # a byte-order mark, as some editors write
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for task in (TASK, get_task("generic")):
        listed = load_split(str(tmp_path / "train.json"), "train", task)
        lined = load_split(str(tmp_path / "train.jsonl"), "train", task)
        assert listed.examples == lined.examples and not listed.skipped
        assert [ex.columns["hint"] for ex in listed.examples] == ["warm", "left"]
        assert [len(ex.images) for ex in listed.examples] == [1, 2]
        assert listed.examples[1].images[1]["path"] == str(tmp_path / "img" / "b.png")
    assert load_split(str(tmp_path), "train", TASK).examples == listed.examples  # TRAIN.json in a folder

    # grounding reads its own LISA forms from a .json (an instruction and a 0-1000 box, here)
    (tmp_path / "val.json").write_text(json.dumps([{"image": "img/a.png", "text": "the red one", "box": [0, 0, 9, 9]}]))
    (ex,) = load_split(str(tmp_path / "val.json"), "val", get_task("grounding")).examples
    assert "the red one" in ex.problem and ex.solution == "<answer>(0,0),(9,9)</answer>"

    (tmp_path / "object.json").write_text(json.dumps({"rows": rows}))
    with pytest.raises(DataError, match=r"object\.json must hold a JSON list of rows, not a dict"):
        load_split(str(tmp_path / "object.json"), "train", TASK)
    (tmp_path / "mixed.json").write_text(json.dumps([rows[0], "text"]))
    with pytest.raises(DataError, match=r"mixed\.json item 1 is not a JSON object \(a str\)"):
        load_split(str(tmp_path / "mixed.json"), "train", TASK)
    (tmp_path / "cut.json").write_text(json.dumps(rows)[:-5])
    with pytest.raises(DataError, match=r"cut\.json is not valid JSON"):
        load_split(str(tmp_path / "cut.json"), "train", TASK)
