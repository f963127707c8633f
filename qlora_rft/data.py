"""Datasets in the released ViRFT schema (image, problem, solution) and turning a row into model inputs.

Sources: a parquet file or folder, a JSON-lines file (`.jsonl`, or a folder holding `SPLIT.jsonl`; image paths
relative to it), a local folder `datasets.load_dataset` reads (never `load_from_disk`), a hub dataset only when
named `hub:ORG/NAME` (a local path that does not exist is an error at once, never a hub lookup), a LISA-style JSON (a `.json` file, or a
folder holding `SPLIT.json`; image paths relative to it), LISA's raw ReasonSeg folder (`SPLIT/` holding each image
beside its JSON), or `synthetic:NAME`. A row may hold several images (`images`, a list, instead of `image`) for a
task without boxes; a task without solutions (generic) needs no `solution` column. Every other column is kept for
the rewards.
Bad rows (an image that does not decode in full, is not a regular file or that the resize rule refuses, a solution
that does not parse, a prompt or solution holding a vision placeholder token) are found at load time and skipped
and counted, or refused; so is a prompt over data.max_prompt_length, once the processor is known
(`without_long_prompts`, before the first step). Images are resized with qwen-vl-utils' rule,
the config's pixel bounds and the model family's token side (`factor`), the same in training and evaluation;
high-bit-depth images are scaled to 8 bits by their depth; an image far larger than needed is resized once at load
and kept small (PNG), with one line saying so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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
HUB = "hub:"  # the prefix of a dataset named on the Hugging Face hub (anything else is a local path)
IMAGE_COLUMNS = ("image", "images")  # one image, or a list of them
LARGE_FACTOR = 16  # an image over this many times data.max_pixels is resized once at load, not at every step


@dataclass(frozen=True)
class Example:
    index: int  # row index in its source split
    problem: str
    solution: str
    image: dict  # the stored cell {"bytes": ..., "path": ...}; decoded by open_image()
    columns: dict = field(default_factory=dict)  # the row's other columns, for the rewards
    more_images: tuple[dict, ...] = ()  # a row with several images: the cells after the first

    @property
    def images(self) -> tuple[dict, ...]:
        return (self.image, *self.more_images)

    def reward_columns(self) -> dict:
        """What reward functions get besides the completions: the problem, the solution and every other column."""
        return {"problem": self.problem, "solution": self.solution, **self.columns}


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


def content_hash(data: Dataset) -> str:
    """A sha256 of what a dataset holds, in order: every row's text and columns and its images' bytes (read from
    their files when stored as paths), so that a file replaced under the same name hashes differently."""
    digest = hashlib.sha256()
    for example in data.examples:
        text = [example.index, example.problem, example.solution, example.columns]
        digest.update(json.dumps(text, sort_keys=True, default=str).encode())
        for cell in example.images:
            if cell.get("bytes"):
                digest.update(cell["bytes"])
            else:
                with open(cell["path"], "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()


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

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # else every load, local files too, pings the hub to count it
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
        elif source.startswith(HUB):  # named as a hub dataset: the only source ever fetched
            table = datasets.load_dataset(source[len(HUB):], split=split)
        elif path.exists():
            raise DataError(f"{source} is neither a regular file nor a folder: name a data file or folder")
        else:
            raise DataError(f"{source} does not exist (no such file or folder, relative to {Path.cwd()}): name a "
                            f"local file or folder, or a dataset of the Hugging Face hub as {HUB}ORG/NAME")
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


def _split_file(source: str, split: str, suffix: str) -> Path | None:
    """A `suffix` file (.json, .jsonl) named directly, or SPLIT`suffix` in a named folder; else None."""
    path = Path(source).expanduser()
    if path.suffix == suffix and path.is_file():
        return path
    if path.is_dir() and (path / f"{split}{suffix}").is_file():
        return path / f"{split}{suffix}"
    return None


def load_jsonl(path: Path, image_root: str | None = None) -> list[dict]:
    """The rows of a JSON-lines file, one JSON object a line (blank lines skipped); a relative image path (`image`,
    or each of `images`) is taken from image_root (default: the file's folder)."""
    root = Path(image_root).expanduser() if image_root else path.parent
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path} line {number} is not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object (a {type(row).__name__})")
        rows.append({k: _under(v, root) if k in IMAGE_COLUMNS else v for k, v in row.items()})
    return rows


