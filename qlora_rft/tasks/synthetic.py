"""Synthetic data in the released ViRFT schema (parquet; columns image, problem, solution), made deterministically.

`shapes`: coloured shapes on a noisy background, one per image; the class is "<colour> <shape>". Small enough for a
tiny model on a CPU to learn, so the demo and the tests can show training working end to end.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

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


@dataclass(frozen=True)
class ShapesSpec:
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("circle", "square")
    train_per_class: int = 64
    test_per_class: int = 25
    size: int = 84
    seed: int = 0

    @property
    def classes(self) -> list[str]:
        return [f"{c} {s}" for c in self.colours for s in self.shapes]


DATASETS: dict[str, ShapesSpec] = {
    "shapes": ShapesSpec(),
    "shapes-fine": ShapesSpec(colours=tuple(COLOURS), shapes=SHAPES, train_per_class=4, test_per_class=8),
}


def corpus_lines() -> list[str]:
    lines = [CLASSIFICATION_PROBLEM]
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"<answer>{c} {s}</answer>")
    return lines


def draw_shape(rng: random.Random, colour: str, shape: str, size: int) -> Image.Image:
    """One image: a jittered background with a single shape of random size and place."""
    bg = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    pixels = image.load()
    for _ in range(size * size // 8):  # speckle noise
        x, y = rng.randrange(size), rng.randrange(size)
        pixels[x, y] = tuple(max(0, v - rng.randint(20, 60)) for v in bg)
    fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[colour])
    side = rng.randint(size // 3, size * 2 // 3)
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    x1, y1 = x0 + side, y0 + side
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "cross":
        w = side // 3
        draw.rectangle([x0 + w, y0, x1 - w, y1], fill=fill)
        draw.rectangle([x0, y0 + w, x1, y1 - w], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def classification_rows(spec: ShapesSpec, split: str) -> list[dict]:
    per_class = spec.train_per_class if split == "train" else spec.test_per_class
    rng = random.Random(f"{spec.seed}-{split}")
    rows = []
    for _ in range(per_class):
        for label in spec.classes:
            colour, shape = label.split(" ")
            rows.append(
                {
                    "image": draw_shape(rng, colour, shape, spec.size),
                    "problem": CLASSIFICATION_PROBLEM,
                    "solution": f"<answer>{label}</answer>",
                }
            )
    rng.shuffle(rows)
    return rows


def write_parquet(rows: list[dict], path: Path) -> None:
    """Rows of {image: PIL, problem, solution} as parquet whose image column decodes to PIL on load."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    features = Features({"image": ImageFeature(), "problem": Value("string"), "solution": Value("string")})
    Dataset.from_list(rows, features=features).to_parquet(str(path))


def fingerprint(name: str) -> str:
    """Changes whenever the generator's recipe for `name` does (cache key)."""
    import hashlib

    return hashlib.sha256(repr((DATASETS.get(name), COLOURS, SHAPES, CLASSIFICATION_PROBLEM, 1)).encode()).hexdigest()[:10]


def write_dataset(name: str, out: Path) -> Path:
    """Write `name`'s train.parquet and test.parquet into `out` (atomically: a half-written folder never shows)."""
    if name not in DATASETS:
        from qlora_rft.errors import DataError

        raise DataError(f"unknown synthetic dataset {name!r}: choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split in ("train", "test"):
            write_parquet(classification_rows(spec, split), tmp / f"{split}.parquet")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
