"""The original's classification evaluation lists (.pth + .txt) converted to parquet: re-rooting, refusals, the real
released files, and an evaluation of a converted set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qlora_rft.cli import main
from qlora_rft.errors import DataError, OutputError, UserError
from qlora_rft.evaluation.classification_lists import QUESTIONS, convert, find_image

RELEASED = Path("/work/shared/data/visual-rft-original/classification")
AUTHORS = "/mnt/petrelfs/liuziyu/LLM_Memory/SimplyRetrieve/CLIP-Cls/data"
REPO = Path(__file__).resolve().parents[1]


def write_list(pth: Path, entries: list[tuple[str, object]], names: list[str] | None = None) -> Path:
    """A .pth shaped as released: a list of one-key dicts {path: {label: int64 scalar tensor, pred_logits: fp16 [10],
    pred_class: int64 [10]}}, and its .txt (no final newline, as released). A label given as a tensor or any other
    object is stored as is."""
    items = []
    for path, label in entries:
        label = torch.tensor(label) if isinstance(label, int) else label
        items.append({path: {"label": label, "pred_logits": torch.rand(10).half(), "pred_class": torch.arange(10)}})
    torch.save(items, pth)
    if names is not None:
        pth.with_suffix(".txt").write_text("\n".join(names))
    return pth


def image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 42), colour).save(path)
    return path


FLOWERS = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]


def test_a_released_shaped_list_is_rerooted_and_loads_as_a_dataset(tmp_path):
    from qlora_rft.data import load_split
    from qlora_rft.tasks import get_task

    root = tmp_path / "images"
    image(root / "oxford_flowers" / "jpg" / "image_00001.jpg")  # found by the tail <set>/jpg/<file>
    image(root / "oxford_flowers" / "jpg" / "image_00002.jpg")
    image(root / "image_00003.jpg")  # found by its file name alone
    pth = write_list(tmp_path / "oxford_flowers.pth", [(f"{AUTHORS}/oxford_flowers/jpg/image_0000{i}.jpg", label)
                                                      for i, label in ((1, 2), (2, 0), (3, 1))], FLOWERS)
    done = convert(pth, root, tmp_path / "out" / "test.parquet")
    assert (done.rows, done.classes, done.missing) == (3, 3, [])
    table = pq.read_table(done.out).to_pylist()
    assert [r["solution"] for r in table] == ["<answer>canterbury bells</answer>", "<answer>pink primrose</answer>",
                                              "<answer>hard-leaved pocket orchid</answer>"]
    assert [r["label"] for r in table] == [2, 0, 1]
    assert [r["image"]["path"] for r in table] == [str(root / "oxford_flowers/jpg/image_00001.jpg"),
                                                   str(root / "oxford_flowers/jpg/image_00002.jpg"),
                                                   str(root / "image_00003.jpg")]
    assert table[0]["original_path"] == f"{AUTHORS}/oxford_flowers/jpg/image_00001.jpg"
    assert {r["problem"] for r in table} == {QUESTIONS["oxford_flowers"]}
    data = load_split(str(done.out), "test", get_task("classification"), "error", min_pixels=784, max_pixels=3136,
                      factor=28)
    assert len(data) == 3 and data.examples[1].solution == "<answer>pink primrose</answer>"


def test_the_question_is_ours_or_the_originals_verbatim(tmp_path):
    from qlora_rft.tasks import get_task
    from qlora_rft.tasks.common import FORMAT_INSTRUCTION

    image(tmp_path / "images" / "1.jpg")
    pth = write_list(tmp_path / "stanford_cars.pth", [(f"{AUTHORS}/stanford_cars/cars_test/1.jpg", 0)], ["a car"])
    ours = convert(pth, tmp_path / "images", tmp_path / "ours.parquet")
    theirs = convert(pth, tmp_path / "images", tmp_path / "theirs.parquet", original_question=True)
    [ours], [theirs] = pq.read_table(ours.out).to_pylist(), pq.read_table(theirs.out).to_pylist()
    short = "This is an image containing a car. Please identify the model of the car based on the image."
    assert get_task("classification").prompt(ours["problem"]) == f"{short} {FORMAT_INSTRUCTION}"
    verbatim = (f"{short}\nOutput the thinking process in <think> </think> and final answer in <answer> </answer> "
                "tags.The output answer format should be as follows:\n<think> ... </think> <answer>species name"
                "</answer>\nPlease strictly follow the format.")
    assert theirs["problem"] == verbatim and get_task("classification").prompt(theirs["problem"]) == verbatim


def test_the_longest_tail_wins_and_a_path_never_climbs_above_the_root(tmp_path):
    root = tmp_path / "root"
    image(root / "images" / "x.jpg")
    image(root / "x.jpg")
    assert find_image("/far/away/images/x.jpg", root) == root / "images" / "x.jpg"
    assert find_image("/far/away/other/x.jpg", root) == root / "x.jpg"
    assert find_image("C:\\data\\images\\x.jpg", root) == root / "images" / "x.jpg"
    image(tmp_path / "secret.jpg")
    assert find_image("/a/../secret.jpg", root) is None  # root/../secret.jpg exists, and is not looked at
    assert find_image("/a/b/none.jpg", root) is None


def test_missing_images_are_refused_with_their_count_and_first_paths_or_left_out(tmp_path):
    root = tmp_path / "images"
    image(root / "image_00001.jpg")
    paths = [f"{AUTHORS}/oxford_flowers/jpg/image_0000{i}.jpg" for i in range(1, 6)]
    pth = write_list(tmp_path / "oxford_flowers.pth", [(p, 0) for p in paths], FLOWERS)
    out = tmp_path / "test.parquet"
    with pytest.raises(DataError) as refused:
        convert(pth, root, out)
    message = str(refused.value)
    assert message.startswith(f"4 of 5 images of {pth} are not under {root}")
    assert f"{paths[1]}, {paths[2]}, {paths[3]}, ..." in message and paths[4] not in message
    assert "--skip-missing" in message and not out.exists()

    done = convert(pth, root, out, skip_missing=True)
    assert done.rows == 1 and done.missing == paths[1:]
    assert pq.read_table(out).num_rows == 1

    (root / "image_00001.jpg").unlink()
    with pytest.raises(DataError, match="5 of 5 images") as none_left:
        convert(pth, root, tmp_path / "none.parquet", skip_missing=True)
    assert "--skip-missing" not in str(none_left.value)


class _Planted:
    """A pickle that runs a shell command creating `marker` when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    pth = write_list(tmp_path / "oxford_flowers.pth", [(f"{AUTHORS}/x.jpg", _Planted(marker))], FLOWERS)
    image(tmp_path / "images" / "x.jpg")
    out = tmp_path / "test.parquet"
    proc = subprocess.run([sys.executable, "-m", "qlora_rft", "convert-classification", str(pth), "--image-root",
                           str(tmp_path / "images"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: {pth} was refused: it holds pickled Python objects (posix.system)")
    assert "could run code" in proc.stderr and proc.stderr.count("\n") == 1
    assert not marker.exists() and not out.exists()
    torch.load(pth, weights_only=False)  # what loading it without weights_only would do
    assert marker.exists()


def _bad_lists(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a .pth beside its .txt, words of the error it must give)."""
    ok = (f"{AUTHORS}/images/x.jpg", 0)
    cases = {
        "a dict": ({"x": 1}, "holds a dict, not a list of {image path"),
        "empty": ([], "holds an empty list"),
        "an entry not a dict": (["x.jpg"], "entry 0 is a str, not a dict"),
        "an empty entry": ([{}], "entry 0 is an empty dict"),
        "no label": ([{"x.jpg": {"pred_class": torch.arange(3)}}], "is not an image path with a record holding"),
        "a float label": ([{"x.jpg": {"label": torch.tensor(1.0)}}], "a label must be one integer"),
        "a vector label": ([{"x.jpg": {"label": torch.tensor([1, 2])}}], "shape [2]"),
    }
    made = {}
    for name, (data, words) in cases.items():
        pth = tmp_path / name.replace(" ", "_") / "set.pth"
        pth.parent.mkdir()
        torch.save(data, pth)
        pth.with_suffix(".txt").write_text("\n".join(FLOWERS))
        made[name] = (pth, words)
    labels = tmp_path / "labels" / "oxford_flowers.pth"
    labels.parent.mkdir()
    made["a label out of range"] = (write_list(labels, [ok, (ok[0], 3), (ok[0], -1)], FLOWERS),
                                    "2 labels outside the 3 classes of the class-name list (labels 0-2; first: "
                                    "label 3 of")
    for name, text, words in [
        ("an empty class list", "\n\n", "is empty"),
        ("a blank line inside", "a\n\nb\n", "line 2 is blank"),
        ("twins once normalised", "Sweet pea\nrose\nsweet_pea", "lines 1 and 3 ('Sweet pea', 'sweet_pea')"),
    ]:
        pth = tmp_path / name.replace(" ", "_") / "oxford_flowers.pth"
        pth.parent.mkdir()
        write_list(pth, [ok])
        pth.with_suffix(".txt").write_text(text)
        made[name] = (pth, words)
    for name, content in [("a text file", "not a torch file\n"), ("another text file", "hello"), ("an empty file", "")]:
        pth = tmp_path / name.replace(" ", "_") / "oxford_flowers.pth"
        pth.parent.mkdir()
        pth.write_text(content)
        pth.with_suffix(".txt").write_text("\n".join(FLOWERS))
        made[name] = (pth, "is not a readable torch.save file")
    return made


def test_bad_lists_are_one_line_errors_with_exit_2(tmp_path, capsys):
    (tmp_path / "images" / "images").mkdir(parents=True)
    (tmp_path / "images" / "images" / "x.jpg").touch()
    for name, (pth, words) in _bad_lists(tmp_path).items():
        problem = [] if pth.stem in QUESTIONS else ["--problem", "Which flower is this?"]
        code = main(["convert-classification", str(pth), "--image-root", str(tmp_path / "images"),
                     "--out", str(pth.parent / "out.parquet"), *problem])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (name, err)
        assert not (pth.parent / "out.parquet").exists(), name


def test_an_existing_output_is_kept_unless_overwrite_and_an_unknown_set_needs_a_question(tmp_path):
    root = tmp_path / "images"
    image(root / "x.jpg")
    pth = write_list(tmp_path / "my_birds.pth", [(f"{AUTHORS}/my_birds/images/x.jpg", 1)], ["wren", "robin"])
    out = tmp_path / "test.parquet"
    with pytest.raises(UserError, match="no question for a set named 'my_birds'.*pass --problem"):
        convert(pth, root, out)
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists: pass --overwrite"):
        convert(pth, root, out, problem="Which bird is this?")
    assert out.read_bytes() == b"keep me"
    convert(pth, root, out, problem="Which bird is this?", overwrite=True)
    [row] = pq.read_table(out).to_pylist()
    assert (row["problem"], row["solution"]) == ("Which bird is this?", "<answer>robin</answer>")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_failed_write_leaves_the_output_as_it_was(tmp_path, monkeypatch):
    from qlora_rft.tasks import synthetic

    root = tmp_path / "images"
    image(root / "x.jpg")
    pth = write_list(tmp_path / "pets.pth", [(f"{AUTHORS}/oxford_pets/images/x.jpg", 0)], ["abyssinian"])
    out = tmp_path / "test.parquet"
    out.write_bytes(b"old")

    def half_then_fail(rows, path):
        Path(path).write_bytes(b"half")
        raise OSError("disk went away")

    monkeypatch.setattr(synthetic, "write_parquet", half_then_fail)
    with pytest.raises(OSError, match="disk went away"):
        convert(pth, root, out, overwrite=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["images", "pets.pth",
                                                                                        "pets.txt", "test.parquet"]


# (set, images, classes, the first entry's tail under the authors' data/ folder and class, a class name with
# punctuation that must survive as written)
RELEASED_SETS = [
    ("fgvc_aircraft", 3333, 100, "fgvc_aircraft/images/1514522.jpg", "707-320", "Tu-134"),
    ("oxford_flowers", 2463, 102, "oxford_flowers/jpg/image_00172.jpg", "passion flower",
     "hard-leaved pocket orchid"),
    ("pets", 3669, 37, "oxford_pets/images/Abyssinian_201.jpg", "abyssinian", "american_pit_bull_terrier"),
    ("stanford_cars", 8041, 196, "stanford_cars/cars_test/00001.jpg", "2007 Suzuki Aerio Sedan",
     "2012 Ram C/V Cargo Van Minivan"),
]


@pytest.mark.skipif(not RELEASED.is_dir(), reason=f"the original's released lists are not at {RELEASED}")
@pytest.mark.parametrize("name,images,classes,first,first_class,odd", RELEASED_SETS)
def test_the_released_lists_convert(tmp_path, name, images, classes, first, first_class, odd):
    """Every entry of the real file, onto a CoOp-style data folder of empty stand-in files (found, not decoded)."""
    entries = torch.load(RELEASED / f"{name}.pth", weights_only=True)
    root = tmp_path / "data"
    for entry in entries:
        [path] = entry
        stand_in = root / path.split("/CLIP-Cls/data/", 1)[1]
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.touch()
    done = convert(RELEASED / f"{name}.pth", root, tmp_path / "test.parquet")
    assert (done.rows, done.classes, done.missing) == (images, classes, [])
    table = pq.read_table(done.out, columns=["image", "solution", "label"]).to_pylist()
    assert table[0]["image"]["path"] == str(root / first)
    assert table[0]["solution"] == f"<answer>{first_class}</answer>"
    solutions = {row["solution"] for row in table}
    assert len(solutions) == classes and f"<answer>{odd}</answer>" in solutions  # every class is evaluated
    assert {row["label"] for row in table} == set(range(classes))


def test_a_converted_list_evaluates_with_qlora_rft_eval(tmp_path, capsys):
    from qlora_rft.evaluation.scoring import score_file

    names = ["red square", "blue cross"]
    root = tmp_path / "data"
    entries = []
    for i in range(4):
        label = i % 2
        image(root / "pets" / "images" / f"{i}.jpg", colour=(200, 30, 30) if label == 0 else (30, 30, 200))
        entries.append((f"{AUTHORS}/pets/images/{i}.jpg", label))
    pth = write_list(tmp_path / "pets.pth", entries, names)
    out = tmp_path / "pets" / "test.parquet"
    assert main(["convert-classification", str(pth), "--image-root", str(root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 4 rows (2 classes) to {out}"
    evaluated = tmp_path / "eval"
    assert main(["eval", str(REPO / "configs" / "synthetic_classification.yaml"), "model.name_or_path=tiny:tiny",
                 f"data.eval={out.parent}", "data.eval_split=test", "data.max_prompt_length=512",
                 "eval.max_new_tokens=8", f"eval.output_dir={evaluated}"]) == 0
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["num_predictions"] == 4 and metrics["skipped"] == 0
    lines = [json.loads(line) for line in (evaluated / "predictions.jsonl").read_text().splitlines()]
    assert [line["solution"] for line in lines] == ["<answer>red square</answer>", "<answer>blue cross</answer>"] * 2
    assert score_file("classification", evaluated / "predictions.jsonl") == metrics


def test_the_output_is_never_one_of_the_inputs(tmp_path):
    from qlora_rft.errors import OutputError

    image(tmp_path / "images" / "image_00001.jpg")
    pth = write_list(tmp_path / "oxford_flowers.pth", [(f"{AUTHORS}/oxford_flowers/jpg/image_00001.jpg", 0)], FLOWERS)
    before = pth.read_bytes(), pth.with_suffix(".txt").read_bytes()
    for out in (pth, pth.with_suffix(".txt")):
        with pytest.raises(OutputError, match="would write over the input"):
            convert(pth, tmp_path / "images", out, overwrite=True)
    assert (pth.read_bytes(), pth.with_suffix(".txt").read_bytes()) == before
