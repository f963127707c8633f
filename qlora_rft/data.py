"""Datasets in the released ViRFT schema (image, problem, solution): rows read, checked and kept as `Example`s, and
their images and clips opened (prompts.py turns them into model inputs).

Sources: a parquet file or folder, a JSON-lines file (`.jsonl`, or a folder holding `SPLIT.jsonl`; image and video
paths relative to it), a JSON list of rows (`.json`, or a folder holding `SPLIT.json`; a task may read its own forms
there, as grounding reads LISA's), a folder layout of the task's own (grounding: LISA's raw ReasonSeg), a local folder
`datasets.load_dataset` reads (never `load_from_disk`), a hub dataset only when named `hub:ORG/NAME` (a local path
that does not exist is an error at once, never a hub lookup), or `synthetic:NAME`. A row may hold several images
(`images`, a list, instead of `image`) and videos (`video`: a file or a list of frame images; `videos`, a list of
them) for a task without boxes, placed in the order of the row's columns; a task without solutions (generic) needs
no `solution` column. Every other column is kept for the rewards.
Bad rows (an image or clip that does not decode in full, is not a regular file or that the resize rule refuses, a
solution that does not parse, a prompt or solution holding a vision placeholder token) are found at load time and
skipped and counted, or refused; so is a prompt over data.max_prompt_length, once the processor is known
(`prompts.without_long_prompts`, before the first step). Images are resized with qwen-vl-utils' rule,
the config's pixel bounds and the model family's token side (`factor`), the same in training and evaluation;
high-bit-depth images are scaled to 8 bits by their depth; an image far larger than needed is resized once at load
and kept small (PNG), with one line saying so. A clip's frames and their size are chosen at load (video.py).
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

from qlora_rft.errors import DataError
from qlora_rft.tasks import Task
from qlora_rft.video import Clip, VideoRule, frame_size, probe, read_frames, resize_frame, sample_indices

REQUIRED_COLUMNS = ("image", "problem", "solution")
HUB = "hub:"  # the prefix of a dataset named on the Hugging Face hub (anything else is a local path)
IMAGE_COLUMNS = ("image", "images")  # one image, or a list of them
VIDEO_COLUMNS = ("video", "videos")  # one clip (a file, or a list of frame images), or a list of clips
LARGE_FACTOR = 16  # an image over this many times data.max_pixels is resized once at load, not at every step


@dataclass(frozen=True)
class Example:
    index: int  # row index in its source split
    problem: str
    solution: str
    image: dict | None  # the stored cell {"bytes": ..., "path": ...}; decoded by open_image(); None: video only
    columns: dict = field(default_factory=dict)  # the row's other columns, for the rewards
    more_images: tuple[dict, ...] = ()  # a row with several images: the cells after the first
    clips: tuple[Clip, ...] = ()  # the row's videos, checked at load
    kinds: tuple[str, ...] = ()  # "image" / "video" per visual in the row's order; empty: its images alone

    @property
    def images(self) -> tuple[dict, ...]:
        return tuple(cell for cell in (self.image, *self.more_images) if cell is not None)

    @property
    def layout(self) -> tuple[str, ...]:
        """What the prompt shows before its text, in order: "image" or "video" per item."""
        return self.kinds or ("image",) * len(self.images)

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
    """A sha256 of what a dataset holds, in order: every row's text and columns, its images' and clips' bytes (read
    from their files when stored as paths) and the frames sampled from each clip, so that a file replaced under the
    same name hashes differently."""
    digest = hashlib.sha256()
    for example in data.examples:
        text = [example.index, example.problem, example.solution, example.columns, example.layout,
                [[clip.fps, clip.total, clip.indices, clip.size] for clip in example.clips]]
        digest.update(json.dumps(text, sort_keys=True, default=str).encode())
        clip_cells = [cell for clip in example.clips for cell in
                      ((clip.source,) if isinstance(clip.source, dict) else clip.source)]
        for cell in (*example.images, *clip_cells):
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
    """The rows of a JSON-lines file, one JSON object a line (blank lines skipped); a relative image or video path
    (`image`, `video`, or each of `images`, `videos` and of a video's frames) is taken from image_root (default: the
    file's folder)."""
    rows = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path} line {number} is not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object (a {type(row).__name__})")
        rows.append(_rooted(row, path, image_root))
    return rows


def load_json_list(path: Path, image_root: str | None = None) -> list[dict]:
    """The rows of a .json file holding a list of row objects, read as `load_jsonl` reads its lines."""
    try:
        records = json.loads(_text(path))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of rows, not a {type(records).__name__} (one object a line: "
                        "name it .jsonl)")
    for number, row in enumerate(records):
        if not isinstance(row, dict):
            raise DataError(f"{path} item {number} is not a JSON object (a {type(row).__name__})")
    return [_rooted(row, path, image_root) for row in records]


def _text(path: Path) -> str:
    if not path.is_file():  # a FIFO or a device would block the read
        raise DataError(f"{path} is not a regular file: name a data file")
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is not part of the JSON
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}") from None


