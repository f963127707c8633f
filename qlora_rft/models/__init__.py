"""Model families: everything that differs between Qwen2-VL, Qwen2.5-VL and Qwen3-VL, one module per family.

A checkpoint's family is picked from its config.json `model_type` (`family_of`); no other module names a family.
To add one, copy the closest family module, change what differs, and list it in `families()`.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_rft.errors import UserError
from qlora_rft.models.family import Family


def families() -> tuple[Family, ...]:
    """Every supported family, oldest first."""
    from qlora_rft.models import qwen2_5_vl, qwen2_vl, qwen3_vl

    return (qwen2_vl.FAMILY, qwen2_5_vl.FAMILY, qwen3_vl.FAMILY)


def supported() -> str:
    """'Qwen2-VL (qwen2_vl), ...' for messages."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in families())


def family_of(source) -> Family:
    """The family of a model folder (its config.json), a config.json dict, a transformers config/model, or a
    processor; a UserError listing the supported model_type values otherwise."""
    if hasattr(source, "image_processor"):
        for family in families():
            if type(source).__name__ == family.processor_class:
                return family
        raise UserError(f"a {type(source).__name__} is not the processor of a supported model ({supported()})")
    if isinstance(source, (str, Path)):
        config_file = Path(source) / "config.json"
        try:
            source = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {config_file} ({e}): pass a from_pretrained model folder") from None
    source = getattr(source, "config", source)  # a model -> its config
    model_type = source.get("model_type") if isinstance(source, dict) else getattr(source, "model_type", None)
    for family in families():
        if model_type in family.model_types:
            return family
    raise UserError(f"a {model_type!r} model (config.json's model_type) is not supported; supported are "
                    f"{supported()}")


def vision_token_in(text: str) -> str | None:
    """The first vision placeholder token of any family found in `text` (a row's prompt or solution), or None."""
    for token in sorted({token for family in families() for token in family.vision_tokens}):
        if token in text:
            return token
    return None


def preset_names() -> list[str]:
    """Every family's presets (`tiny:NAME`, `tiny-model --preset NAME`, `bench --preset NAME`)."""
    return [name for family in families() for name in family.presets]
