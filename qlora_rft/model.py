"""Load the policy: a base of a supported family (4-bit NF4 or full precision) with LoRA adapters on the language
model. The family (`qlora_rft.models`) is read from the folder's config.json and decides the class and LoRA targets.

The reference policy is the same base with the adapters switched off (`reference_mode`): no second model.
Sampling settings never come from the checkpoint's generation_config (the Instruct models ship near-greedy ones).
Weight files are checked whole before anything loads: a corrupt or truncated one is named in a UserError.
Rollouts may sample on a copy of the adapted layers (`merged_weights`: merged, or int8/fp8 weight-only), chosen by
`choose_sampling_weights`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_rft.config import LoraSettings, ModelConfig
from qlora_rft.errors import UserError
from qlora_rft.models import Family, family_of, supported
from qlora_rft.rollout import SpecialTokens, base_model


@dataclass
class Policy:
    """The trainable model and what is needed to feed it."""

    model: torch.nn.Module  # peft.PeftModel around the family's ...ForConditionalGeneration
    processor: object  # the family's processor
    device: torch.device
    dtype: torch.dtype
    tokens: SpecialTokens  # eos, pad and vision placeholder ids
    family: Family

    @property
    def base(self):
        """The ...ForConditionalGeneration inside the peft wrapper (adapters still live in its layers)."""
        return base_model(self.model)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # the hub's layout, transformers 5's own
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def resolve_model_path(name_or_path: str) -> Path:
    """`tiny:PRESET` -> the cached random model (built on first use); otherwise a from_pretrained folder, checked
    (`check_model_folder`) before anything loads."""
    if name_or_path.startswith("tiny:"):
        from qlora_rft import tiny

        return tiny.cached_model(name_or_path.split(":", 1)[1])
    path = Path(name_or_path).expanduser()
    check_model_folder(path)
    return path


def model_family(name_or_path: str) -> Family:
    """The family of model.name_or_path (a tiny:PRESET is built first if not cached)."""
    return family_of(resolve_model_path(name_or_path))


def check_model_folder(path: Path) -> dict:
    """A folder transformers would load as a supported model, or a UserError saying what is wrong; returns its
    config.json. Checked before loading: transformers builds a default-shaped model (with random weights) from a
    config of another family rather than refusing it."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"model folder {path} has no config.json: pass a local from_pretrained folder of a supported "
                        f"model ({supported()}, e.g. a downloaded Instruct checkpoint) or tiny:PRESET")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file} is not valid JSON ({e}): the model folder is damaged") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    try:
        family_of(config if isinstance(config, dict) else {})
    except UserError:
        raise UserError(f"{path} holds a {model_type!r} model (config.json's model_type); supported are "
                        f"{supported()}") from None
    missing = [what for what, names in (("weights", WEIGHT_FILES), ("processor", PROCESSOR_FILES),
                                        ("tokenizer", TOKENIZER_FILES))
               if not any((path / name).is_file() for name in names)]
    if missing:
        raise UserError(f"model folder {path} has no {' and no '.join(missing)} files: a from_pretrained folder of "
                        "the model and its processor is needed (save both with save_pretrained)")
    return config


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda but no CUDA device is visible: use model.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # under `accelerate launch` each process has its own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_base(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, mode: str | None = None):
    """The family's ...ForConditionalGeneration from a folder: NF4 + double quant in qlora mode, else at `dtype`."""
    from transformers import BitsAndBytesConfig, GenerationConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    mode = mode or cfg.mode
    check_weight_files(path, "model")
    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation, device_map={"": str(device)})
    if is_deepspeed_zero3_enabled():  # under a ZeRO-3 launch the weights are sharded as they load: no device map
        kwargs.pop("device_map")
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
            llm_int8_skip_modules=list(cfg.quantize_skip_modules),
        )
    model = family_of(path).transformers_class().from_pretrained(str(path), **kwargs)
    if mode == "qlora":
        keep_training_layout(model)
    # Keep only the token ids from the shipped generation config; sampling settings are always passed explicitly.
    shipped = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id, pad_token_id=shipped.pad_token_id
    )
    return model


