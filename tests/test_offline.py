"""Nothing fetched, nothing executed at load: every model a command loads asks for no hub kernels and no remote code
(unless model.hub_kernels), and no host is looked up or connected to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_RUN

SPY = Path(__file__).parent / "spy"  # a sitecustomize.py that records loads, kernels and network use


def spied(log: Path, *commands: list[str]) -> list[dict]:
    """Run each `qlora-rft` command in a fresh process under the spy; every record the processes wrote."""
    path = [str(SPY), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, QLORA_RFT_SPY_LOG=str(log), PYTHONPATH=os.pathsep.join(path))
    for name in ("USE_HUB_KERNELS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the defaults are what is tested
        env.pop(name, None)
    for argv in commands:
        proc = subprocess.run([sys.executable, "-m", "qlora_rft", *argv], env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{argv[0]} failed:\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def assert_nothing_fetched(records: list[dict], processes: int) -> None:
    loads = [r for r in records if r["kind"] == "load"]
    assert len({r["pid"] for r in loads}) >= processes, records  # the spy saw every command's loads
    assert all(r["use_kernels"] is False and r["trust_remote_code"] is False for r in loads), loads
    kernels = [r for r in records if r["kind"] == "set_use_kernels"]
    assert len(kernels) == len(loads) and not any(r["value"] for r in kernels), kernels
    assert not [r for r in records if r["kind"] in ("lookup", "connect")], records


@pytest.mark.slow
def test_train_sft_eval_merge_and_export_load_nothing_from_the_hub(tmp_path):
    import importlib.util

    run, sft = tmp_path / "run", tmp_path / "sft"
    common = [*TINY_RUN, "grpo.generation_chunk=0", "train.max_steps=1", "train.save_steps=1"]
    export = [["export", "--base", "tiny:tiny", "--adapter", str(run / "adapter"), "--quant", "f16", "--out",
               str(tmp_path / "gguf")]] if importlib.util.find_spec("llama_cpp") else []  # the gguf extra
    records = spied(
        tmp_path / "spy.jsonl",
        ["train", "configs/tiny_demo.yaml", *common, "warmup.steps=1", "warmup.batch_size=2",
         f"train.output_dir={run}"],
        ["sft", "configs/tiny_demo.yaml", *common, f"train.output_dir={sft}"],
        ["eval", "configs/tiny_demo.yaml", *common, f"eval.adapter={run / 'adapter'}", "eval.limit=2",
         "eval.max_new_tokens=4", f"eval.output_dir={tmp_path / 'eval'}"],
        ["merge", "--base", "tiny:tiny", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged")],
        *export,
    )
    assert_nothing_fetched(records, processes=4 + len(export))
    # the warm-up, the policy, the evaluated base, the merge's base and its reloaded result at least
    assert len([r for r in records if r["kind"] == "load"]) >= 5


def test_hub_kernels_are_asked_for_only_when_the_config_says(monkeypatch):
    from transformers import PreTrainedModel

    from qlora_rft.config import load_config
    from qlora_rft.model import load_for_inference

    asked = []
    real = PreTrainedModel.set_use_kernels
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels",
                        lambda self, value, *a, **k: asked.append(bool(value)) or real(self, False, *a, **k))
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    load_for_inference(load_config(None, TINY_RUN).model)
    load_for_inference(load_config(None, [*TINY_RUN, "model.hub_kernels=true"]).model)
    assert asked == [False, True]


def test_flash_attention_without_the_package_is_refused_unless_hub_kernels(monkeypatch):
    import importlib.util

    from qlora_rft.config import load_config
    from qlora_rft.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match="model.hub_kernels=true"):
        load_config(None, [*TINY_RUN, "model.attn_implementation=flash_attention_2"])
    assert load_config(None, [*TINY_RUN, "model.attn_implementation=flash_attention_2",
                              "model.hub_kernels=true"]).model.hub_kernels

