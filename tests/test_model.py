"""4-bit base + LoRA: where the adapters go, the reference is the base itself, and sampling settings are ours."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import sample
from qlora_rft.config import load_config
from qlora_rft.data import load_split
from qlora_rft.errors import UserError
from qlora_rft.model import load_policy, reference_mode, resolve_model_path
from qlora_rft.prompts import encode_prompt
from qlora_rft.rollout import completion_logprobs
from qlora_rft.sampling import Settings
from qlora_rft.tasks import get_task


def _policy(overrides):
    cfg = load_config(None, overrides)
    return cfg, load_policy(cfg.model, cfg.lora)


def _prompt(cfg, policy):
    task = get_task(cfg.data.task)
    example = load_split(cfg.data.train, "train", task, min_pixels=cfg.data.min_pixels,
                         max_pixels=cfg.data.max_pixels, factor=policy.family.factor).examples[0]
    return encode_prompt(policy.processor, task, example, cfg.data, policy.device)


def test_qlora_base_is_4bit_and_adapters_sit_on_the_language_model_only(tiny_overrides):
    import bitsandbytes as bnb

    _, policy = _policy(tiny_overrides)
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(".language_model." in n for n in names)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in policy.base.model.language_model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in policy.base.model.visual.modules())
    assert policy.base.config.quantization_config.bnb_4bit_use_double_quant


def test_vision_adapters_when_asked(tiny_overrides):
    _, policy = _policy([*tiny_overrides, "lora.train_vision=true"])
    assert any(".visual." in n for n, p in policy.model.named_parameters() if p.requires_grad)


def test_reference_is_the_base_with_adapters_disabled(tiny_overrides):
    from qlora_rft.model import load_base, resolve_model_path

    cfg, policy = _policy(tiny_overrides)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero; make the adapters matter
            torch.nn.init.normal_(p, std=0.5)
    prompt = _prompt(cfg, policy)
    ids = torch.randint(7, 200, (2, 5))  # above the special and vision placeholder ids
    mask = torch.ones(2, 5)
    with torch.no_grad():
        with_adapters = completion_logprobs(policy.model, prompt, ids, mask, 1024)
    with reference_mode(policy.model):
        reference = completion_logprobs(policy.model, prompt, ids, mask, 1024)
    base = load_base(resolve_model_path(cfg.model.name_or_path), cfg.model, policy.device, policy.dtype)
    with torch.no_grad():
        plain = completion_logprobs(base, prompt, ids, mask, 1024)
    assert torch.allclose(reference, plain, atol=1e-5)
    assert not torch.allclose(with_adapters, plain, atol=1e-3)


def test_sampling_ignores_the_checkpoints_near_greedy_generation_config(tiny_overrides):
    # The tiny model ships Qwen2-VL-Instruct's trap: temperature 0.01, top_p 0.001, top_k 1.
    cfg, policy = _policy(tiny_overrides)
    assert policy.model.generation_config.temperature in (None, 1.0)
    torch.manual_seed(0)
    rollout = sample(policy, [_prompt(cfg, policy)], 8, 4, Settings(12))[0]
    assert rollout.completion_ids.shape[0] == 8
    assert len(set(rollout.texts)) > 1  # a near-greedy sampler would give 8 identical completions
    assert ((rollout.mask == 0) | (rollout.completion_ids != policy.tokens.vision[0])).all()


def test_generation_chunks_and_packed_prompts_give_the_group_size(tiny_overrides):
    cfg, policy = _policy(tiny_overrides)
    prompt = _prompt(cfg, policy)
    for chunk in (2, 4, 8):
        rollouts = sample(policy, [prompt, prompt], 4, chunk, Settings(6))
        assert [r.completion_ids.shape[0] for r in rollouts] == [4, 4]
        assert all(len(r.texts) == 4 for r in rollouts)


def test_lora_mode_keeps_a_full_precision_base(tiny_overrides):
    import bitsandbytes as bnb

    _, policy = _policy([*tiny_overrides, "model.mode=lora"])
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in policy.model.modules())
    assert any(p.requires_grad for n, p in policy.model.named_parameters() if "lora_" in n)



@pytest.mark.parametrize("mode", ["qlora", "full"])
def test_a_trainable_policy_is_in_training_mode_so_checkpointing_acts(tiny_overrides, mode):
    _, policy = _policy([*tiny_overrides, f"model.mode={mode}", "model.gradient_checkpointing=true"])
    layers = [m for m in policy.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m.training for m in layers)  # from_pretrained leaves them in eval mode


# ----------------------------------------------------------------------------- model folders


def _folder(tmp_path, config: dict | str, files=("model.safetensors", "tokenizer.json", "preprocessor_config.json")):
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for name in files:
        (folder / name).write_text("{}")
    return folder


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gpt2", "n_layer": 12}, "holds a 'gpt2' model"),
    ({"model_type": "bert", "hidden_size": 768}, "holds a 'bert' model"),
    ({"architectures": ["Foo"]}, "holds a None model"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "holds a None model"),
])
def test_a_folder_of_another_family_is_refused_before_loading(tmp_path, config, message):
    folder = _folder(tmp_path, config)
    with pytest.raises(UserError, match=message) as caught:
        resolve_model_path(str(folder))
    assert "Qwen2-VL (qwen2_vl)" in str(caught.value) or "JSON" in message


def test_a_folder_without_processor_files_is_refused(tmp_path):
    folder = _folder(tmp_path, {"model_type": "qwen2_vl"}, files=("model.safetensors",))
    with pytest.raises(UserError, match="no processor and no tokenizer files"):
        resolve_model_path(str(folder))


def test_a_real_qwen2_vl_folder_passes(tmp_path):
    folder = _folder(tmp_path, {"model_type": "qwen2_vl"})
    assert resolve_model_path(str(folder)) == folder


def test_train_on_a_gpt2_folder_exits_2_at_once(tmp_path):
    """Before the check, a GPT-2 config.json built a default-shaped Qwen2-VL (80 layers) with random weights."""
    folder = _folder(tmp_path, {"model_type": "gpt2", "n_layer": 12})
    proc = subprocess.run([sys.executable, "-m", "qlora_rft", "train", "configs/tiny_demo.yaml",
                           f"model.name_or_path={folder}", f"train.output_dir={tmp_path / 'run'}"],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "holds a 'gpt2' model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_an_adapter_of_another_base_is_one_line_naming_the_layer(tmp_path, capsys):
    from qlora_rft.cli import main

    from conftest import policy_with_adapters

    cfg, policy = policy_with_adapters(["model.name_or_path=tiny:tiny", "model.mode=lora"])
    policy.model.save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    code = main(["eval", "configs/tiny_demo.yaml", "model.name_or_path=tiny:cpu-small", "data.max_pixels=3136",
                 f"eval.adapter={tmp_path / 'adapter'}", "eval.limit=1", f"eval.output_dir={tmp_path / 'eval'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: adapter {tmp_path / 'adapter'} does not fit this model: " in err
    assert re.search(r"model\.language_model\.layers\.0\.mlp\.down_proj has 128 inputs in the adapter and \d+ in "
                     r"this base \(and \d+ more\); use it with the base model", err)
