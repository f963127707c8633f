"""The original Visual-RFT's class-existence maps, read for `eval.protocol=paper`: per COCO/LVIS image, the classes
its detection evaluation asks about (the base model's own predictions, released as JSON).

A map is `{"<image id>": ["class name", ...], ...}` with the category names of the annotation file. The original asks
an image exactly its listed classes that are in the evaluated set, in the listed order; an image listed with none
of them is not asked at all (its ground truth still counts as missed when scored).
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_rft.errors import DataError

SHOWN = 3  # ids or names quoted in an error message


def read_exist_map(path: str | Path) -> dict[str, list[str]]:
    """The map as released: image id (a string of digits, as JSON keys are) -> class names. DataError when the file
    is missing, not JSON, or not an object of lists of names."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"eval.exist_map={path} not found: pass a class-existence map, e.g. the original's "
                        "coco_evaluation/exist_map_coco_Qwen2_vl_2B_baseline.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot read class-existence map {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"class-existence map {path} must be a JSON object {{\"<image id>\": [\"class name\", ...]}}, "
                        f"not a {type(data).__name__}")
    for key, names in data.items():
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise DataError(f"class-existence map {path}: image {key!r} must list class names, not {names!r:.80}")
    return data


def check_exist_map(exist_map: dict[str, list[str]], image_ids: list, categories: list[str], path: str | Path,
                    annotations: str | Path) -> None:
    """Refuse a map that is not the annotation file's: one that lists none of its images or none of its category
    names, or that leaves some of its images out (the original evaluation fails on those; an image with nothing
    to ask is listed with [])."""
    ids = [str(image_id) for image_id in image_ids]
    common = [image_id for image_id in ids if image_id in exist_map]
    if not common:
        raise DataError(f"class-existence map {path} has no image id in common with {annotations} (it lists "
                        f"{_some(list(exist_map))}; the annotations have {_some(ids)}): use the map made for these "
                        "annotations (coco_evaluation/ for COCO val2017, lvis_evaluation/ for LVIS v1 val)")
    missing = [image_id for image_id in ids if image_id not in exist_map]
    if missing:
        raise DataError(f"class-existence map {path} lists no entry for {len(missing)} of the {len(ids)} images of "
                        f"{annotations} (e.g. {_some(missing)}): use the map made for these annotations, or an "
                        "annotation file of the mapped images only")
    listed = {name for names in exist_map.values() for name in names}
    if listed and not listed & set(categories):
        raise DataError(f"class-existence map {path} names no category of {annotations} (it lists "
                        f"{_some(sorted(listed))}; the annotations have {_some(categories)}): names must be spelled "
                        "as the annotation file's categories")


def asked_classes(listed: list[str], evaluated: list[str]) -> list[str]:
    """The classes an image is asked under the paper protocol: its listed ones that are evaluated, in the listed
    order, each once.

    >>> asked_classes(["person", "dog", "bus", "dog"], ["bus", "train", "dog"])
    ['dog', 'bus']
    """
    chosen = set(evaluated)
    return list(dict.fromkeys(name for name in listed if name in chosen))


def _some(values: list) -> str:
    shown = ", ".join(repr(v) for v in values[:SHOWN])
    return shown + (f" and {len(values) - SHOWN} more" if len(values) > SHOWN else "")
