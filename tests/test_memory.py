"""What the model and the device can hold: the estimate worked by hand on the tiny preset, and settings past the
model's context, its layer widths or the device's memory refused in one line before any weights load."""

from __future__ import annotations

import pytest
import torch

from qlora_rft import memory
from qlora_rft.cli import main
from qlora_rft.config import load_config
from qlora_rft.errors import ConfigError
from qlora_rft.model import resolve_model_path

CPU = torch.device("cpu")
SMALL = ["model.name_or_path=tiny:tiny", "grpo.num_generations=8", "data.max_prompt_length=128",
         "grpo.max_completion_length=32", "lora.r=16"]


def test_the_tiny_presets_shape_is_read_from_its_config():
    shape = memory.Shape.of(resolve_model_path("tiny:tiny"))
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == \
        (64, 128, 2, 4, 2, 16)
    assert shape.context == 32768 and shape.vocab > 0


def test_the_estimate_by_hand(monkeypatch):
    # tiny: 2 layers, 64 wide, 2 KV heads of 16, fp32 on the CPU. One sequence: 128 prompt + 32 completion = 160.
    # KV per token 2 x 2 x 2 x 16 x 4 = 512 B; a backward keeps 2 x 64 x 4 = 512 B per token; G = 8 at once:
    #   sampling 8 x 160 x 512 = 655,360; backward 655,360 + log-probs min(1024, 8 x 32) x vocab 768 x 4 = 786,432:
    #   1,441,792 B = 1.38 MiB.
    # LoRA r = 16 on q (64+64), k (64+32), v (64+32), o (64+64), gate (64+128), up (64+128), down (128+64) = 1024
    #   per layer: 16 x 1024 x 2 layers x (weight + gradient) x 4 B = 262,144 = 0.25 MiB. In all 1.62 MiB.
    cfg = load_config(None, SMALL)
    folder = resolve_model_path("tiny:tiny")
    assert memory.Shape.of(folder).vocab == 768
    total = 262_144 + 655_360 + 256 * 768 * 4
    monkeypatch.setattr(memory, "device_memory", lambda device: total)
    memory.check_training_fits(cfg, folder, CPU)
    monkeypatch.setattr(memory, "device_memory", lambda device: total - 1)
    with pytest.raises(ConfigError, match=r"these settings need at least 1.62 MiB at once \(the layer inputs one "
                                          r"backward keeps, and a log-prob chunk: 1.38 MiB plus 0.25 MiB of LoRA "
                                          r"weights and gradients \(lora.r=16\)\) and the cpu has 1.62 MiB: lower "
                                          r"grpo.num_generations / grpo.backward_chunk"):
        memory.check_training_fits(cfg, folder, CPU)


@pytest.mark.parametrize(
    "command,override,message",
    [
        ("train", "grpo.num_generations=1000000", "at once (the layer inputs one backward keeps, and a log-prob chunk"),
        ("train", "grpo.max_completion_length=1000000000", "data.max_prompt_length=128 + grpo.max_completion_length="
                                                           "1000000000 tokens exceed the model's context of 32768"),
        ("train", "lora.r=1000000000", "lora.r=1000000000 is wider than the narrowest adapted layer (64)"),
        ("train", "grpo.generation_chunk=0 grpo.num_generations=100000 grpo.backward_chunk=1",
         "(the KV cache of one generate call"),
        ("eval", "eval.batch_size=1000000000", "(the KV cache of one evaluation batch"),
        ("eval", "eval.max_new_tokens=1000000", "eval.max_new_tokens=1000000 tokens exceed the model's context"),
    ],
)
def test_settings_past_the_model_or_the_device_are_one_line_before_any_weights_load(tmp_path, capsys, monkeypatch,
                                                                                     command, override, message):
    import qlora_rft.model

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(qlora_rft.model, "load_base", no_loading)
    out = f"train.output_dir={tmp_path / 'run'}" if command == "train" else f"eval.output_dir={tmp_path / 'eval'}"
    code = main([command, "configs/tiny_demo.yaml", *override.split(), out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
