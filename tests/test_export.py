"""Merging a LoRA adapter into the full-precision base: same logits as base + adapter, plain folder, atomic writes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qlora_rft.errors import UserError
from qlora_rft.export import RELATIVE_TOLERANCE, merge_adapter, verification_logits

LORA_B_STD = 0.1  # a strong but realistic update (the base's weights have std 0.02)


def _load(path, dtype=torch.float32):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(str(path), dtype=dtype)


@pytest.fixture(scope="module")
def trained(private_cache, tmp_path_factory):
    """(base folder, adapter folder, base logits, base + adapter logits): fp32, adapters with non-zero lora_B."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from qlora_rft.config import LoraSettings
    from qlora_rft.model import attach_lora
    from qlora_rft.tiny import cached_model

    base = cached_model("tiny")
    processor = AutoProcessor.from_pretrained(str(base))
    plain = verification_logits(_load(base), processor)
    torch.manual_seed(0)  # lora_A's initialisation and lora_B below
    model = attach_lora(_load(base), LoraSettings(dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=LORA_B_STD)
    adapter = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter)
    # base + adapter as a user of the adapter would run it, independent of export.py's own loading
    with_adapter = verification_logits(PeftModel.from_pretrained(_load(base), str(adapter)), processor)
    return base, adapter, plain, with_adapter


