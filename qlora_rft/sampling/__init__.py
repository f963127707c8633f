"""Every completion the project draws comes from one `Sampler` (sampler.py): training's groups, the evaluation
during training, `qlora-rft eval` and the demo. `make_sampler` builds it from the config: the sampling weights
(weights.py) and one backend, `generate` (generate.py) or `static` (static.py); backend.py says what a backend is.
"""

from __future__ import annotations

import contextlib

import torch

from qlora_rft.config import EvalConfig, GRPOConfig
from qlora_rft.model import Policy
from qlora_rft.sampling.backend import Backend, Decoded, FiniteLogits, Settings
from qlora_rft.sampling.generate import GenerateBackend
from qlora_rft.sampling.sampler import Sampler, left_pad
from qlora_rft.sampling.static import StaticBackend
from qlora_rft.sampling.weights import SamplingWeights, choose_correction, choose_sampling_weights

__all__ = ["Backend", "Decoded", "FiniteLogits", "GenerateBackend", "Sampler", "SamplingWeights", "Settings",
           "StaticBackend", "choose_backend", "left_pad", "make_sampler"]


def make_sampler(section: GRPOConfig | EvalConfig, policy: Policy, accelerator=None, prepared=None) -> Sampler:
    """The sampler a config section asks for: cfg.grpo (training: also its importance_correction) or cfg.eval
    (evaluation), read for its `decode` and `sampling_weights`. `accelerator` and `prepared` (the prepared
    CompletionScorer): sample on the policy as the launch holds it (gathered whole under ZeRO-3)."""
    name = "grpo" if isinstance(section, GRPOConfig) else "eval"
    correction = section.importance_correction if isinstance(section, GRPOConfig) else "none"
    weights = choose_sampling_weights(section.sampling_weights, policy.model, policy.device, policy.dtype,
                                      f"{name}.sampling_weights")
    backend = choose_backend(section.decode, policy.device, weights.mode, f"{name}.decode")
    gather = None
    if accelerator is not None:
        @contextlib.contextmanager
        def gather():
            from qlora_rft.distributed import sampling_model

            with sampling_model(accelerator, prepared) as scorer:
                yield scorer.policy

    return Sampler(policy, weights, backend, choose_correction(correction, weights), gather)


def choose_backend(setting: str, device: torch.device, weights_mode: str, field: str = "grpo.decode") -> Backend:
    """auto: static on the CPU (tested equal to generate's tokens), generate on CUDA (the compiled decoder is
    unmeasured there). static compiles its step on CUDA only over plain-torch weights (merged, int8, fp8): the 4-bit
    kernels gained nothing from compiling in our probes."""
    if setting == "generate" or (setting == "auto" and device.type != "cpu"):
        why = f"set by {field}" if setting == "generate" else "auto on CUDA: the static decoder is not yet measured"
        return GenerateBackend(why)
    if device.type == "cuda" and weights_mode in ("merged", "int8", "fp8"):
        return StaticBackend(compile=True, bucket=256, reason=f"{field}=static on CUDA over plain-torch weights")
    why = "auto on the CPU" if setting == "auto" else f"set by {field} (eager: " + (
        "4-bit weights)" if device.type == "cuda" else "the CPU)")
    return StaticBackend(compile=False, bucket=64, reason=why)