def _under(images, root: Path):
    """Image paths (one, or a list) taken from `root` when relative; anything else unchanged."""
    if isinstance(images, list):
        return [_under(image, root) for image in images]
    if isinstance(images, str) and not Path(images).expanduser().is_absolute():
        return str(root / images)
    return images


def _rows(resolved: str, split: str, image_root: str | None):
    """(rows, column names) of one split, whatever the source form."""
    import datasets

    from qlora_rft.tasks.grounding import is_reasonseg, load_lisa_json, load_reasonseg

    jsonl_file = _split_file(resolved, split, ".jsonl")
    if jsonl_file is not None:
        rows = load_jsonl(jsonl_file, image_root)
        return rows, sorted({key for row in rows for key in row})
    json_file = _split_file(resolved, split, ".json")
    if json_file is not None or is_reasonseg(resolved, split):
        rows = load_lisa_json(json_file, image_root or None) if json_file else load_reasonseg(resolved, split)
        return rows, list(rows[0].keys()) if rows else list(REQUIRED_COLUMNS)
    table = _load_table(resolved, split)
    if "image" in table.column_names and isinstance(table.features["image"], datasets.Image):
        table = table.cast_column("image", datasets.Image(decode=False))
    images = table.features.get("images")
    if isinstance(getattr(images, "feature", None), datasets.Image):  # a list of images: kept undecoded too
        table = table.cast_column("images", type(images)(datasets.Image(decode=False)))
    return table, table.column_names


def load_split(source: str, split: str, task: Task, on_bad_row: str = "skip", image_root: str | None = None, *,
               min_pixels: int, max_pixels: int, factor: int, console: Console | None = None) -> Dataset:
    """Every usable row of one split; bad rows are reported by index and skipped or refused.

    Each image is decoded in full and checked against the resize rule with these pixel bounds (those of training or
    evaluation; `factor` the model family's image token side), so a row that would fail mid-run fails here. Large images are kept resized (one line on `console`).
    """
    resolved = resolve_source(source)
    rows, columns = _rows(resolved, split, image_root)
    _check_columns(columns, task, f"{resolved} (split {split!r})")
    if len(rows) == 0:
        raise DataError(f"{resolved} split {split!r} has no rows")
    examples, skipped, large = [], [], {}
    for index, row in enumerate(rows):
        cells = _image_cells(row)
        if len(cells) > 1 and task.has_boxes:
            raise DataError(f"{resolved} split {split!r} row {index} holds {len(cells)} images: data.task={task.name} "
                            "takes one image per prompt (its boxes are on it)")
        try:
            _check_text(row, task)
            if not cells:
                raise Unusable("no image (an empty 'images' list)")
            images = [check_image(_as_cell(cell), min_pixels, max_pixels, factor) for cell in cells]
        except Unusable as e:
            if on_bad_row == "error":
                raise DataError(f"{resolved} split {split!r} row {index}: {e} (set data.on_bad_row=skip to skip it)"
                                ) from None
            skipped.append(BadRow(index, str(e)))
            continue
        solution = row.get("solution")
        others = {k: v for k, v in row.items() if k not in (*IMAGE_COLUMNS, "problem")}  # the rewards get them
        examples.append(Example(index, row["problem"], solution if isinstance(solution, str) else "", images[0].cell,
                                others, tuple(image.cell for image in images[1:])))
        downsized = [image.size for image in images if image.downsized]
        if downsized:
            large[index] = max(downsized, key=lambda size: size[0] * size[1])
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


def _check_columns(columns: list[str], task: Task, where: str) -> None:
    """The columns every row of the task needs: problem, an image (or images), and a solution when it has one."""
    needed = ["problem"] + (["solution"] if task.parse_solution is not None else [])
    missing = [c for c in needed if c not in columns] + ([] if set(IMAGE_COLUMNS) & set(columns) else ["image"])
    if missing:
        what = ("Visual-RFT data needs image, problem and solution" if task.parse_solution is not None else
                f"data.task={task.name} needs problem and image (or images, a list)")
        raise DataError(f"{where} has no column {missing[0]!r}; it has {', '.join(columns)}. {what}")


