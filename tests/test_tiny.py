"""The locally built Qwen2-VL: a from_pretrained folder that plain transformers loads, deterministic for a seed."""

from __future__ import annotations

import json

import torch

from qlora_rft import tiny
from qlora_rft.tiny import SPECIAL_TOKENS


def test_tiny_model_round_trips_through_from_pretrained(tmp_path):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    out = tiny.write_model(tmp_path / "m", preset="tiny", seed=3)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    model = Qwen2VLForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    for token in SPECIAL_TOKENS:
        assert processor.tokenizer.convert_tokens_to_ids(token) is not None
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert text.endswith("<|im_start|>assistant\n") and "<|vision_start|><|image_pad|><|vision_end|>hi" in text
    # Same seed, same weights; another seed, other weights.
    again, _ = tiny.build_model("tiny", seed=3)
    other, _ = tiny.build_model("tiny", seed=4)
    name, weight = next(iter(model.state_dict().items()))
    assert torch.equal(weight, again.state_dict()[name])
    assert not torch.equal(weight, other.state_dict()[name])
    assert json.loads((out / "qlora_rft.json").read_text()) == {"preset": "tiny", "seed": 3}


def test_real_presets_have_the_published_shapes():
    tok = tiny.build_tokenizer()
    for name, hidden, vocab in (("qwen2-vl-2b", 1536, 151936), ("qwen2-vl-7b", 3584, 152064)):
        cfg = tiny.build_config(name, tok)
        assert cfg.text_config.hidden_size == hidden and cfg.text_config.vocab_size == vocab
        assert cfg.text_config.num_hidden_layers == 28
        assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
        assert cfg.vision_config.depth == 32 and cfg.vision_config.embed_dim == 1280
    assert tiny.build_config("qwen2-vl-2b", tok).tie_word_embeddings


def test_cached_model_is_built_once(private_cache):
    first = tiny.cached_model("tiny")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny.cached_model("tiny") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert str(first).startswith(str(private_cache))
