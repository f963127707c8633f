"""The original Visual-RFT's classification evaluation lists (`<set>.pth` + `<set>.txt`) as parquet in our schema.

The .pth is a list of `{image path on the authors' machine: {"label": tensor, ...}}`, read with
`torch.load(weights_only=True)` only: a file that needs more (pickled objects, which could run code) is refused
unread. The .txt names the classes, one a line, in label order. Each path is re-rooted onto a local image folder by
its longest tail found there, down to the file name alone. Rows: image (its local path), problem, solution
(`<answer>class name</answer>`), label and the original path.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from qlora_rft.errors import DataError, OutputError, UserError
from qlora_rft.files import atomic_file, refuse_inputs, reporting_full_disk
from qlora_rft.tasks.classification import normalise

# The original's evaluation question per set (named by the .pth file's stem), less its answer-format lines: our
# prompt adds the think/answer instruction, as in training. With ORIGINAL_FORMAT it is their question verbatim
# (a problem holding "<answer>" is asked as it is).
QUESTIONS = {
    "fgvc_aircraft": "This is an image containing an aircraft. Please identify the model of the aircraft based on "
                     "the image.",
    "oxford_flowers": "This is an image containing a plant. Please identify the species of the plant based on the "
                      "image.",
    "pets": "This is an image containing a pet. Please identify the species of the pet based on the image.",
    "stanford_cars": "This is an image containing a car. Please identify the model of the car based on the image.",
}
ORIGINAL_FORMAT = (
    "\nOutput the thinking process in <think> </think> and final answer in <answer> </answer> tags.The output "
    "answer format should be as follows:\n<think> ... </think> <answer>species name</answer>\nPlease strictly "
    "follow the format."
)
SHOWN = 3  # missing images named in an error


@dataclass(frozen=True)
class Entry:
    path: str  # as written in the .pth (a path on the authors' machine)
    label: int


@dataclass
class Conversion:
    out: Path
    rows: int
    classes: int
    missing: list[str] = field(default_factory=list)  # original paths left out for want of an image (skip_missing)


def read_entries(pth: Path) -> list[Entry]:
    """The (path, label) entries of a .pth list, in order; anything not shaped like the released files is refused."""
    data = _load(pth)
    shape = "a list of {image path: {'label': integer tensor, ...}} (the original's classification list)"
    if not isinstance(data, (list, tuple)):
        raise DataError(f"{pth} holds a {type(data).__name__}, not {shape}")
    if not data:
        raise DataError(f"{pth} holds an empty list: no images to convert")
    entries = []
    for index, item in enumerate(data):
        if not isinstance(item, dict) or not item:
            what = "an empty dict" if isinstance(item, dict) else f"a {type(item).__name__}"
            raise DataError(f"{pth} entry {index} is {what}, not a dict of image path -> label record: the file "
                            f"should be {shape}")
        for path, record in item.items():
            if not isinstance(path, str) or not isinstance(record, dict) or "label" not in record:
                raise DataError(f"{pth} entry {index} ({str(path)[:80]!r}) is not an image path with a record "
                                f"holding 'label': the file should be {shape}")
            entries.append(Entry(path, _label(record["label"], pth, index)))
    return entries


def _load(pth: Path):
    if not pth.is_file():
        raise DataError(f"{pth} not found: pass the .pth list of the original's classification evaluation")
    try:
        return torch.load(pth, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise DataError(f"{pth} was refused: it holds pickled Python objects ({found.group(1)}) beyond tensors "
                            "and plain values, and unpickling them could run code; the released lists need none "
                            "(use the original file)") from None
        reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))
        raise DataError(f"{pth} is not a readable torch.save file of tensors and plain values (the weights-only "
                        f"loader stops: {reason.group(1) if reason else _first_line(e)})") from None
    except Exception as e:  # any other loader failure means the same to the user: not a readable torch file
        raise DataError(f"{pth} is not a readable torch.save file ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "empty or truncated"


def _label(value, pth: Path, index: int) -> int:
    """An integer label: a one-element integer tensor (as released) or a Python int."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype in _INTEGER_DTYPES:
        return int(value.item())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    shown = f"tensor of {value.dtype}, shape {list(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
    raise DataError(f"{pth} entry {index} has label {shown[:80]}: a label must be one integer (a class index)")


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def read_class_names(txt: Path) -> list[str]:
    """The class names, one a line, stripped (as the original reads them); trailing blank lines are ignored.

    A blank line inside (it would shift every later label), a name with nothing left after normalisation, or two
    names equal after it (an answer could not tell them apart) are refused."""
    if not txt.is_file():
        raise DataError(f"class-name list {txt} not found: pass --classes, the .txt naming the classes in label order")
    names = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f"class-name list {txt} is empty: it should name the classes, one a line, in label order")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        key = normalise(name)
        if not key:
            what = "blank" if not name else f"{name!r}, empty once normalised"
            raise DataError(f"class-name list {txt} line {index + 1} is {what}: every line must name a class "
                            "(a blank line would shift the labels after it)")
        if key in seen:
            raise DataError(f"class-name list {txt} lines {seen[key] + 1} and {index + 1} ({names[seen[key]]!r}, "
                            f"{name!r}) are the same class once normalised (case, spaces, '_' and '-' ignored): an "
                            "answer could not tell them apart; rename one")
        seen[key] = index
    return names


