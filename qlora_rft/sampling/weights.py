"""The weights a sampler decodes with (`grpo.sampling_weights`, `eval.sampling_weights`): the trained ones, or a copy
of each adapted layer with its LoRA delta merged in, made once per step (`merged`; int8 or fp8 weight-only per output
channel). A copy is a slightly different policy: `choose_correction` says which importance correction the loss applies.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from qlora_rft.errors import UserError
from qlora_rft.model import base_model

# grpo.sampling_weights: what each mode stores per weight of an adapted layer while sampling (bytes).
COPY_BYTES = {"merged": None, "int8": 1, "fp8": 1}  # None: the compute dtype's size
AUTO_MARGIN = 0.25  # auto on CUDA: the merged copy must leave this fraction of the device's memory free


COPIES = ("merged", "int8", "fp8")  # the modes that sample on a copy, not on the weights trained


@dataclass(frozen=True)
class SamplingWeights:
    """The weights rollouts are sampled with, and why (both go into the log and train_summary.json)."""

    mode: str  # adapters | merged | int8 | fp8 | trained (a model without adapters: nothing to merge)
    reason: str

    @property
    def merges(self) -> bool:
        """Sampling runs on a copy (merged, int8, fp8), not on the weights being trained."""
        return self.mode in COPIES


def choose_sampling_weights(setting: str, model, device: torch.device, dtype: torch.dtype,
                            field: str = "grpo.sampling_weights") -> SamplingWeights:
    """`field` resolved for this device. auto: merged on the CPU; on CUDA merged when the copy fits the free GPU
    memory with a margin of a quarter of the device's memory (training needs room too), else adapters. int8 and
    fp8 are chosen only by name (their speed is unmeasured); fp8 needs a GPU that has it. A model without adapters
    (full mode, a base evaluated alone) samples on its own weights: there is nothing to merge."""
    if setting == "fp8" and not fp8_supported(device):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise UserError(f"{field}=fp8 needs a CUDA GPU with fp8 support (compute capability 8.9 or "
                        f"newer: Ada, Hopper); this run is on {where}: use {field}=int8 or merged")
    if not has_adapters(model):
        return SamplingWeights("trained", "no adapters to merge: the model's own weights")
    if setting != "auto":
        return SamplingWeights(setting, f"set by {field}")
    if device.type != "cuda":
        return SamplingWeights("merged", "auto on the CPU: one matmul per layer instead of 4-bit + adapters")
    need = copy_bytes(model, "merged", dtype)
    free, total = torch.cuda.mem_get_info(device)
    margin = int(AUTO_MARGIN * total)
    fits = need + margin <= free
    return SamplingWeights(
        "merged" if fits else "adapters",
        f"auto on CUDA: the merged copy ({need / 2**30:.1f} GiB) {'fits' if fits else 'does not fit'} in the "
        f"free {free / 2**30:.1f} GiB with a margin of {margin / 2**30:.1f} GiB (a quarter of the device's memory)")


@dataclass(frozen=True)
class Correction:
    """grpo.importance_correction resolved for the sampling weights, and why (the log says which)."""

    mode: str  # one of grpo.CORRECTIONS
    reason: str


def choose_correction(setting: str, weights: SamplingWeights) -> Correction:
    """auto: tis when the sampling weights are a copy (merged, int8, fp8: a slightly different policy from the one
    trained), none when they are the trained weights themselves."""
    if setting != "auto":
        return Correction(setting, "set by grpo.importance_correction")
    if weights.merges:
        return Correction("tis", f"auto: the {weights.mode} copy is not the policy trained")
    return Correction("none", "auto: sampling on the weights trained")


def has_adapters(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def copy_bytes(model, mode: str, dtype: torch.dtype) -> int:
    """Bytes of the sampling copy of every adapted layer in `mode`: its weight (int8/fp8: plus a scale per output
    channel) and bias, the bias and scales in the compute dtype."""
    from peft.tuners.lora import LoraLayer

    total = 0
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        rows, columns = layer.out_features, layer.in_features
        total += rows * columns * (COPY_BYTES[mode] or dtype.itemsize)
        total += rows * dtype.itemsize * ((COPY_BYTES[mode] is not None) + (layer.get_base_layer().bias is not None))
    return total


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every linear layer of the language model as it is stored at this
    moment (a sampling copy while one is applied; else the base, 4-bit packed in qlora mode, and the LoRA
    factors), and the LM head. Vision tower and embeddings (one row per token) are not read per step."""
    from peft.tuners.lora import LoraLayer

    base = base_model(model)
    adapted = [m for m in base.model.language_model.modules() if isinstance(m, LoraLayer)]
    inside = {id(sub) for layer in adapted for sub in layer.modules()}
    total = base.lm_head.weight.nbytes
    for layer in adapted:
        copy = layer.__dict__.get("_sampling_copy")
        if copy is not None:
            total += sum(t.nbytes for t in copy if t is not None)
        else:
            total += _stored_bytes(layer.get_base_layer())
            total += sum(p.nbytes for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()))
    for module in base.model.language_model.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in inside:
            total += _stored_bytes(module)
    return total


