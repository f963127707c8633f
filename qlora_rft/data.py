"""Datasets in the released ViRFT schema (image, problem, solution) and turning a row into model inputs.

Sources: a parquet file or folder, any `datasets.load_dataset` path (never `load_from_disk`), a LISA-style JSON
(a `.json` file, or a folder holding `SPLIT.json`; image paths relative to it), LISA's raw ReasonSeg folder
(`SPLIT/` holding each image beside its JSON), or `synthetic:NAME`.
Bad rows (an image that does not decode in full or that the resize rule refuses, a solution that does not parse)
are found at load time and skipped and counted, or refused; so is a prompt over data.max_prompt_length, once the
processor is known (`without_long_prompts`, before the first step). Images are resized with qwen-vl-utils' rule,
the config's pixel bounds and the model family's token side (`factor`), the same in training and evaluation;
high-bit-depth images are scaled to 8 bits by their depth; an image far larger than needed is resized once at load
and kept small (PNG), with one line saying so.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from transformers.modeling_outputs import BaseModelOutputWithPooling

from qlora_rft.errors import DataError
from qlora_rft.tasks import Task
from qlora_rft.tasks.boxes import RELATIVE, Frame

REQUIRED_COLUMNS = ("image", "problem", "solution")
LARGE_FACTOR = 16  # an image over this many times data.max_pixels is resized once at load, not at every step


@dataclass(frozen=True)
class Example:
    index: int  # row index in its source split
    problem: str
    solution: str
    image: dict  # the stored cell {"bytes": ..., "path": ...}; decoded by open_image()


@dataclass(frozen=True)
class BadRow:
    index: int
    reason: str


@dataclass
class Dataset:
    source: str
    split: str
    examples: list[Example]
    skipped: list[BadRow] = field(default_factory=list)
    downsized: list[int] = field(default_factory=list)  # rows whose large image is kept at its resized size

    def __len__(self) -> int:
        return len(self.examples)


def resolve_source(source: str) -> str:
    """`synthetic:NAME[/PATH]` -> its folder in the cache (written on first use), or PATH inside it; anything
    else unchanged."""
    if source.startswith("synthetic:"):
        from qlora_rft.tasks import synthetic
        from qlora_rft.files import cache_dir

        name, _, inside = source.split(":", 1)[1].partition("/")
        folder = cache_dir() / "data" / f"{name}-{synthetic.fingerprint(name)}"
        if not folder.is_dir():
            synthetic.write_dataset(name, folder)
        return str(folder / inside) if inside else str(folder)
    return source


def _load_table(source: str, split: str):
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            _require_rows([path], source, split)
            table = datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)
        elif path.is_dir() and _split_parquet(path, split):
            files = _split_parquet(path, split)
            _require_rows(files, source, split)
            table = datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split)
        elif path.is_dir():
            table = datasets.load_dataset(str(path), split=split)
        else:
            table = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"cannot load split {split!r} of {source}: {e}") from None
    except datasets.exceptions.DatasetGenerationError as e:
        raise DataError(f"cannot read split {split!r} of {source}: {e.__cause__ or e}") from None
    except ConnectionError as e:
        raise DataError(f"{source} is neither a local file/folder nor reachable: {e}") from None
    return table


def _require_rows(files: list[Path], source: str, split: str) -> None:
    """A DataError for parquet files without a row (`datasets` would fail on them with a traceback)."""
    import pyarrow.parquet as pq

    try:
        rows = sum(pq.read_metadata(f).num_rows for f in files)
    except (OSError, ValueError):  # not parquet: `datasets` says why
        return
    if rows == 0:
        raise DataError(f"{source} split {split!r} has no rows")


def _split_parquet(folder: Path, split: str) -> list[Path]:
    """Parquet files of one split in a folder: SPLIT.parquet, SPLIT-*.parquet, or data/SPLIT-*.parquet (hub layout)."""
    patterns = (f"{split}.parquet", f"{split}-*.parquet", f"data/{split}.parquet", f"data/{split}-*.parquet")
    return sorted({f for pattern in patterns for f in folder.glob(pattern)})


def _json_source(source: str, split: str) -> Path | None:
    path = Path(source).expanduser()
    if path.suffix == ".json" and path.is_file():
        return path
    if path.is_dir() and (path / f"{split}.json").is_file():
        return path / f"{split}.json"
    return None


def _rows(resolved: str, split: str, image_root: str | None):
    """(rows, column names) of one split, whatever the source form."""
    import datasets

    from qlora_rft.tasks.grounding import is_reasonseg, load_lisa_json, load_reasonseg

    json_file = _json_source(resolved, split)
    if json_file is not None or is_reasonseg(resolved, split):
        rows = load_lisa_json(json_file, image_root or None) if json_file else load_reasonseg(resolved, split)
        return rows, list(rows[0].keys()) if rows else list(REQUIRED_COLUMNS)
    table = _load_table(resolved, split)
    if "image" in table.column_names and isinstance(table.features["image"], datasets.Image):
        table = table.cast_column("image", datasets.Image(decode=False))
    return table, table.column_names


def load_split(source: str, split: str, task: Task, on_bad_row: str = "skip", image_root: str | None = None, *,
               min_pixels: int, max_pixels: int, factor: int, console: Console | None = None) -> Dataset:
    """Every usable row of one split; bad rows are reported by index and skipped or refused.

    Each image is decoded in full and checked against the resize rule with these pixel bounds (those of training or
    evaluation; `factor` the model family's image token side), so a row that would fail mid-run fails here. Large images are kept resized (one line on `console`).
    """
    resolved = resolve_source(source)
    rows, columns = _rows(resolved, split, image_root)
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise DataError(
                f"{resolved} (split {split!r}) has no column {column!r}; it has {', '.join(columns)}. "
                "Visual-RFT data needs image, problem and solution"
            )
    if len(rows) == 0:
        raise DataError(f"{resolved} split {split!r} has no rows")
    examples, skipped, large = [], [], {}
    for index, row in enumerate(rows):
        try:
            _check_text(row, task)
            image = check_image(_as_cell(row["image"]), min_pixels, max_pixels, factor)
        except Unusable as e:
            if on_bad_row == "error":
                raise DataError(f"{resolved} split {split!r} row {index}: {e} (set data.on_bad_row=skip to skip it)"
                                ) from None
            skipped.append(BadRow(index, str(e)))
            continue
        examples.append(Example(index, row["problem"], row["solution"], image.cell))
        if image.downsized:
            large[index] = image.size
    if not examples:
        raise DataError(f"{resolved} split {split!r} has no usable rows: all {len(skipped)} are bad "
                        f"(row {skipped[0].index}: {skipped[0].reason})")
    report_large(list(large.values()), f"{resolved} split {split!r}", console)
    return Dataset(resolved, split, examples, skipped, downsized=list(large))


def load_images(files: list[str], min_pixels: int, max_pixels: int, on_bad_row: str, source: str, *, factor: int,
                console: Console | None = None) -> dict[str, dict]:
    """Image files (of an annotation file `source`) checked as dataset rows are: file -> its cell, for the usable
    ones; a bad one is refused (DataError naming it) or skipped with one line for all of them."""
    cells, skipped, large = {}, [], []
    for file in files:
        try:
            image = check_image({"bytes": None, "path": file}, min_pixels, max_pixels, factor)
        except Unusable as e:
            if on_bad_row == "error":
                raise DataError(f"{source}: image {file}: {e} (set data.on_bad_row=skip to skip it)") from None
            skipped.append(f"{file}: {e}")
            continue
        cells[file] = image.cell
        if image.downsized:
            large.append(image.size)
    if files and not cells:
        raise DataError(f"{source} has no usable images: all {len(files)} are bad ({skipped[0]})")
    if skipped:
        more = f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""
        (console or Console(stderr=True)).print(
            f"[yellow]skipped {len(skipped)} of {len(files)} images of {source}[/yellow]: "
            f"{'; '.join(skipped[:3])}{more}"
        )
    report_large(large, source, console)
    return cells


def _as_cell(image) -> dict:
    if isinstance(image, dict):
        return image
    if isinstance(image, str):
        return {"bytes": None, "path": image}
    if isinstance(image, Image.Image):
        return {"bytes": _png(image), "path": None}
    return {"bytes": None, "path": None}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check_text(row: dict, task: Task) -> None:
    if not isinstance(row.get("problem"), str) or not row["problem"].strip():
        raise Unusable("empty problem")
    if not isinstance(row.get("solution"), str) or task.parse_solution(row["solution"]) is None:
        raise Unusable(f"solution does not parse as a {task.name} answer: {str(row.get('solution'))[:80]!r}")


# ----------------------------------------------------------------------------- images


class Unusable(Exception):
    """Why a row or an image cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class CheckedImage:
    cell: dict  # as stored, or for a large image its resized copy (PNG bytes)
    size: tuple[int, int]  # (width, height) as decoded
    downsized: bool


def check_image(cell: dict, min_pixels: int, max_pixels: int, factor: int) -> CheckedImage:
    """Decode the image in full and size it by the resize rule, as every later step will; raise Unusable if either
    fails. An image over LARGE_FACTOR x max_pixels, or over PIL's MAX_IMAGE_PIXELS, is resized here, once."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said once per dataset instead
            with _open(cell) as image:
                image.load()
                rgb = to_rgb(image)
    except Image.DecompressionBombError as e:
        raise Unusable(f"image is a possible decompression bomb, refused by PIL ({e})") from None
    except Exception as e:  # any decoder error means the same thing to the user: this image is unusable
        raise Unusable(f"image does not decode ({type(e).__name__}: {e})") from None
    width, height = rgb.size
    try:
        from qwen_vl_utils.vision_process import smart_resize

        new_height, new_width = smart_resize(height, width, factor, min_pixels, max_pixels)
    except (ValueError, ZeroDivisionError) as e:
        raise Unusable(f"image {width}x{height} cannot be resized by qwen-vl-utils' rule ({e})") from None
    if new_width < 1 or new_height < 1:
        raise Unusable(f"image {width}x{height} would be resized to {new_width}x{new_height} under "
                       f"data.max_pixels={max_pixels}: too elongated for these pixel bounds")
    bomb_limit = Image.MAX_IMAGE_PIXELS or float("inf")
    if width * height <= LARGE_FACTOR * max_pixels and width * height <= bomb_limit:
        return CheckedImage(cell, (width, height), downsized=False)
    small = resize_image(rgb, min_pixels, max_pixels, factor)
    return CheckedImage({"bytes": _png(small), "path": cell.get("path")}, (width, height), downsized=True)


def report_large(sizes: list[tuple[int, int]], where: str, console: Console | None = None) -> None:
    """One visible line (Python warnings are off in the CLI) about images kept resized, with the largest size."""
    if not sizes:
        return
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    count = f"{len(sizes)} large image" + ("s" if len(sizes) > 1 else "")
    (console or Console(stderr=True)).print(
        f"[yellow]{count} in {where}[/yellow] (largest {width}x{height}): each decoded once and kept at its resized "
        "size; smaller source images would load faster"
    )


def _open(cell: dict) -> Image.Image:
    if cell.get("bytes"):
        return Image.open(io.BytesIO(cell["bytes"]))
    if cell.get("path"):
        return Image.open(cell["path"])
    raise ValueError("no image bytes or path")


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB image the model sees. 16- and 32-bit greyscale is scaled by its bit depth (65535 -> 255; mode "I"
    counts as 16-bit when its values fit), floats ("F") from [0, 1] when they lie there, else as 0..255 (clipped);
    every other mode (palette, LA, RGBA, CMYK...) converts as PIL's convert("RGB") does (alpha dropped)."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        top = float(values.max(initial=0))
        if image.mode == "F":
            full_scale = 1.0 if top <= 1 else 255.0
        else:
            full_scale = 65535.0 if top <= 65535 else 2.0**31 - 1
        image = Image.fromarray(np.clip(np.round(values * (255 / full_scale)), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def open_image(example: Example) -> Image.Image:
    with _open(example.image) as image:
        return to_rgb(image)


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int, factor: int) -> Image.Image:
    """qwen-vl-utils' resizing: sides multiples of `factor` (the family's patch x merge: 28 or 32), area within
    [min_pixels, max_pixels], aspect kept."""
    from qwen_vl_utils import fetch_image

    return fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels},
                       image_patch_size=factor // 2)



# ----------------------------------------------------------------------------- prompts


@dataclass
class SharedVision(BaseModelOutputWithPooling):
    """A vision encoding run once: `pooler_output` per image, and, for families with deepstack, each deepstack
    level's features per image (read by their forward; ignored by the others)."""

    deepstack_features: list[tuple[torch.Tensor, ...]] | None = None


