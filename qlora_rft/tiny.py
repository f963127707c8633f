"""Build Qwen2-VL model folders locally: a byte-level BPE tokenizer trained here, the Qwen chat template, an image
processor, and random weights at a preset's shape. Deterministic for a seed; no hub needed.

Presets `tiny` and `cpu-small` run tests and the demo on a CPU; `qwen2-vl-2b` and `qwen2-vl-7b` are the real
architectures with random weights, which cost exactly what trained ones cost (memory and speed measurements).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_rft.errors import UserError
from qlora_rft.files import atomic_folder

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's conversation format (system prompt, role headers, one image placeholder per image item).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_dim: int
    vision_heads: int
    vocab: int | None = None  # None: the local tokenizer's size
    tie_embeddings: bool = False


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 2, 4, 2, 128, vision_depth=2, vision_dim=32, vision_heads=2),
    "cpu-small": Preset(128, 4, 4, 2, 384, vision_depth=2, vision_dim=64, vision_heads=4),
    "qwen2-vl-2b": Preset(1536, 28, 12, 2, 8960, 32, 1280, 16, vocab=151936, tie_embeddings=True),
    "qwen2-vl-7b": Preset(3584, 28, 28, 4, 18944, 32, 1280, 16, vocab=152064),
}


def cache_dir() -> Path:
    """Where generated models and data live: $QLORA_RFT_CACHE, else $XDG_CACHE_HOME/qlora_rft (~/.cache)."""
    if os.environ.get("QLORA_RFT_CACHE"):
        return Path(os.environ["QLORA_RFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora_rft"


# ----------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: the tasks' prompt and answer vocabulary (bytes cover everything else)."""
    from qlora_rft.tasks import corpus_lines

    words = corpus_lines()
    digits = [" ".join(str(i) for i in range(k, k + 50)) for k in range(0, 1001, 50)]
    return words * 20 + digits * 5


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


# ----------------------------------------------------------------------------- model


def build_config(preset: Preset, tokenizer):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = preset.hidden // preset.heads
    half = head_dim // 2  # mrope splits the rotary half into temporal / height / width sections
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # 64 -> [16, 24, 24]
    vocab = preset.vocab or len(tokenizer)
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=preset.hidden,
            intermediate_size=preset.intermediate,
            num_hidden_layers=preset.layers,
            num_attention_heads=preset.heads,
            num_key_value_heads=preset.kv_heads,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=preset.tie_embeddings,
        ),
        vision_config=dict(
            depth=preset.vision_depth,
            embed_dim=preset.vision_dim,
            hidden_size=preset.hidden,
            num_heads=preset.vision_heads,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=preset.tie_embeddings,
    )


def build_processor(tokenizer, min_pixels: int = 3136, max_pixels: int = 401408):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video = Qwen2VLVideoProcessor()
    return Qwen2VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE
    )


def build_model(preset_name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor) with random weights at the preset's shape."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    preset = _preset(preset_name)
    tokenizer = build_tokenizer()
    config = build_config(preset, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(dtype)
    # Qwen2-VL-Instruct ships these near-greedy settings; every sampler here must override them explicitly.
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.01,
        top_p=0.001,
        top_k=1,
    )
    return model, build_processor(tokenizer)


def write_model(out: str | Path, preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a from_pretrained folder (config, safetensors, tokenizer, processor, chat template) atomically."""
    out = Path(out)
    model, processor = build_model(preset, seed=seed, dtype=dtype)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "qlora_rft.json").write_text(json.dumps({"preset": preset, "seed": seed}))
    return out


def cached_model(preset: str, seed: int = 0) -> Path:
    """The folder of a random preset model in the cache, built on first use."""
    import hashlib

    _preset(preset)
    recipe = json.dumps([PRESETS[preset].__dict__, _corpus(), CHAT_TEMPLATE]).encode()
    path = cache_dir() / "models" / f"{preset}-seed{seed}-{hashlib.sha256(recipe).hexdigest()[:10]}"
    if not (path / "config.json").exists():
        write_model(path, preset=preset, seed=seed)
    return path


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
