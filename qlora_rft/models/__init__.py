"""Model families: everything that differs between Qwen2-VL, Qwen2.5-VL and Qwen3-VL, one module per family.

A checkpoint's family is picked from its config.json `model_type` (`family_of`); no other module names a family.
To add one, copy the closest family module, change what differs, and list it in `families()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qlora_rft.errors import UserError

LANGUAGE_LORA = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"  # every family's text layers


@dataclass(frozen=True)
class Family:
    """What one model family needs to be loaded, trained, sampled and built at random."""

    name: str  # as its authors write it, e.g. "Qwen2.5-VL"
    model_types: tuple[str, ...]  # config.json model_type values it serves
    model_class: str  # transformers class of the image-text-to-text model
    processor_class: str  # transformers class of its processor
    patch_size: int  # vision patch side, pixels
    merge_size: int  # patches merged per side into one image token
    min_pixels: int  # the released processor's image area bounds
    max_pixels: int
    box_convention: str  # "relative" (0-1000 of the image) or "absolute" (pixels of the resized image)
    vision_lora: str  # peft regex of the vision tower's linears and merger (lora.train_vision)
    build_config: Callable[..., object]  # (token ids, **shape) -> transformers config
    build_processor: Callable[..., object]  # (tokenizer, chat_template, min_pixels, max_pixels) -> processor
    vision_features: Callable[[object], list] | None = None  # get_image_features output -> extra levels
    presets: dict[str, dict] = field(default_factory=dict)  # preset name -> shape for build_config
    # config attributes naming the vision placeholder tokens: never sampled (one in a completion would be taken for
    # an image slot in the next forward)
    suppressed_tokens: tuple[str, ...] = ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id")

    @property
    def factor(self) -> int:
        """Resized image sides are multiples of this: one image token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def frame(self, width: int, height: int):
        """The box coordinates this family is asked for on a width x height (resized) input image."""
        from qlora_rft.tasks.boxes import RELATIVE, Frame

        return Frame(width, height) if self.box_convention == "absolute" else RELATIVE

    def transformers_class(self):
        import transformers

        return getattr(transformers, self.model_class)

    def lora_regex(self, target_modules, train_vision: bool) -> str:
        """peft target_modules regex: the named linears of the language model (and the vision tower's if asked)."""
        pattern = LANGUAGE_LORA.format(names="|".join(target_modules))
        return pattern + "|" + self.vision_lora if train_vision else pattern

    def encode_images(self, model, pixel_values, grid_thw) -> tuple:
        """The vision tower run once (no grad): per image, its features at every level the language model takes
        (the merged output first, then deepstack levels where the family has them)."""
        import torch

        with torch.no_grad():
            out = model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        levels = [out.pooler_output, *(self.vision_features(out) if self.vision_features else [])]  # [L][images]
        return tuple(tuple(level[i].detach() for level in levels) for i in range(len(out.pooler_output)))


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


def preset_names() -> list[str]:
    """Every family's presets (`tiny:NAME`, `tiny-model --preset NAME`, `bench --preset NAME`)."""
    return [name for family in families() for name in family.presets]


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's split of the rotary half into temporal / height / width sections, in the released ratio
    (128 -> [16, 24, 24])."""
    half = head_dim // 2
    return [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