@dataclass
class PromptInputs:
    """Processor outputs for one prompt (batch of 1), on the model's device."""

    input_ids: torch.Tensor  # [1, P]
    attention_mask: torch.Tensor  # [1, P]
    mm_token_type_ids: torch.Tensor  # [1, P]
    pixel_values: torch.Tensor  # [patches, C*t*p*p]
    image_grid_thw: torch.Tensor  # [1, 3]
    vision: tuple[tuple[torch.Tensor, ...], ...] | None = None  # per image, its feature levels ([tokens, H] each)
    frame: Frame = RELATIVE  # the box coordinates the prompt asked for (rewards map answers back with it)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def repeated(self, n: int) -> dict:
        """Model kwargs for n copies of this prompt; shared vision features instead of pixels when present."""
        kwargs = dict(
            input_ids=self.input_ids.expand(n, -1),
            attention_mask=self.attention_mask.expand(n, -1),
            mm_token_type_ids=self.mm_token_type_ids.expand(n, -1),
            image_grid_thw=self.image_grid_thw.repeat(n, 1),
        )
        if self.vision is None:
            kwargs["pixel_values"] = self.pixel_values.repeat(n, 1)
        else:
            kwargs["mm_encoder_outputs"] = shared_features(self.vision * n)
        return kwargs