def _rooted(row: dict, path: Path, image_root: str | None) -> dict:
    """`row` with its relative image and video paths taken from image_root (default: the folder of `path`)."""
    root = Path(image_root).expanduser() if image_root else path.parent
    return {k: _under(v, root) if k in IMAGE_COLUMNS + VIDEO_COLUMNS else v for k, v in row.items()}


def _under(images, root: Path):
    """Image paths (one, or a list) taken from `root` when relative; anything else unchanged."""
    if isinstance(images, list):
        return [_under(image, root) for image in images]
    if isinstance(images, str) and not Path(images).expanduser().is_absolute():
        return str(root / images)
    return images


def _rows(resolved: str, split: str, image_root: str | None, task: Task):
    """(rows, column names) of one split, whatever the source form: a .jsonl file, a .json list (in the task's own
    forms if it has any), a folder in the task's own layout, else parquet or a `datasets` folder."""
    import datasets

    rows = None
    jsonl_file = _split_file(resolved, split, ".jsonl")
    json_file = _split_file(resolved, split, ".json")
    if jsonl_file is not None:
        rows = load_jsonl(jsonl_file, image_root)
    elif json_file is not None:
        read = task.read_json or load_json_list
        rows = read(json_file, image_root or None)
    elif task.read_folder is not None:
        rows = task.read_folder(resolved, split)
    if rows is not None:
        return rows, sorted({key for row in rows for key in row}) or list(REQUIRED_COLUMNS)
    table = _load_table(resolved, split)
    if "image" in table.column_names and isinstance(table.features["image"], datasets.Image):
        table = table.cast_column("image", datasets.Image(decode=False))
    images = table.features.get("images")
    if isinstance(getattr(images, "feature", None), datasets.Image):  # a list of images: kept undecoded too
        table = table.cast_column("images", type(images)(datasets.Image(decode=False)))
    if "video" in table.column_names and isinstance(table.features["video"], datasets.Video):
        table = table.cast_column("video", datasets.Video(decode=False))  # decoded by PyAV, frame by frame
    return table, table.column_names


def load_split(source: str, split: str, task: Task, on_bad_row: str = "skip", image_root: str | None = None, *,
               min_pixels: int, max_pixels: int, factor: int, video: VideoRule | None = None,
               console: Console | None = None) -> Dataset:
    """Every usable row of one split; bad rows are reported by index and skipped or refused.

    Each image is decoded in full and checked against the resize rule with these pixel bounds (those of training or
    evaluation; `factor` the model family's image token side), so a row that would fail mid-run fails here. Large
    images are kept resized (one line on `console`). Each clip is decoded in full too, and its frames and their
    size chosen by `video` (default: the config's defaults).
    """
    resolved = resolve_source(source)
    rows, columns = _rows(resolved, split, image_root, task)
    _check_columns(columns, task, f"{resolved} (split {split!r})")
    if len(rows) == 0:
        raise DataError(f"{resolved} split {split!r} has no rows")
    video = video or VideoRule.of(_default_data())
    root = Path(image_root).expanduser() if image_root else _folder(resolved)  # of relative video paths
    examples, skipped, large = [], [], {}
    for index, row in enumerate(rows):
        kinds, cells, videos = _visuals(row)
        if (len(cells) > 1 or videos) and task.has_boxes:
            held = [f"{len(cells)} images"] * (len(cells) > 1) + [f"{len(videos)} video(s)"] * bool(videos)
            raise DataError(f"{resolved} split {split!r} row {index} holds {' and '.join(held)}: data.task="
                            f"{task.name} takes one image per prompt (its boxes are on it)")
        try:
            _check_text(row, task)
            if not cells and not videos:
                raise Unusable("no image (an empty 'images' list)")
            images = [check_image(_as_cell(cell), min_pixels, max_pixels, factor) for cell in cells]
            clips = [check_clip(value, root, video, min_pixels, max_pixels, factor) for value in videos]
        except Unusable as e:
            if on_bad_row == "error":
                raise DataError(f"{resolved} split {split!r} row {index}: {e} (set data.on_bad_row=skip to skip it)"
                                ) from None
            skipped.append(BadRow(index, str(e)))
            continue
        solution = row.get("solution")
        others = {k: v for k, v in row.items() if k not in (*IMAGE_COLUMNS, *VIDEO_COLUMNS, "problem")}  # rewards'
        examples.append(Example(index, row["problem"], solution if isinstance(solution, str) else "",
                                images[0].cell if images else None, others,
                                tuple(image.cell for image in images[1:]), tuple(clips), kinds if clips else ()))
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
    """The columns every row of the task needs: problem, an image (or images) or a video (or videos), and a solution
    when it has one."""
    needed = ["problem"] + (["solution"] if task.parse_solution is not None else [])
    visual = set(IMAGE_COLUMNS + (() if task.has_boxes else VIDEO_COLUMNS)) & set(columns)
    missing = [c for c in needed if c not in columns] + ([] if visual else ["image"])
    if missing:
        what = ("Visual-RFT data needs image, problem and solution" if task.parse_solution is not None else
                f"data.task={task.name} needs problem and image (or images, a list, or video)")
        raise DataError(f"{where} has no column {missing[0]!r}; it has {', '.join(columns)}. {what}")


