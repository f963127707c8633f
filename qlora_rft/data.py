"""Datasets in the released ViRFT schema (image, problem, solution) and turning a row into model inputs.

Sources: a parquet file or folder, any `datasets.load_dataset` path (never `load_from_disk`), a LISA-style JSON
(a `.json` file, or a folder holding `SPLIT.json`; image paths relative to it), or `synthetic:NAME`.
Bad rows (an image that does not decode, a solution that does not parse) are skipped and counted, or refused.
Images are resized with qwen-vl-utils' rule and the config's pixel bounds, the same in training and evaluation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from qlora_rft.errors import DataError
from qlora_rft.tasks import Task

REQUIRED_COLUMNS = ("image", "problem", "solution")


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

    def __len__(self) -> int:
        return len(self.examples)


def resolve_source(source: str) -> str:
    """`synthetic:NAME[/PATH]` -> its folder in the cache (written on first use), or PATH inside it; anything
    else unchanged."""
    if source.startswith("synthetic:"):
        from qlora_rft.tasks import synthetic
        from qlora_rft.tiny import cache_dir

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
            table = datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)
        elif path.is_dir() and _split_parquet(path, split):
            files = [str(f) for f in _split_parquet(path, split)]
            table = datasets.load_dataset("parquet", data_files={split: files}, split=split)
        elif path.is_dir():
            table = datasets.load_dataset(str(path), split=split)
        else:
            table = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"cannot load split {split!r} of {source}: {e}") from None
    except ConnectionError as e:
        raise DataError(f"{source} is neither a local file/folder nor reachable: {e}") from None
    return table


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

    json_file = _json_source(resolved, split)
    if json_file is not None:
        from qlora_rft.tasks.grounding import load_lisa_json

        rows = load_lisa_json(json_file, image_root or None)
        return rows, list(rows[0].keys()) if rows else list(REQUIRED_COLUMNS)
    table = _load_table(resolved, split)
    if "image" in table.column_names and isinstance(table.features["image"], datasets.Image):
        table = table.cast_column("image", datasets.Image(decode=False))
    return table, table.column_names


def load_split(source: str, split: str, task: Task, on_bad_row: str = "skip", image_root: str | None = None
               ) -> Dataset:
    """Every usable row of one split; bad rows are reported by index and skipped or refused."""
    resolved = resolve_source(source)
    rows, columns = _rows(resolved, split, image_root)
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise DataError(
                f"{resolved} (split {split!r}) has no column {column!r}; it has {', '.join(columns)}. "
                "Visual-RFT data needs image, problem and solution"
            )
    examples, skipped = [], []
    for index, row in enumerate(rows):
        reason = _check_row(row, task)
        if reason is None:
            examples.append(Example(index, row["problem"], row["solution"], _as_cell(row["image"])))
            continue
        if on_bad_row == "error":
            raise DataError(f"{resolved} split {split!r} row {index}: {reason} (set data.on_bad_row=skip to skip it)")
        skipped.append(BadRow(index, reason))
    if not examples:
        raise DataError(f"{resolved} split {split!r} has no usable rows ({len(skipped)} bad)")
    return Dataset(source=resolved, split=split, examples=examples, skipped=skipped)


def _as_cell(image) -> dict:
    if isinstance(image, dict):
        return image
    if isinstance(image, str):
        return {"bytes": None, "path": image}
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    return {"bytes": None, "path": None}


def _check_row(row: dict, task: Task) -> str | None:
    if not isinstance(row.get("problem"), str) or not row["problem"].strip():
        return "empty problem"
    if not isinstance(row.get("solution"), str) or task.parse_solution(row["solution"]) is None:
        return f"solution does not parse as a {task.name} answer: {str(row.get('solution'))[:80]!r}"
    try:
        with _open(_as_cell(row["image"])) as image:
            image.verify()
    except Exception as e:  # any decoder error means the same thing to the user: this image is unusable
        return f"image does not decode ({type(e).__name__}: {e})"
    return None


def _open(cell: dict) -> Image.Image:
    if cell.get("bytes"):
        return Image.open(io.BytesIO(cell["bytes"]))
    if cell.get("path"):
        return Image.open(cell["path"])
    raise ValueError("no image bytes or path")


def open_image(example: Example) -> Image.Image:
    return _open(example.image).convert("RGB")


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """qwen-vl-utils' resizing: sides multiples of 28, area within [min_pixels, max_pixels], aspect kept."""
    from qwen_vl_utils import fetch_image

    return fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels})


# ----------------------------------------------------------------------------- prompts


@dataclass
class PromptInputs:
    """Processor outputs for one prompt (batch of 1), on the model's device."""

    input_ids: torch.Tensor  # [1, P]
    attention_mask: torch.Tensor  # [1, P]
    mm_token_type_ids: torch.Tensor  # [1, P]
    pixel_values: torch.Tensor  # [patches, C*t*p*p]
    image_grid_thw: torch.Tensor  # [1, 3]
    vision: tuple[torch.Tensor, ...] | None = None  # the image's features ([tokens, H] each), once computed

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


def shared_features(features: tuple[torch.Tensor, ...]) -> dict:
    """Precomputed image features in the form Qwen2-VL's forward takes instead of pixel_values."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}


def messages(task: Task, problem: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.prompt(problem)}]}]


def prompt_text(processor, task: Task, problem: str) -> str:
    return processor.apply_chat_template(messages(task, problem), add_generation_prompt=True, tokenize=False)


def encode_prompts(
    processor, task: Task, examples: list[Example], min_pixels: int, max_pixels: int, max_prompt_length: int,
    device: torch.device,
) -> dict:
    """Left-padded batch inputs for several prompts (processor output, on device)."""
    texts = [prompt_text(processor, task, ex.problem) for ex in examples]
    images = [resize_image(open_image(ex), min_pixels, max_pixels) for ex in examples]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    length = batch["input_ids"].shape[1]
    if length > max_prompt_length:
        raise DataError(
            f"a prompt is {length} tokens, over data.max_prompt_length={max_prompt_length} (rows "
            f"{[ex.index for ex in examples]}); prompts are never cut (image tokens would be lost): raise "
            "data.max_prompt_length or lower data.max_pixels"
        )
    return {k: v.to(device) for k, v in batch.items()}


def encode_prompt(processor, task: Task, example: Example, data_cfg, device: torch.device) -> PromptInputs:
    batch = encode_prompts(
        processor, task, [example], data_cfg.min_pixels, data_cfg.max_pixels, data_cfg.max_prompt_length, device
    )
    return PromptInputs(**{k: batch[k] for k in PromptInputs.__dataclass_fields__ if k != "vision"})
