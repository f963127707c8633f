"""What a model family is (`Family`) and the pieces family modules share; `models/__init__.py` lists the families.

Kept apart from the list so that the family modules and the list never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

LANGUAGE_LORA = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"  # every family's text layers


# The Qwen conversation format (ChatML) in Ollama's template language; images go where Ollama places them.
OLLAMA_CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class GgufFormat:
    """How llama.cpp reads a family: a language model file of architecture `arch` and a vision projector (mmproj)
    file of type `projector`, both members of the gguf package's MODEL_ARCH and VisionProjectorType (resolved by
    qlora_rft/gguf_export.py, so that this module imports no gguf)."""

    arch: str  # MODEL_ARCH member, e.g. "QWEN2VL" (written "qwen2vl")
    projector: str  # VisionProjectorType member, e.g. "QWEN25VL" (written "qwen2.5vl_merger")
    # vision tower tensor, named under `model.visual.` without .weight/.bias (`{bid}` a block, `{ds}` the ds-th
    # deepstack merger) -> its GGUF name (`{bid}` the block; for a deepstack merger the vision block it reads); a
    # tuple of names splits the tensor into that many equal row blocks (a fused q/k/v)
    vision_tensors: dict[str, str | tuple[str, ...]]
    # (GGUFWriter, the model's transformers config) -> writes the family's own keys into the mmproj / text file; a
    # UserError for a checkpoint llama.cpp cannot run
    vision_keys: Callable[[object, dict], None]
    text_keys: Callable[[object, dict], None] | None = None
    ollama_template: str = OLLAMA_CHATML  # the family's chat template for Ollama's Modelfile (TEMPLATE)
    ollama_system: str = ""  # its default system prompt (SYSTEM), if the family's template has one


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
    # processor outputs, one per video, that the model's forward takes for the clip's time (Qwen2.5-VL: seconds per
    # temporal patch); a family that writes timestamps into the prompt text (Qwen3-VL) needs none
    time_inputs: tuple[str, ...] = ()
    presets: dict[str, dict] = field(default_factory=dict)  # preset name -> shape for build_config
    gguf: GgufFormat | None = None  # how llama.cpp reads it (`qlora-rft export --format gguf`); None: refused
    # config attributes naming the vision placeholder tokens: never sampled (one in a completion would be taken for
    # an image slot in the next forward)
    suppressed_tokens: tuple[str, ...] = ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id")
    # the same placeholders as text (and Qwen's vision padding token): a row whose prompt or solution holds one is a
    # bad row, since the processor would take it for an image slot
    vision_tokens: tuple[str, ...] = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                                      "<|vision_pad|>")

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
        return self._encode(model.model.get_image_features, pixel_values, grid_thw)

    def encode_videos(self, model, pixel_values_videos, grid_thw) -> tuple:
        """`encode_images` for videos: per video, the features of all its temporal patches at every level."""
        return self._encode(model.model.get_video_features, pixel_values_videos, grid_thw)

    def _encode(self, features, pixels, grid_thw) -> tuple:
        import torch

        with torch.no_grad():
            out = features(pixels, grid_thw, return_dict=True)
        levels = [out.pooler_output, *(self.vision_features(out) if self.vision_features else [])]  # [L][items]
        return tuple(tuple(level[i].detach() for level in levels) for i in range(len(out.pooler_output)))


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's split of the rotary half into temporal / height / width sections, in the released ratio
    (128 -> [16, 24, 24])."""
    half = head_dim // 2
    return [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