def _image_cells(row: dict) -> list:
    """A row's images: its `images` list, else its one `image`."""
    images = row.get("images")
    if images is not None:
        return list(images) if isinstance(images, (list, tuple)) else [images]
    return [row.get("image")]


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
    from qlora_rft.models import vision_token_in

    if not isinstance(row.get("problem"), str) or not row["problem"].strip():
        raise Unusable("empty problem")
    for column in ("problem", "solution"):  # the text the model reads, or is taught to write (sft, warm-up)
        token = vision_token_in(row[column]) if isinstance(row.get(column), str) else None
        if token is not None:
            raise Unusable(f"{column} holds the vision token {token} (the processor would take it for an image slot)")
    if task.parse_solution is None:  # a task without solutions: any other column is the rewards' business
        return
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
    except Unusable:
        raise
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
    """The cell's image, from its bytes or its file. Only a regular file (after links are resolved) is read: a FIFO,
    a device or a folder would block or never end, so it is Unusable."""
    if cell.get("bytes"):
        return Image.open(io.BytesIO(cell["bytes"]))
    if cell.get("path"):
        path = cell["path"]
        if not os.path.isfile(path):
            what = "does not exist" if not os.path.lexists(path) else "is not a regular file"
            raise Unusable(f"image {path} {what}")
        return Image.open(path)
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
    """The example's (first) image, RGB."""
    with _open(example.image) as image:
        return to_rgb(image)


def open_images(example: Example) -> list[Image.Image]:
    """Every image of the example, RGB, in order."""
    images = []
    for cell in example.images:
        with _open(cell) as image:
            images.append(to_rgb(image))
    return images


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
    image_grid_thw: torch.Tensor  # [images, 3]: one row per image of the prompt
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


def messages(task: Task, problem: str, frame: Frame = RELATIVE, images: int = 1) -> list[dict]:
    """The user turn (the prompt's images, then its text), after the task's system prompt when it has one."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": task.ask(problem, frame)}]
    user = {"role": "user", "content": content}
    return [{"role": "system", "content": [{"type": "text", "text": task.system}]}, user] if task.system else [user]


def prompt_text(processor, task: Task, problem: str, frame: Frame = RELATIVE, images: int = 1) -> str:
    return processor.apply_chat_template(messages(task, problem, frame, images), add_generation_prompt=True,
                                         tokenize=False)


def model_inputs(processor, examples: list[Example], min_pixels: int, max_pixels: int) -> tuple[list, list[Frame]]:
    """The resized images of the examples, in order (all of an example's images before the next one's), and the
    box frame the processor's model family is asked for on each example (on its first image: box tasks have one)."""
    from qlora_rft.models import family_of

    family = family_of(processor)
    resized = [[resize_image(image, min_pixels, max_pixels, family.factor) for image in open_images(ex)]
               for ex in examples]
    return [image for images in resized for image in images], [family.frame(*images[0].size) for images in resized]


def prompt_lengths(processor, task: Task, examples: list[Example], min_pixels: int, max_pixels: int) -> list[int]:
    """Each example's prompt length in tokens, as encode_prompts makes it (image tokens included), without its
    pixels: the text is tokenized per row, the image tokens counted once per resized size (on a blank image)."""
    from qwen_vl_utils.vision_process import smart_resize

    from qlora_rft.models import family_of

    family = family_of(processor)
    image_tokens: dict[tuple[int, int], int] = {}  # tokens an image of this resized size adds to its placeholder
    lengths = []
    for ex in examples:
        sizes = []
        for cell in ex.images:
            with _open(cell) as image:
                width, height = image.size  # the header alone
            height, width = smart_resize(height, width, family.factor, min_pixels, max_pixels)
            sizes.append((width, height))
        text = prompt_text(processor, task, ex.problem, family.frame(*sizes[0]), len(sizes))
        length = len(processor.tokenizer(text)["input_ids"])
        for size in sizes:
            if size not in image_tokens:
                one = prompt_text(processor, task, ex.problem, family.frame(*size))
                full = processor(text=[one], images=[Image.new("RGB", size)], return_tensors="pt")
                image_tokens[size] = full["input_ids"].shape[1] - len(processor.tokenizer(one)["input_ids"])
            length += image_tokens[size]
        lengths.append(length)
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
    texts = [prompt_text(processor, task, ex.problem, frame, len(ex.images)) for ex, frame in zip(examples, frames)]
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
