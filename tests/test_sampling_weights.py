"""Compact sampling weights (int8, fp8 weight-only copies of the merged layers) against the 4-bit base with adapters,
the copy kept between steps, and what `auto` picks."""

from __future__ import annotations

import pytest
import torch

from conftest import sample
from qlora_rft.config import load_config
from qlora_rft.errors import ConfigError, UserError
from qlora_rft.prompts import encode_prompt
from qlora_rft.rollout import completion_logprobs, share_vision
from qlora_rft.sampling import Settings
from qlora_rft.sampling.weights import choose_sampling_weights, copy_bytes, decode_weight_bytes, merged_weights
from qlora_rft.tasks import get_task

# Largest and mean |log p difference| per completion token (nats) against the adapters' path, on the tiny model
# (measured there: int8 0.011 / 0.0024, fp8 0.039 / 0.012).
TOLERANCE = {"merged": (1e-4, 1e-5), "int8": (0.05, 0.01), "fp8": (0.2, 0.05)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, private_cache):
    from conftest import TINY_RUN, policy_with_adapters, training_examples

    cfg, policy = policy_with_adapters([*TINY_RUN, f"train.output_dir={tmp_path_factory.mktemp('run')}"], seed=0)
    example = training_examples(cfg, policy)[0]
    task = get_task("classification")
    prompt = share_vision(policy.model, encode_prompt(policy.processor, task, example, cfg.data, policy.device))
    return policy, prompt


def _agree_up_to_a_near_tie(policy, prompt, ours, theirs, margin):
    """Greedy tokens from compact weights equal the adapters' until a position where the adapters themselves
    nearly tie: there, the two tokens' log-probs under the adapters differ by less than `margin`."""
    differ = (ours != theirs).flatten().nonzero()
    if len(differ) == 0:
        return
    d = int(differ[0]) + 1
    with torch.no_grad():
        both = completion_logprobs(policy.model, prompt, torch.cat([ours[:, :d], theirs[:, :d]]), torch.ones(2, d),
                                   1024)[:, -1]
    assert 0 <= both[0] - both[1] < margin, (d, both)


def test_compact_copies_give_log_probs_within_tolerance_of_the_adapters(setup):
    policy, prompt = setup
    ids = torch.randint(7, 300, (4, 16), generator=torch.Generator().manual_seed(1))  # above the special ids
    mask = torch.ones(4, 16)
    greedy = Settings(12, do_sample=False)
    with torch.no_grad():
        adapters = completion_logprobs(policy.model, prompt, ids, mask, 1024)  # 4-bit base + LoRA
    tokens = sample(policy, [prompt], 2, 2, greedy)[0].completion_ids
    head = policy.base.lm_head.weight.nbytes
    for mode, (largest, mean) in TOLERANCE.items():
        with torch.no_grad(), merged_weights(policy.model, mode=mode):
            diff = (completion_logprobs(policy.model, prompt, ids, mask, 1024) - adapters).abs()  # [4, 16]
            read = decode_weight_bytes(policy.model)
        assert diff.max() <= largest and diff.mean() <= mean, (mode, diff.max(), diff.mean())
        assert read == head + copy_bytes(policy.model, mode, torch.float32)  # all a decode step reads
        if mode == "int8":
            with merged_weights(policy.model, mode=mode):
                again = sample(policy, [prompt], 2, 2, greedy)[0]
            _agree_up_to_a_near_tie(policy, prompt, tokens[:1], again.completion_ids[:1], 2 * largest)
    merged, int8 = (copy_bytes(policy.model, m, torch.float32) for m in ("merged", "int8"))
    assert int8 < 0.3 * merged  # 1 byte a weight and a scale per row, against 4 bytes (fp32 on the CPU)


