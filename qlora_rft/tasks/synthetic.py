"""Synthetic data in the released schemas, made deterministically from a seed: coloured shapes on a noisy background.

- classification (`shapes`, `shapes-fine`): parquet, columns image/problem/solution; the class is "<colour> <shape>".
- detection (`shapes-detection`): parquet, one row per (image, category) asked, several objects and categories per
  image and some categories absent ('No Objects'); extra columns image_id and category for evaluation.
- grounding (`shapes-grounding`): a LISA-style JSON per split plus an images/ folder; instructions need a small
  reasoning step ("the shape to the left of the blue square").
- video classification (`shapes-colour-change`): mp4 clips of a square that flickers from one colour to another and
  back, and JSON lines {video, problem, solution} asking which colour it turns into (the classification task's
  reward and accuracy): both colours are on screen for as long, so only their order in time answers it.
Small enough for a tiny model on a CPU, so the demo and the tests can show training working end to end.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from qlora_rft.errors import DataError
from qlora_rft.files import atomic_folder
from qlora_rft.tasks import detection, grounding
from qlora_rft.tasks.boxes import to_scale

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 170),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")

CLASSIFICATION_PROBLEM = (
    "This is an image containing a shape. Please identify the colour and the kind of the shape based on the image."
)
GROUNDING_RELATIONS = ("left of", "right of", "largest", "smallest")
CHANGE_COLOURS = ("red", "green", "blue", "yellow")
CHANGE_PROBLEM = "The square changes colour. Which colour does it turn into?"


@dataclass(frozen=True)
class ShapesSpec:
    task: str = "classification"
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("circle", "square")
    train_per_class: int = 64  # classification: images per class; detection / grounding: images in all
    test_per_class: int = 25
    size: int = 84
    side: tuple[float, float] = (1 / 3, 2 / 3)  # shape side as a fraction of the image side (classification)
    seed: int = 0

    @property
    def classes(self) -> list[str]:
        return [f"{c} {s}" for c in self.colours for s in self.shapes]


@dataclass(frozen=True)
class ColourChangeSpec:
    """Clips of one still square, `frames` frames at `fps`, flickering between two colours frame by frame: each
    temporal patch (two frames) shows the first colour, then the second, the answer."""

    task: str = "colour-change"
    train_per_class: int = 128  # clips per final colour
    test_per_class: int = 25
    size: int = 84  # square frames, pixels (three 28-pixel image tokens a side)
    side: tuple[int, int] = (28, 40)  # the square's side, pixels
    frames: int = 4  # at data.video_fps=2 every frame is sampled: two temporal patches
    fps: int = 2
    seed: int = 0
    recipe: int = 2  # changes whenever the drawing does (the cache key)

    @property
    def classes(self) -> list[str]:
        return list(CHANGE_COLOURS)


DATASETS: dict[str, ShapesSpec | ColourChangeSpec] = {
    # The demo: a square covers ~1.8x the area of a cross of the same size, so colour and kind both show in the
    # average colour of patches, which even a small vision tower passes on.
    "shapes": ShapesSpec(shapes=("square", "cross"), side=(0.45, 0.6)),
    # The demo's classes in a few-shot set (4 per class, other images): for RFT-vs-SFT on a warmed base.
    "shapes-4shot": ShapesSpec(shapes=("square", "cross"), side=(0.45, 0.6), train_per_class=4, seed=1),
    "shapes-fine": ShapesSpec(colours=tuple(COLOURS), shapes=SHAPES, train_per_class=4, test_per_class=8),
    "shapes-detection": ShapesSpec(task="detection", shapes=SHAPES, train_per_class=48, test_per_class=24, size=112),
    "shapes-grounding": ShapesSpec(task="grounding", colours=tuple(COLOURS), shapes=SHAPES, train_per_class=96,
                                   test_per_class=48, size=112),
    "shapes-colour-change": ColourChangeSpec(),
}


def corpus_lines() -> list[str]:
    """Text of every synthetic task, for the local tokenizer."""
    lines = [CLASSIFICATION_PROBLEM]
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"<answer>{c} {s}</answer>")
            lines.append(grounding.problem(f"Box the shape to the {GROUNDING_RELATIONS[0]} the {c} {s}."))
    for s in SHAPES:
        lines.append(detection.problem(s))
    lines.append(detection.solution([(12, 40, 300, 512), (500, 610, 980, 999)]))
    lines.append(grounding.solution((100, 200, 300, 400)))
    return lines


# ----------------------------------------------------------------------------- drawing


def _canvas(rng: random.Random, size: int) -> Image.Image:
    bg = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    pixels = image.load()
    for _ in range(size * size // 8):  # speckle noise
        x, y = rng.randrange(size), rng.randrange(size)
        pixels[x, y] = tuple(max(0, v - rng.randint(20, 60)) for v in bg)
    return image


def _paint(image: Image.Image, rng: random.Random, colour: str, shape: str, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[colour])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "cross":
        w = (x1 - x0) // 3
        draw.rectangle([x0 + w, y0, x1 - w, y1], fill=fill)
        draw.rectangle([x0, y0 + w, x1, y1 - w], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_shape(rng: random.Random, colour: str, shape: str, size: int,
               side_range: tuple[float, float] = (1 / 3, 2 / 3)) -> Image.Image:
    """One image: a jittered background with a single shape of random size and place."""
    image = _canvas(rng, size)
    side = rng.randint(round(size * side_range[0]), round(size * side_range[1]))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    _paint(image, rng, colour, shape, (x0, y0, x0 + side, y0 + side))
    return image


def _scene(rng: random.Random, size: int, count: int) -> list[tuple[int, int, int, int]]:
    """`count` non-overlapping square boxes in left-to-right order (distinct x ranges)."""
    slot = size // count
    boxes = []
    for i in range(count):
        side = rng.randint(slot * 5 // 10, slot * 9 // 10)
        x0 = i * slot + rng.randint(0, slot - side)
        y0 = rng.randint(0, size - side)
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


# ----------------------------------------------------------------------------- rows per task


def classification_rows(spec: ShapesSpec, split: str) -> list[dict]:
    per_class = spec.train_per_class if split == "train" else spec.test_per_class
    rng = random.Random(f"{spec.seed}-{split}")
    rows = []
    for _ in range(per_class):
        for label in spec.classes:
            colour, shape = label.split(" ")
            rows.append(
                {
                    "image": draw_shape(rng, colour, shape, spec.size, spec.side),
                    "problem": CLASSIFICATION_PROBLEM,
                    "solution": f"<answer>{label}</answer>",
                }
            )
    rng.shuffle(rows)
    return rows


@dataclass
class Scene:
    image_id: int
    image: Image.Image
    boxes: list[tuple[int, int, int, int]]  # pixels, x1 y1 x2 y2
    kinds: list[str]


def detection_scenes(spec: ShapesSpec, split: str) -> list[Scene]:
    """Images of 1-3 shapes each, kinds drawn from the spec's shapes (so some categories are absent)."""
    images = spec.train_per_class if split == "train" else spec.test_per_class
    rng = random.Random(f"{spec.seed}-{split}-detection")
    scenes = []
    for image_id in range(images):
        boxes = _scene(rng, spec.size, rng.randint(1, 3))
        kinds = [rng.choice(spec.shapes) for _ in boxes]
        image = _canvas(rng, spec.size)
        for box, kind in zip(boxes, kinds):
            _paint(image, rng, rng.choice(spec.colours), kind, box)
        scenes.append(Scene(image_id, image, boxes, kinds))
    return scenes