def _stored_bytes(linear) -> int:
    weight = linear.weight
    size = weight.nbytes
    state = getattr(weight, "quant_state", None)
    if state is not None:  # bitsandbytes 4-bit: the packed weight plus its block scales
        size += state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
    return size + (linear.bias.nbytes if linear.bias is not None else 0)


@contextlib.contextmanager
def merged_weights(model, enabled: bool = True, mode: str = "merged", store: dict | None = None):
    """Sampling with each adapted layer as one plain linear: its base weight (dequantized in qlora mode) plus its
    LoRA delta, made once on entry and dropped on exit; in mode int8 or fp8 that merged weight is then stored
    quantized per output channel (weight-only: `quantized_linear`).

    Decoding then runs one matmul per layer instead of a 4-bit kernel plus two adapter matmuls at every token: the
    cost is a copy of the adapted weights while sampling. Within float rounding the merged outputs equal the
    unmerged model's (tested; int8 within a stated tolerance). `store` (a dict kept by the caller) keeps the copy
    between entries and refills the same tensors in place, so a compiled decode step keeps its addresses.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)] if enabled else []
    try:
        for layer in layers:
            copy = _sampling_copy(layer, mode, store)
            layer._sampling_copy = copy
            layer.forward = functools.partial(quantized_linear if mode in ("int8", "fp8") else _linear, *copy)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # back to the class's forward
            layer.__dict__.pop("_sampling_copy", None)


def _linear(weight, bias, scale, x):
    return torch.nn.functional.linear(x, weight, bias)


def quantized_linear(weight, bias, scale, x):
    """x @ (weight * scale).T + bias, with the weight stored in int8 or fp8 and scaled per output channel after
    the matmul. Eager, the cast makes a full-precision temporary at every call (memory saved, not time); a
    compiler may fuse it into the matmul's read of the weight (gpt-fast's int8 path; unmeasured here)."""
    out = torch.nn.functional.linear(x, weight.to(x.dtype)) * scale
    return out + bias if bias is not None else out


def quantize_rows(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only quantization per output channel: scale = max|row| / qmax (127 for int8, 448 for fp8 e4m3),
    q = weight / scale (rounded for int8).  [out, in] -> ([out, in] int8 or float8_e4m3fn, [out] scale)

    >>> q, s = quantize_rows(torch.tensor([[0.5, -1.0], [2.0, 1.0]]), "int8")
    >>> q.tolist(), [round(x, 5) for x in s.tolist()]
    ([[64, -127], [127, 64]], [0.00787, 0.01575])
    """
    wide = weight.float()
    if mode == "int8":
        scale = wide.abs().amax(1).clamp(min=1e-12) / 127  # [out]
        q = (wide / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    else:
        fp8 = torch.float8_e4m3fn
        scale = wide.abs().amax(1).clamp(min=1e-12) / torch.finfo(fp8).max
        q = (wide / scale[:, None]).clamp(-torch.finfo(fp8).max, torch.finfo(fp8).max).to(fp8)
    return q, scale.to(weight.dtype)


@torch.no_grad()
def _sampling_copy(layer, mode: str, store: dict | None) -> tuple:
    """(weight, bias, scale) of one adapted layer for `mode`; into the tensors `store` holds for it, if any."""
    weight, bias = _merged_weight(layer)
    scale = None
    if mode in ("int8", "fp8"):
        weight, scale = quantize_rows(weight, mode)
    fresh = (weight, bias, scale)
    if store is None:
        return fresh
    kept = store.get(id(layer))
    if kept is None or any((a is None) != (b is None) or (a is not None and a.shape != b.shape)
                           for a, b in zip(kept, fresh)):
        for t in fresh:
            if t is not None:  # a compiled step's CUDA graphs read these where they are (no copy per replay)
                torch._dynamo.mark_static_address(t)
        store[id(layer)] = fresh
        return fresh
    for old, new in zip(kept, fresh):
        if old is not None:
            old.copy_(new)
    return kept


@torch.no_grad()
def _merged_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    base = layer.get_base_layer()
    weight = base.weight
    dtype = getattr(base, "compute_dtype", None) or weight.dtype  # what the layer's inputs arrive in
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    weight = weight.to(dtype, copy=True)
    if not layer.disable_adapters:
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight += layer.get_delta_weight(name).to(dtype)
    bias = base.bias.to(dtype) if base.bias is not None else None
    return weight, bias