def _visuals(row: dict) -> tuple[tuple[str, ...], list, list]:
    """A row's visuals: "image" / "video" per item in the order of the row's columns, its image cells (its `images`
    list, else its one `image`) and its videos (its `videos` list, else its one `video`). A row without a video
    keeps its `image` even when empty (a bad row, then)."""
    videos = _listed(row, "videos", "video")
    if row.get("images") is not None:
        images = list(row["images"]) if isinstance(row["images"], (list, tuple)) else [row["images"]]
    else:
        images = [row.get("image")] if row.get("image") is not None or not videos else []
    first = next((key for key in row if key in IMAGE_COLUMNS + VIDEO_COLUMNS and row[key] is not None), "image")
    kinds = (["image"] * len(images) + ["video"] * len(videos) if first in IMAGE_COLUMNS else
             ["video"] * len(videos) + ["image"] * len(images))
    return tuple(kinds), images, videos


def _listed(row: dict, many: str, one: str) -> list:
    """The items of a row's list column `many`, else its one `one` (none when it has neither)."""
    if row.get(many) is not None:
        return list(row[many]) if isinstance(row[many], (list, tuple)) else [row[many]]
    return [row[one]] if row.get(one) is not None else []


def _folder(resolved: str) -> Path:
    """Where relative video paths of a source are: its folder (a file's parent); the working folder otherwise."""
    path = Path(resolved).expanduser()
    return path if path.is_dir() else path.parent if path.is_file() else Path.cwd()


def _default_data():
    from qlora_rft.config import DataConfig

    return DataConfig()


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
            with open_cell(cell) as image:
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


def check_clip(value, root: Path, rule: VideoRule, min_pixels: int, max_pixels: int, factor: int) -> Clip:
    """A row's `video`, decoded in full (a file frame by frame, with PyAV; a list of frame images each as images
    are), its frames sampled by `rule` and their size fixed by the resize rule; Unusable when any of it fails."""
    if isinstance(value, (list, tuple)):  # frame images, taken as shot at rule.fps
        cells = tuple(_as_cell(frame) for frame in value)
        sizes = set()
        for number, cell in enumerate(cells):
            try:
                with open_cell(cell) as image:
                    image.load()
                    sizes.add(image.size)
            except Exception as e:
                raise Unusable(f"video frame {number} does not decode ({type(e).__name__}: {e})") from None
        if len(sizes) > 1:
            raise Unusable(f"video frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})")
        source, fps, total, (width, height) = cells, rule.fps, len(cells), sizes.pop() if sizes else (0, 0)
    else:
        source = _video_cell(value, root)
        path = source.get("path")
        if not source.get("bytes") and path and not os.path.isfile(path):  # a FIFO or device would block
            what = "does not exist" if not os.path.lexists(path) else "is not a regular file"
            raise Unusable(f"video {path} {what}")
        try:
            found = probe(source)
        except ValueError as e:
            raise Unusable(f"video does not decode ({e})") from None
        fps, total, width, height = found.fps, found.frames, found.width, found.height
    try:
        indices = sample_indices(total, fps, rule)
        size = frame_size(width, height, len(indices), rule, min_pixels, max_pixels, factor)
    except (ValueError, ZeroDivisionError, AssertionError) as e:
        raise Unusable(f"video {width}x{height} of {total} frames cannot be sampled and resized ({e})") from None
    return Clip(source, fps, total, indices, size)


def _video_cell(value, root: Path) -> dict:
    """A video file as a cell {"bytes": ..., "path": ...}: a path (relative ones under `root`), bytes, or a cell."""
    if isinstance(value, dict):
        path = value.get("path")
        if not value.get("bytes") and isinstance(path, str) and not Path(path).expanduser().is_absolute():
            return {**value, "path": str(root / path)}
        return value
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        return {"bytes": None, "path": str(path if path.is_absolute() else root / path)}
    return {"bytes": None, "path": None}


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


def open_cell(cell: dict) -> Image.Image:
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
    with open_cell(example.image) as image:
        return to_rgb(image)


def open_images(example: Example) -> list[Image.Image]:
    """Every image of the example, RGB, in order."""
    images = []
    for cell in example.images:
        with open_cell(cell) as image:
            images.append(to_rgb(image))
    return images


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int, factor: int) -> Image.Image:
    """qwen-vl-utils' resizing: sides multiples of `factor` (the family's patch x merge: 28 or 32), area within
    [min_pixels, max_pixels], aspect kept."""
    from qwen_vl_utils import fetch_image

    return fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels},
                       image_patch_size=factor // 2)


def open_clip(clip: Clip) -> torch.Tensor:
    """The clip's sampled frames at their chosen size.  -> [T, C, H, W] uint8"""
    if isinstance(clip.source, dict):
        return read_frames(clip.source, clip.indices, clip.size)
    frames = []
    for index in clip.indices:
        with open_cell(clip.source[index]) as image:
            rgb = torch.from_numpy(np.asarray(to_rgb(image))).permute(2, 0, 1)  # [C, H, W]
        frames.append(resize_frame(rgb, clip.size))
    return torch.stack(frames)