def detection_rows(spec: ShapesSpec, scenes: list[Scene]) -> list[dict]:
    """One row per (image, category), every category asked, present or not (ViRFT_COCO schema + ids)."""
    rows = []
    for scene in scenes:
        for category in spec.shapes:
            boxes = [b for b, kind in zip(scene.boxes, scene.kinds) if kind == category]
            truth = [tuple(to_scale(b, spec.size, spec.size)) for b in boxes]
            rows.append(
                {
                    "image": scene.image,
                    "problem": detection.problem(category),
                    "solution": detection.solution(truth),
                    "image_id": scene.image_id,
                    "category": category,
                }
            )
    return rows


def coco_annotations(spec: ShapesSpec, scenes: list[Scene], split: str, image_dir: Path) -> dict:
    """The same scenes as a COCO-format annotation file, images saved under image_dir (for mAP evaluation)."""
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(spec.shapes)]
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for scene in scenes:
        name = f"{split}-{scene.image_id:05d}.png"
        scene.image.save(image_dir / name)
        images.append({"id": scene.image_id, "file_name": name, "width": spec.size, "height": spec.size})
        for (x1, y1, x2, y2), kind in zip(scene.boxes, scene.kinds):
            annotations.append({"id": len(annotations) + 1, "image_id": scene.image_id, "category_id": ids[kind],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": categories}


def grounding_records(spec: ShapesSpec, split: str, image_dir: Path) -> list[dict]:
    """Three distinct shapes in a row; the instruction names the target through a relation to another shape."""
    images = spec.train_per_class if split == "train" else spec.test_per_class
    rng = random.Random(f"{spec.seed}-{split}-grounding")
    records = []
    for index in range(images):
        boxes = _scene(rng, spec.size, 3)
        names = rng.sample([(c, s) for c in spec.colours for s in spec.shapes], 3)
        image = _canvas(rng, spec.size)
        for box, (colour, shape) in zip(boxes, names):
            _paint(image, rng, colour, shape, box)
        relation = rng.choice(GROUNDING_RELATIONS)
        if relation in ("left of", "right of"):
            anchor = rng.choice([1, 2]) if relation == "left of" else rng.choice([0, 1])
            target = anchor - 1 if relation == "left of" else anchor + 1
            colour, shape = names[anchor]
            instruction = f"Box the shape to the {relation} the {colour} {shape}."
        else:
            sides = [b[2] - b[0] for b in boxes]
            pick = max if relation == "largest" else min
            target = sides.index(pick(sides))
            instruction = f"Box the {relation} shape."
        name = f"{split}-{index:05d}.png"
        image.save(image_dir / name)
        records.append(
            {
                "image": f"images/{name}",
                "problem": grounding.problem(instruction),
                "solution": grounding.solution(to_scale(boxes[target], spec.size, spec.size)),
            }
        )
    return records


def colour_change_rows(spec: ColourChangeSpec, split: str, clip_dir: Path) -> list[dict]:
    """Clips of a square of random size and place over a plain grey background, one colour in the even frames and
    another (the answer) in the odd ones, each final colour equally often, saved as mp4 under clip_dir; rows
    {video (relative path), problem, solution}."""
    import numpy as np

    from qlora_rft.video import write_clip

    per_class = spec.train_per_class if split == "train" else spec.test_per_class
    rng = random.Random(f"{spec.seed}-{split}-colour-change")
    rows = []
    for number in range(per_class * len(CHANGE_COLOURS)):
        end = CHANGE_COLOURS[number % len(CHANGE_COLOURS)]
        start = rng.choice([c for c in CHANGE_COLOURS if c != end])
        side = rng.randint(*spec.side)
        x, y = rng.randint(0, spec.size - side), rng.randint(0, spec.size - side)
        grey = rng.randint(200, 245)
        background, frames = Image.new("RGB", (spec.size, spec.size), (grey, grey, grey)), []
        for t in range(spec.frames):
            image = background.copy()
            colour = start if t % 2 == 0 else end
            _paint(image, random.Random(number), colour, "square", (x, y, x + side - 1, y + side - 1))
            frames.append(np.asarray(image))
        name = f"{split}-{number:05d}.mp4"
        write_clip(frames, clip_dir / name, spec.fps)
        rows.append({"video": f"clips/{name}", "problem": CHANGE_PROBLEM, "solution": f"<answer>{end}</answer>"})
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------- writing


def write_parquet(rows: list[dict], path: Path) -> None:
    """Rows of {image: PIL, problem, solution, ...} as parquet whose image column decodes to PIL on load."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = {"image": ImageFeature(), "problem": Value("string"), "solution": Value("string")}
    for extra in rows[0].keys() - features.keys():
        features[extra] = Value("int64") if isinstance(rows[0][extra], int) else Value("string")
    Dataset.from_list(rows, features=Features(features)).to_parquet(str(path))


def fingerprint(name: str) -> str:
    """Changes whenever the generator's recipe for `name` does (cache key)."""
    recipe = (DATASETS.get(name), COLOURS, SHAPES, CLASSIFICATION_PROBLEM, corpus_lines(), 2)
    return hashlib.sha256(repr(recipe).encode()).hexdigest()[:10]


def write_dataset(name: str, out: Path) -> Path:
    """Write `name`'s splits (train, test) into `out`, atomically: a half-written folder never shows.

    Parquet datasets get train.parquet / test.parquet (detection also SPLIT_coco.json with images/, for mAP);
    grounding gets train.json / test.json and images/; video gets train.jsonl / test.jsonl and clips/.
    """
    if name not in DATASETS:
        raise DataError(f"unknown synthetic dataset {name!r}: choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    with atomic_folder(out) as tmp:
        for split in ("train", "test"):
            if spec.task == "classification":
                write_parquet(classification_rows(spec, split), tmp / f"{split}.parquet")
            elif spec.task == "detection":
                scenes = detection_scenes(spec, split)
                write_parquet(detection_rows(spec, scenes), tmp / f"{split}.parquet")
                (tmp / "images").mkdir(exist_ok=True)
                coco = coco_annotations(spec, scenes, split, tmp / "images")
                (tmp / f"{split}_coco.json").write_text(json.dumps(coco))
            elif spec.task == "colour-change":
                (tmp / "clips").mkdir(exist_ok=True)
                rows = colour_change_rows(spec, split, tmp / "clips")
                (tmp / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            else:
                (tmp / "images").mkdir(exist_ok=True)
                records = grounding_records(spec, split, tmp / "images")
                (tmp / f"{split}.json").write_text(json.dumps(records, indent=1))
    return out
