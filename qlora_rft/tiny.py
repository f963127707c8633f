"""Build model folders of any family locally: a byte-level BPE tokenizer trained here, the Qwen chat template, the
family's processor, and random weights at a preset's shape. Deterministic for a seed; no hub needed.

Presets come from the family modules (`qlora_rft.models`): CPU sizes (`tiny`, `tiny-tied`, `cpu-small`,
`qwen2.5-vl-tiny`, `qwen3-vl-tiny`) run tests and the demo; the real shapes (`qwen2-vl-7b`, `qwen3-vl-8b`, ...) have random weights,
which cost exactly what trained ones cost (memory and speed measurements).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora_rft.errors import UserError
from qlora_rft.files import atomic_folder, cache_dir, check_output_folder
from qlora_rft.models import Family, families

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen conversation format (system prompt, role headers, one placeholder per image or video item, in order).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# preset name -> (family, shape): each family module lists its own presets, real shapes cited there.
PRESETS: dict[str, tuple[Family, dict]] = {name: (f, shape) for f in families() for name, shape in f.presets.items()}
SMALL_PRESETS = tuple(name for name, (_, shape) in PRESETS.items() if shape["hidden"] <= 128)  # CPU sizes
TINY_PIXELS = (3136, 401408)  # the processor's pixel bounds in presets built here (data.* bounds resize first)


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


def build_config(preset_name: str, tokenizer):
    """The transformers config of a preset, with this tokenizer's special token ids."""
    family, shape = _preset(preset_name)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    shape = {"vocab": len(tokenizer), **shape}  # a preset without `vocab` takes the local tokenizer's size
    return family.build_config(ids, **shape)


def build_processor(preset_name: str, tokenizer):
    family, shape = _preset(preset_name)
    pixels = TINY_PIXELS if preset_name in SMALL_PRESETS else (family.min_pixels, family.max_pixels)
    return family.build_processor(tokenizer, CHAT_TEMPLATE, *pixels)


def build_model(preset_name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor) with random weights at the preset's shape."""
    from transformers import GenerationConfig

    family, _ = _preset(preset_name)
    tokenizer = build_tokenizer()
    config = build_config(preset_name, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = family.transformers_class()(config).to(dtype)
    # The released Instruct checkpoints ship near-greedy settings; every sampler here must override them explicitly.
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.01,
        top_p=0.001,
        top_k=1,
    )
    return model, build_processor(preset_name, tokenizer)


def write_model(out: str | Path, preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str = "cpu", overwrite: bool = False) -> Path:
    """Write a from_pretrained folder (config, safetensors, tokenizer, processor, chat template) atomically. A file,
    or a folder that is not empty, is refused unless `overwrite` (then the folder is replaced whole). The weights
    are made on `device` (a real shape in bf16 on a GPU: seconds, where fp32 on the CPU takes minutes)."""
    out = Path(out).expanduser()
    _preset(preset)
    check_output_folder(out, "--out", overwrite)
    model, processor = build_model(preset, seed=seed, dtype=dtype, device=device)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "qlora_rft.json").write_text(json.dumps({"preset": preset, "seed": seed}))
    return out


def cached_model(preset: str, seed: int = 0) -> Path:
    """The folder of a random preset model in the cache, built on first use."""
    import hashlib
    import inspect

    _preset(preset)
    family, shape = PRESETS[preset]
    processor = inspect.getsource(family.build_processor)  # a processor built otherwise is another folder
    recipe = json.dumps([family.name, shape, _corpus(), CHAT_TEMPLATE, processor]).encode()
    path = cache_dir() / "models" / f"{preset}-seed{seed}-{hashlib.sha256(recipe).hexdigest()[:10]}"
    if not (path / "config.json").exists():
        write_model(path, preset=preset, seed=seed, overwrite=True)
    return path


def _preset(name: str) -> tuple[Family, dict]:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
