"""Load the policy: a base of a supported family (4-bit NF4 or full precision) with LoRA adapters on the language
model. The family (`qlora_rft.models`) is read from the folder's config.json and decides the class and LoRA targets.

The reference policy is the same base with the adapters switched off (`reference_mode`): no second model.
Sampling settings never come from the checkpoint's generation_config (the Instruct models ship near-greedy ones).
Weight files are checked whole before anything loads: a corrupt or truncated one is named in a UserError.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_rft.config import LoraSettings, ModelConfig
from qlora_rft.errors import UserError
from qlora_rft import pretrained
from qlora_rft.models import Family, family_of, supported
from qlora_rft.pretrained import load_model, load_processor


@dataclass(frozen=True)
class SpecialTokens:
    eos: list[int]  # any of these ends a completion
    pad: int
    vision: list[int]  # image/video placeholders and vision start/end: never sampled

    @classmethod
    def of(cls, model, tokenizer) -> "SpecialTokens":
        config = model.config
        eos = model.generation_config.eos_token_id
        eos_ids = sorted({*([eos] if isinstance(eos, int) else (eos or [])), tokenizer.eos_token_id} - {None})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        vision = [getattr(config, name, None) for name in family_of(model).suppressed_tokens]
        return cls(eos=eos_ids, pad=pad, vision=[v for v in vision if v is not None])


def base_model(model):
    """The ...ForConditionalGeneration inside a peft wrapper (adapters still live in its layers), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
    model = load_model(family_of(path).transformers_class(), path, hub_kernels=cfg.hub_kernels, **kwargs)
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
    processor = load_processor(path, padding_side="left")
    tokens = SpecialTokens.of(base, processor.tokenizer)
    return Policy(model=model, processor=processor, device=device, dtype=dtype, tokens=tokens, family=family_of(base))


def load_reference(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """Full mode's reference policy: a frozen copy of the base, in eval mode."""
    model = load_base(resolve_model_path(model_cfg.name_or_path), model_cfg, device, dtype)
    model.requires_grad_(False)
    return model.eval()


def load_for_inference(model_cfg: ModelConfig, adapter: str | Path | None = None) -> Policy:
    """The base (4-bit in qlora mode) in eval mode, with a saved peft adapter applied when given (not merged)."""
    path = resolve_model_path(model_cfg.name_or_path)
    device = pick_device(model_cfg.device)
    dtype = compute_dtype(model_cfg.dtype, device)
    model = load_base(path, model_cfg, device, dtype)
    if adapter:
        model = load_adapter(model, adapter, trainable=False)
    model.eval()
    processor = load_processor(path, padding_side="left")
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
    path = Path(adapter).expanduser()
    read_adapter_config(path)
    check_adapter_shapes(model, path / "adapter_model.safetensors", f"adapter {path}")
    return pretrained.load_adapter(model, path, trainable)


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