def shared_features(images: tuple[tuple[torch.Tensor, ...], ...]) -> dict:
    """Precomputed image features (per image: merged output, then deepstack levels if any) in the form the models'
    forward takes as `mm_encoder_outputs` instead of pixel_values."""
    levels = list(zip(*images))  # [level][image]
    return {"image": SharedVision(pooler_output=levels[0], deepstack_features=levels[1:] or None)}


def messages(task: Task, problem: str, frame: Frame = RELATIVE) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.ask(problem, frame)}]}
    return [{"role": "system", "content": [{"type": "text", "text": task.system}]}, user] if task.system else [user]


def prompt_text(processor, task: Task, problem: str, frame: Frame = RELATIVE) -> str:
    return processor.apply_chat_template(messages(task, problem, frame), add_generation_prompt=True, tokenize=False)


def model_inputs(processor, examples: list[Example], min_pixels: int, max_pixels: int) -> tuple[list, list[Frame]]:
    """The resized images of examples, and the box frame the processor's model family is asked for on each."""
    from qlora_rft.models import family_of

    family = family_of(processor)
    images = [resize_image(open_image(ex), min_pixels, max_pixels, family.factor) for ex in examples]
    return images, [family.frame(*image.size) for image in images]


def prompt_lengths(processor, task: Task, examples: list[Example], min_pixels: int, max_pixels: int) -> list[int]:
    """Each example's prompt length in tokens, as encode_prompts makes it (image tokens included), without its
    pixels: the text is tokenized per row, the image tokens counted once per resized size (on a blank image)."""
    from qwen_vl_utils.vision_process import smart_resize

    from qlora_rft.models import family_of

    family = family_of(processor)
    image_tokens: dict[tuple[int, int], int] = {}
    lengths = []
    for ex in examples:
        with _open(ex.image) as image:
            width, height = image.size  # the header alone
        height, width = smart_resize(height, width, family.factor, min_pixels, max_pixels)
        text = prompt_text(processor, task, ex.problem, family.frame(width, height))
        length = len(processor.tokenizer(text)["input_ids"])
        if (width, height) not in image_tokens:
            full = processor(text=[text], images=[Image.new("RGB", (width, height))], return_tensors="pt")
            image_tokens[(width, height)] = full["input_ids"].shape[1] - length
        lengths.append(length + image_tokens[(width, height)])
    return lengths