def keep_training_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16 a Linear4bit in eval mode repacks its weight in place and keeps that layout, and the
    training backward then fails on it. Sampling and training must also run the same kernel, so that the
    log-probs of what was sampled are those of the policy being trained.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_target_regex(lora: LoraSettings, family: Family) -> str:
    """peft target_modules regex: the named linears of the language model (and the family's vision tower linears
    and merger if lora.train_vision)."""
    return family.lora_regex(lora.target_modules, lora.train_vision)


def attach_lora(model, lora: LoraSettings, gradient_checkpointing: bool):
    """Freeze the base, add LoRA adapters, and make gradient checkpointing work with them."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With frozen embeddings nothing entering the first block needs grad; peft models need this or
        # checkpointed blocks see no input that requires grad and the adapters never learn.
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_regex(lora, family_of(model)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_policy(model_cfg: ModelConfig, lora: LoraSettings, adapter: str | Path | None = None) -> Policy:
    """Base + fresh LoRA adapters (or the adapters saved in `adapter`, trainable); in full mode the base itself,
    every weight trainable but the vision tower's (unless lora.train_vision)."""
    from transformers import AutoProcessor

    path = resolve_model_path(model_cfg.name_or_path)
    device = pick_device(model_cfg.device)
    dtype = compute_dtype(model_cfg.dtype, device)
    base = load_base(path, model_cfg, device, dtype)
    if model_cfg.mode == "full":
        model = base
        model.requires_grad_(True)
        if not lora.train_vision:
            model.model.visual.requires_grad_(False)
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif adapter is not None:
        if model_cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        model = load_adapter(base, adapter, trainable=True)
    else:
        model = attach_lora(base, lora, model_cfg.gradient_checkpointing)
    model.train()  # from_pretrained leaves every module in eval mode, where gradient checkpointing is inactive
    processor = AutoProcessor.from_pretrained(str(path))
    processor.tokenizer.padding_side = "left"
    tokens = SpecialTokens.of(base, processor.tokenizer)
    return Policy(model=model, processor=processor, device=device, dtype=dtype, tokens=tokens, family=family_of(base))


def load_reference(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """Full mode's reference policy: a frozen copy of the base, in eval mode."""
    model = load_base(resolve_model_path(model_cfg.name_or_path), model_cfg, device, dtype)
    model.requires_grad_(False)
    return model.eval()


def load_for_inference(model_cfg: ModelConfig, adapter: str | Path | None = None) -> Policy:
    """The base (4-bit in qlora mode) in eval mode, with a saved peft adapter applied when given (not merged)."""
    from transformers import AutoProcessor

    path = resolve_model_path(model_cfg.name_or_path)
    device = pick_device(model_cfg.device)
    dtype = compute_dtype(model_cfg.dtype, device)
    model = load_base(path, model_cfg, device, dtype)
    if adapter:
        model = load_adapter(model, adapter, trainable=False)
    model.eval()
    processor = AutoProcessor.from_pretrained(str(path))
    processor.tokenizer.padding_side = "left"
    return Policy(model=model, processor=processor, device=device, dtype=dtype,
                  tokens=SpecialTokens.of(base_model(model), processor.tokenizer), family=family_of(path))


def read_adapter_config(adapter: str | Path) -> dict:
    """A peft adapter folder's adapter_config.json, checked to be there and to be a JSON object, and its weight
    files checked whole (`check_weight_files`); UserError naming the file otherwise."""
    path = Path(adapter).expanduser()
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not a peft adapter folder (no adapter_config.json): pass the adapter/ folder of "
                        "a run, or a checkpoint-STEP/adapter folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{config_file} is not valid JSON ({e}): the adapter folder is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} is not a JSON object: the adapter folder is damaged")
    check_weight_files(path, "adapter")
    return config