def find_image(path: str, root: Path) -> Path | None:
    """`path`'s image under `root`: its longest tail that exists there, down to the file name alone; None if none.

    >>> find_image("/mnt/x/data/oxford_flowers/jpg/image_00172.jpg", Path("/nowhere")) is None
    True
    """
    parts = PurePosixPath(path.replace("\\", "/")).parts
    cut = max((i + 1 for i, part in enumerate(parts) if part in ("/", "..")), default=0)  # never above root
    parts = parts[cut:]
    for start in range(len(parts)):
        candidate = os.path.join(root, *parts[start:])  # not pathlib: thousands of images, several tries each
        if os.path.isfile(candidate):
            return Path(candidate)
    return None


def convert(pth: str | Path, image_root: str | Path, out: str | Path, classes: str | Path | None = None,
            problem: str | None = None, original_question: bool = False, skip_missing: bool = False,
            overwrite: bool = False) -> Conversion:
    """Write `out` (parquet: image, problem, solution, label, original_path) from a .pth list and its class names
    (default: the .txt of the same stem beside it). The problem is `problem`, else the set's question (`QUESTIONS`);
    `original_question` appends the original's answer-format lines (their question verbatim). Images missing under
    `image_root` are refused, naming the first ones, unless `skip_missing` leaves them out. `out` is written whole
    or not at all; an existing one is replaced only with `overwrite`. Images are found, not decoded: the data loader
    checks each when the rows are used."""
    from qlora_rft.tasks.synthetic import write_parquet

    pth, root, out = Path(pth).expanduser(), Path(image_root).expanduser(), Path(out).expanduser()
    if out.is_dir():
        raise OutputError(f"output {out} is a folder: name the parquet file to write, e.g. {out / 'test.parquet'}")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} exists: pass --overwrite to replace it, or choose another output")
    class_file = Path(classes).expanduser() if classes else pth.with_suffix(".txt")
    refuse_inputs(out, [pth, class_file], "--out")
    if not root.is_dir():
        raise DataError(f"image root {root} is not a folder: pass the folder holding the set's images")
    question = problem if problem is not None else QUESTIONS.get(pth.stem)
    if question and original_question:
        question += ORIGINAL_FORMAT
    if not question or not question.strip():
        raise UserError(f"no question for a set named {pth.stem!r} (known: {', '.join(QUESTIONS)}): pass --problem "
                        "with the question to ask about each image")
    names = read_class_names(class_file)
    entries = read_entries(pth)
    outside = [e for e in entries if not 0 <= e.label < len(names)]
    if outside:
        first = outside[0]
        raise DataError(f"{pth}: {len(outside)} labels outside the {len(names)} classes of the class-name list "
                        f"(labels 0-{len(names) - 1}; first: label {first.label} of {first.path}): pass the .txt of "
                        "the same set")
    rows, missing = [], []
    for entry in entries:
        image = find_image(entry.path, root)
        if image is None:
            missing.append(entry.path)
            continue
        rows.append({"image": {"bytes": None, "path": str(image.resolve())}, "problem": question,
                     "solution": f"<answer>{names[entry.label]}</answer>", "label": entry.label,
                     "original_path": entry.path})
    if missing and (not skip_missing or not rows):
        shown = ", ".join(missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "")
        fix = "" if skip_missing else ", or pass --skip-missing to leave them out"
        raise DataError(f"{len(missing)} of {len(entries)} images of {pth} are not under {root} (looked for each "
                        f"path's tail, longest first, down to the file name): {shown}; point --image-root at the "
                        f"folder holding them{fix}")
    with reporting_full_disk(str(out), "nothing was written: free some space and convert again"):
        with atomic_file(out) as tmp:
            write_parquet(rows, tmp)
    return Conversion(out, len(rows), len(names), missing)
