"""The paper's evaluation class lists, by name (`eval.classes`), and how to resolve a class option.

COCO few-shot 8 and open-vocabulary 15 novel classes; LVIS few-shot 6 and open-vocabulary 13 rare classes.
"""

from __future__ import annotations

from qlora_rft.errors import ConfigError

CLASS_SETS: dict[str, tuple[str, ...]] = {
    "coco_fewshot8": ("bus", "train", "fire hydrant", "stop sign", "cat", "dog", "bed", "toilet"),
    "coco_ov15": (
        "mouse", "fork", "hot dog", "cat", "airplane", "suitcase", "parking meter", "sandwich", "train",
        "hair drier", "toilet", "toaster", "snowboard", "frisbee", "bear",
    ),
    "lvis_fewshot6": ("horse_buggy", "die", "kitchen_table", "omelet", "papaya", "stepladder"),
    "lvis_ov13": (
        "casserole", "die", "egg_roll", "futon", "garbage", "handsaw", "hippopotamus", "kitchen_table", "mallet",
        "omelet", "shot_glass", "stepladder", "sugar_bowl",
    ),
}


def resolve_classes(option: str | list, available: list[str]) -> list[str]:
    """`option` is a named set, `all` (every category of the annotations), or a list / comma-separated names.

    Every name must exist in `available` (the annotation file's category names).
    """
    if isinstance(option, str) and option in CLASS_SETS:
        names = list(CLASS_SETS[option])
    elif option in ("all", "", None, []):
        names = list(available)
    elif isinstance(option, str):
        names = [n.strip() for n in option.split(",") if n.strip()]
    else:
        names = [str(n) for n in option]
    missing = [n for n in names if n not in available]
    if missing:
        raise ConfigError(
            f"eval.classes names {missing} that the annotations do not have; use a named set "
            f"({', '.join(CLASS_SETS)}), 'all', or names from the annotation file"
        )
    return names