def test_a_kept_copy_is_refilled_in_place(setup):
    """What a compiled decode step needs: the same tensors every step, holding the current weights."""
    policy, prompt = setup
    ids, mask = torch.randint(7, 300, (2, 5), generator=torch.Generator().manual_seed(2)), torch.ones(2, 5)
    kept = {}
    lora_b = [p for n, p in policy.model.named_parameters() if "lora_B" in n]
    with merged_weights(policy.model, mode="int8", store=kept):
        pass
    addresses = {key: [t.data_ptr() for t in copy if t is not None] for key, copy in kept.items()}
    with torch.no_grad():
        for p in lora_b:
            p.add_(0.1)  # an update
        with merged_weights(policy.model, mode="int8", store=kept):
            refilled = completion_logprobs(policy.model, prompt, ids, mask, 1024)
        with merged_weights(policy.model, mode="int8"):
            fresh = completion_logprobs(policy.model, prompt, ids, mask, 1024)
        for p in lora_b:
            p.sub_(0.1)
    assert {key: [t.data_ptr() for t in copy if t is not None] for key, copy in kept.items()} == addresses
    assert torch.equal(refilled, fresh)


def test_auto_merges_on_cuda_only_when_the_copy_fits_with_a_quarter_spare(setup, monkeypatch):
    policy, _ = setup
    need = copy_bytes(policy.model, "merged", torch.float32)
    total = 4 * need  # the margin is a quarter of it: `need`
    cuda = torch.device("cuda")
    for free, mode in ((2 * need, "merged"), (2 * need - 1, "adapters")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, total))
        chosen = choose_sampling_weights("auto", policy.model, cuda, torch.float32)
        assert chosen.mode == mode and "margin" in chosen.reason
    chosen = choose_sampling_weights("auto", policy.model, torch.device("cpu"), torch.float32)
    assert chosen.mode == "merged" and chosen.reason.startswith("auto on the CPU")
    assert choose_sampling_weights("int8", policy.model, cuda, torch.float32).mode == "int8"  # by name only


def test_fp8_is_refused_where_the_device_has_none(setup, tmp_path):
    policy, _ = setup
    with pytest.raises(UserError, match="grpo.sampling_weights=int8"):
        choose_sampling_weights("fp8", policy.model, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="sampling_weights=fp8 needs a CUDA GPU"):
        load_config(None, ["grpo.sampling_weights=fp8", "model.device=cpu"])


def test_the_correction_follows_the_weights_and_a_model_without_adapters_samples_its_own(setup):
    from qlora_rft.sampling.weights import SamplingWeights, choose_correction

    policy, _ = setup
    cpu = torch.device("cpu")
    assert choose_correction("auto", choose_sampling_weights("auto", policy.model, cpu, torch.float32)).mode == "tis"
    assert choose_correction("auto", SamplingWeights("int8", "")).mode == "tis"
    assert choose_correction("auto", SamplingWeights("adapters", "")).mode == "none"
    assert choose_correction("mis", SamplingWeights("adapters", "")).mode == "mis"  # by name, whatever the weights
    plain = policy.base.model.visual  # any module without LoRA layers (full mode, a base evaluated alone)
    chosen = choose_sampling_weights("int8", plain, cpu, torch.float32)
    assert chosen.mode == "trained" and not chosen.merges
    assert choose_correction("auto", chosen).mode == "none"


def test_the_backend_choice():
    from qlora_rft.sampling import choose_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", cpu, "merged").name == "static"
    assert choose_backend("auto", cuda, "merged").name == "generate"
    assert choose_backend("static", cuda, "int8").name == "static, compiled"
    assert choose_backend("static", cuda, "adapters").name == "static"  # 4-bit kernels: eager
    assert choose_backend("generate", cpu, "merged", "eval.decode").reason == "set by eval.decode"


def test_the_importance_cap_is_checked_at_load():
    with pytest.raises(ConfigError, match="grpo.importance_cap=0.5 must be >= 1"):
        load_config(None, ["grpo.importance_cap=0.5"])
    with pytest.raises(ConfigError, match="grpo.importance_correction must be one of auto, none, tis, mis, sequence_tis, sequence_mis"):
        load_config(None, ["grpo.importance_correction=sequence_mask"])
