"""The warm-up: the SFT baseline's step (supervised.py) on the whole tiny base, cached under a key that names its
recipe; a step that is not finite stops it and caches nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_RUN
from safetensors.torch import load_file

from qlora_rft import warmup
from qlora_rft.config import load_config
from qlora_rft.errors import TrainingError
from qlora_rft.files import cache_dir
from qlora_rft.model import resolve_model_path


def _cfg(*more: str):
    return load_config(None, [*TINY_RUN, "warmup.steps=6", "warmup.batch_size=4", *more])


def _key(cfg) -> str:
    return warmup.warmup_key(cfg, warmup.warmup_data(cfg))


def test_warmup_trains_the_whole_base_with_the_sft_step_and_is_built_once(monkeypatch):
    cfg = _cfg("warmup.learning_rate=0.004")
    folder = cache_dir() / "warm" / _key(cfg)
    assert not folder.exists()
    assert warmup.warmed_base(cfg) == str(folder)

    lines = [json.loads(line) for line in (folder / "warmup.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[-1]["loss"] < lines[0]["loss"] - 1, [line["loss"] for line in lines]  # 6.6 -> 5.1 nats
    assert all(line["grad_norm"] > 0 for line in lines)
    base = load_file(str(resolve_model_path("tiny:tiny") / "model.safetensors"))
    warmed = load_file(str(folder / "model.safetensors"))
    assert warmed.keys() == base.keys()
    changed = {name for name in base if not base[name].equal(warmed[name])}
    assert any("visual" in name for name in changed) and any("layers" in name for name in changed)

    monkeypatch.setattr(warmup, "run_warmup", lambda *a, **k: pytest.fail("a cached warm-up was built again"))
    assert warmup.warmed_base(cfg) == str(folder)


def test_the_cache_key_names_the_warmup_recipe(monkeypatch):
    cfg = _cfg()
    key = _key(cfg)
    monkeypatch.setattr(warmup, "WARMUP_RECIPE", warmup.WARMUP_RECIPE - 1)
    assert _key(cfg) != key  # a base warmed the old way is never taken for the new


def test_a_non_finite_warmup_step_stops_it_and_caches_nothing():
    cfg = _cfg("warmup.learning_rate=1e20")
    with pytest.raises(TrainingError, match=r"warm-up step \d+: loss .* nothing was cached\. Lower "
                                            r"warmup.learning_rate=1e\+20"):
        warmup.warmed_base(cfg)
    folder = cache_dir() / "warm" / _key(cfg)
    assert not folder.exists() and not list(folder.parent.glob(f".{folder.name}*"))


def test_a_data_file_replaced_under_the_same_name_warms_a_new_base(tmp_path):
    import pyarrow.parquet as pq

    from qlora_rft.data import resolve_source

    rows = pq.read_table(Path(resolve_source("synthetic:shapes")) / "train.parquet")
    data = tmp_path / "train.parquet"
    pq.write_table(rows.slice(0, 8), data)
    cfg = _cfg(f"data.train={data}")
    key = _key(cfg)
    assert _key(cfg) == key  # the same content, the same key
    pq.write_table(rows.slice(8, 8), data)  # another file, the same name
    assert _key(cfg) != key