def load_adapter(model, adapter: str | Path, trainable: bool):
    """The peft adapter saved in `adapter` applied to `model` (not merged), after `read_adapter_config`'s checks and
    `check_adapter_shapes`."""
    from peft import PeftModel

    path = Path(adapter).expanduser()
    read_adapter_config(path)
    check_adapter_shapes(model, path / "adapter_model.safetensors", f"adapter {path}")
    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


def check_adapter_shapes(model, weights: Path, what: str) -> None:
    """Refuse LoRA weights trained on a base of other shapes than `model` (another size or architecture), or of
    another rank than the adapters `model` already has, naming the first layer that differs, before they load (peft
    would stop on a size-mismatch traceback). A LoRA A matrix is [r, the layer's inputs], a B matrix [the layer's
    outputs, r]. `model`: the base, or it wrapped by peft."""
    from safetensors import safe_open

    if not weights.is_file():
        return  # an adapter saved as .bin: peft's own checks
    with safe_open(str(weights), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    modules = dict(model.named_modules())
    problems = []
    for key, shape in sorted(shapes.items()):
        for part, side, axis in ((".lora_A.weight", "in_features", 1), (".lora_B.weight", "out_features", 0)):
            if not key.endswith(part) or len(shape) != 2:
                continue
            name = key.removesuffix(part)
            short = name.removeprefix("base_model.model.")
            layer = modules[name] if name in modules else modules.get(short)
            own = getattr(layer, part.split(".")[1], {})  # a layer peft wraps already: its own LoRA matrices
            if layer is None:
                problems.append(f"its layer {short} is not in this base")
            elif getattr(layer, side, shape[axis]) != shape[axis]:
                size = "inputs" if side == "in_features" else "outputs"
                problems.append(f"{short} has {shape[axis]} {size} in the adapter and {getattr(layer, side)} in "
                                "this base")
            elif "default" in own and tuple(own["default"].weight.shape) != tuple(shape):
                problems.append(f"{key.removeprefix('base_model.model.')} is {list(shape)} in the adapter and "
                                f"{list(own['default'].weight.shape)} here (another lora.r)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{what} does not fit this model: {problems[0]}{more}; use it with the base model "
                        "(model.name_or_path) and the lora.r it was trained with")


def check_weight_files(folder: Path, what: str) -> None:
    """Every *.safetensors file of `folder` opens: a header that is whole and matches the file's size. A corrupt or
    truncated file (an interrupted download or copy) is a UserError naming it, before any weights load."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as e:
            raise UserError(f"{what} weights file {file} is corrupt or truncated ({e}): copy or download it "
                            "again") from None


@contextlib.contextmanager
def reference_mode(model):
    """The reference policy of qlora/lora mode: the same base with adapters disabled, no gradients."""
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with disable, torch.no_grad():
        yield


# grpo.sampling_weights: what each mode stores per weight of an adapted layer while sampling (bytes).
COPY_BYTES = {"merged": None, "int8": 1, "fp8": 1}  # None: the compute dtype's size
AUTO_MARGIN = 0.25  # auto on CUDA: the merged copy must leave this fraction of the device's memory free


@dataclass(frozen=True)
class SamplingWeights:
    """The weights rollouts are sampled with, and why (both go into the log and train_summary.json)."""

    mode: str  # adapters | merged | int8 | fp8
    reason: str

    @property
    def merges(self) -> bool:
        return self.mode != "adapters"


def choose_sampling_weights(setting: str, model, device: torch.device, dtype: torch.dtype) -> SamplingWeights:
    """grpo.sampling_weights resolved for this device. auto: merged on the CPU; on CUDA merged when the copy fits
    the free GPU memory with a margin of a quarter of the device's memory (training needs room too), else
    adapters. int8 and fp8 are chosen only by name (their speed is unmeasured); fp8 needs a GPU that has it."""
    if setting == "fp8" and not fp8_supported(device):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise UserError(f"grpo.sampling_weights=fp8 needs a CUDA GPU with fp8 support (compute capability 8.9 or "
                        f"newer: Ada, Hopper); this run is on {where}: use grpo.sampling_weights=int8 or merged")
    if setting != "auto":
        return SamplingWeights(setting, "set by grpo.sampling_weights")
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


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