def too_long(length: int, max_prompt_length: int) -> str | None:
    """Why a prompt of `length` tokens is refused, or None when it fits."""
    if length <= max_prompt_length:
        return None
    return (f"prompt is {length} tokens, over data.max_prompt_length={max_prompt_length} (prompts are never cut: "
            "raise it or lower data.max_pixels)")


def without_long_prompts(data: Dataset, processor, task: Task, data_cfg) -> Dataset:
    """`data` less the rows whose prompt is over data.max_prompt_length: skipped and counted as bad rows, or
    refused under data.on_bad_row=error. Run once the processor is known, before the first step."""
    lengths = prompt_lengths(processor, task, data.examples, data_cfg.min_pixels, data_cfg.max_pixels)
    kept, bad = [], []
    for example, length in zip(data.examples, lengths):
        reason = too_long(length, data_cfg.max_prompt_length)
        if reason is None:
            kept.append(example)
        elif data_cfg.on_bad_row == "error":
            raise DataError(f"{data.source} split {data.split!r} row {example.index}: {reason} "
                            "(set data.on_bad_row=skip to skip it)")
        else:
            bad.append(BadRow(example.index, reason))
    if not kept:
        raise DataError(f"{data.source} split {data.split!r} has no usable rows: every prompt is too long "
                        f"(row {bad[0].index}: {bad[0].reason})")
    dropped = {b.index for b in bad}
    return Dataset(data.source, data.split, kept, sorted(data.skipped + bad, key=lambda b: b.index),
                   [i for i in data.downsized if i not in dropped])