def test_fp32_merge_matches_base_plus_adapter_and_reloads_as_a_plain_model(trained, tmp_path, capfd):
    base, adapter, plain, with_adapter = trained
    out = tmp_path / "merged"
    capfd.readouterr()
    report = merge_adapter(base, adapter, out, dtype="fp32", device="cpu")
    assert capfd.readouterr() == ("", "")  # the library prints nothing (no progress bars either); the CLI reports

    assert report.ok and report.out == out and report.dtype == "fp32"
    assert report.max_abs_diff_merged <= 1e-4 and report.max_abs_diff_reloaded <= 1e-4
    assert report.tolerance == pytest.approx(1e-4)  # tiny logits are < 1: the bound is the constant itself
    assert report.lora_modules == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)

    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists() and not (out / "qlora_rft.json").exists()
    merged = _load(out)  # plain transformers, no peft
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(_load(base).state_dict())
    from transformers import AutoProcessor

    logits = verification_logits(merged, AutoProcessor.from_pretrained(str(out)))  # the saved processor works
    assert (logits - with_adapter).abs().max() <= 1e-4
    assert (logits - plain).abs().max() > 1e-3  # the adapter mattered: the check would see a lost adapter
    assert report.adapter_effect == pytest.approx((with_adapter - plain).abs().max().item(), rel=1e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_bf16_merge_is_within_its_tolerance_and_saved_in_bf16(trained, tmp_path):
    base, adapter, *_ = trained
    out = tmp_path / "merged"
    report = merge_adapter(str(base), str(adapter), out, dtype="bf16", device="cpu")

    assert report.dtype == "bf16" and report.ok
    assert report.tolerance == pytest.approx(RELATIVE_TOLERANCE["bf16"])
    assert 0 < report.max_abs_diff_merged <= report.tolerance  # 16-bit rounding shows, within the bound
    assert report.max_abs_diff_reloaded <= report.tolerance
    assert report.tolerance < report.adapter_effect / 5  # the bound is tight enough to see a lost adapter
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged = _load(out, dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_merge_info_holds_the_numbers(trained, tmp_path):
    base, adapter, *_ = trained
    report = merge_adapter(base, adapter, tmp_path / "merged", dtype="float32", device="cpu")
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["dtype"] == "fp32"
    assert info["base"] == str(base) and info["adapter"] == str(adapter.resolve())
    assert info["max_abs_diff_merged"] == report.max_abs_diff_merged
    assert info["max_abs_diff_reloaded"] == report.max_abs_diff_reloaded
    assert info["tolerance"] == report.tolerance and info["ok"] is True
    assert info["lora_modules"] == report.lora_modules == 14


def test_bad_inputs_are_user_errors(trained, tmp_path):
    base, adapter, *_ = trained
    with pytest.raises(UserError, match="adapter_config.json"):
        merge_adapter(base, tmp_path / "missing", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter_config.json"):
        merge_adapter(base, tmp_path / "empty", tmp_path / "b")
    with pytest.raises(UserError, match="dtype"):
        merge_adapter(base, adapter, tmp_path / "c", dtype="int8")
    with pytest.raises(UserError, match="config.json"):
        merge_adapter(tmp_path / "empty", adapter, tmp_path / "d")
    with pytest.raises(UserError, match="would write over the input"):
        merge_adapter(base, adapter, adapter, overwrite=True)
    assert (adapter / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written for any of them


def test_a_quantized_base_is_refused(trained, tmp_path):
    base, adapter, *_ = trained
    quantized = tmp_path / "base-4bit"
    shutil.copytree(base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="full-precision"):
        merge_adapter(quantized, adapter, tmp_path / "out")


def test_non_empty_out_is_kept_unless_overwrite(trained, tmp_path):
    base, adapter, *_ = trained
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        merge_adapter(base, adapter, out, dtype="fp32", device="cpu")
    assert (out / "keep.txt").read_text() == "mine"

    report = merge_adapter(base, adapter, out, dtype="fp32", device="cpu", overwrite=True)
    assert report.ok and not (out / "keep.txt").exists() and (out / "merge_info.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_failed_save_leaves_no_out_and_keeps_an_existing_one(trained, tmp_path, monkeypatch):
    from transformers import Qwen2VLForConditionalGeneration

    base, adapter, *_ = trained

    def fail_midway(self, directory, *args, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "save_pretrained", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(base, adapter, tmp_path / "merged", dtype="fp32", device="cpu")
    assert list(tmp_path.iterdir()) == []  # neither out nor the temporary sibling

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("previous merge")
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(base, adapter, existing, dtype="fp32", device="cpu", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_an_adapter_for_another_architecture_is_a_user_error(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    base, adapter, *_ = trained
    # target modules the base does not have: peft refuses to build the adapter
    wrong_targets = tmp_path / "wrong-targets"
    shutil.copytree(adapter, wrong_targets)
    config = json.loads((wrong_targets / "adapter_config.json").read_text())
    config["target_modules"] = r"model\.language_model\.layers\.\d+\.self_attn\.c_attn"
    (wrong_targets / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not fit"):
        merge_adapter(base, wrong_targets, tmp_path / "a", dtype="fp32", device="cpu")

    # tensors for a layer the base does not have (an adapter of a deeper model): peft would drop them silently
    deeper = tmp_path / "deeper"
    shutil.copytree(adapter, deeper)
    weights = load_file(deeper / "adapter_model.safetensors")
    for key in [k for k in weights if ".layers.1." in k]:
        weights[key.replace(".layers.1.", ".layers.5.")] = weights[key].clone()
    save_file(weights, deeper / "adapter_model.safetensors")
    with pytest.raises(UserError, match="does not match"):
        merge_adapter(base, deeper, tmp_path / "b", dtype="fp32", device="cpu")

    # same names, other shapes (an adapter of a wider model)
    wider = tmp_path / "wider"
    shutil.copytree(adapter, wider)
    weights = load_file(adapter / "adapter_model.safetensors")
    weights = {k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in weights.items()}
    save_file(weights, wider / "adapter_model.safetensors")
    with pytest.raises(UserError, match="does not fit"):
        merge_adapter(base, wider, tmp_path / "c", dtype="fp32", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deeper", "wider", "wrong-targets"]


def test_merge_command_prints_the_check_and_writes_a_plain_model(trained, tmp_path, capsys):
    from qlora_rft.cli import main

    base, adapter = trained[:2]
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "max |logits(merged) - logits(base + adapter)|" in printed and "tolerance" in printed
    assert (out / "config.json").is_file() and (out / "merge_info.json").is_file()
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 2


def test_a_tied_base_merges_into_a_model_that_loads_tied(tmp_path):
    """lm_head shares embed_tokens (Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B/4B): the adapters never touch it, and
    the merged folder stores it once and loads with the tie in place."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from qlora_rft.config import LoraSettings
    from qlora_rft.model import attach_lora
    from qlora_rft.tiny import cached_model

    base = cached_model("tiny-tied")
    torch.manual_seed(0)
    model = attach_lora(_load(base), LoraSettings(dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=LORA_B_STD)
    model.save_pretrained(tmp_path / "adapter")

    report = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged", dtype="fp32", device="cpu")
    assert report.ok and report.lora_modules == 2 * 7
    merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged"))
    embed = merged.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings and merged.get_output_embeddings().weight is embed
    assert torch.equal(embed, _load(base).get_input_embeddings().weight)  # the merge left it as it was
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lm_head" in k]  # stored once, as embed_tokens