def encode_prompts(
    processor, task: Task, examples: list[Example], min_pixels: int, max_pixels: int, max_prompt_length: int,
    device: torch.device,
) -> tuple[dict, list[Frame]]:
    """Left-padded batch inputs for several prompts (processor output, on device), and each prompt's box frame."""
    images, frames = model_inputs(processor, examples, min_pixels, max_pixels)
    texts = [prompt_text(processor, task, ex.problem, frame) for ex, frame in zip(examples, frames)]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    length = batch["input_ids"].shape[1]
    if length > max_prompt_length:
        raise DataError(
            f"a prompt is {length} tokens, over data.max_prompt_length={max_prompt_length} (rows "
            f"{[ex.index for ex in examples]}); prompts are never cut (image tokens would be lost): raise "
            "data.max_prompt_length or lower data.max_pixels"
        )
    return {k: v.to(device) for k, v in batch.items()}, frames


def encode_prompt(processor, task: Task, example: Example, data_cfg, device: torch.device) -> PromptInputs:
    batch, (frame,) = encode_prompts(
        processor, task, [example], data_cfg.min_pixels, data_cfg.max_pixels, data_cfg.max_prompt_length, device
    )
    return PromptInputs(**{k: batch[k] for k in PromptInputs.__dataclass_fields__ if k not in ("vision", "frame")},
                        frame=frame)
