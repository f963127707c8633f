"""Merge a trained LoRA adapter into its full-precision base and save a plain transformers folder (any family),
loadable with AutoModelForImageTextToText.

The merge is checked: logits of base + adapter (unmerged), of the merged model and of the reloaded folder are
compared on a fixed synthetic image + prompt, and the folder appears (atomically) only once written and reloaded.
"""

from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora_rft.errors import UserError
from qlora_rft.files import atomic_folder, check_output_folder
from qlora_rft.config import ModelConfig
from qlora_rft.model import (check_model_folder, check_weight_files, load_base, pick_device, read_adapter_config,
                             resolve_model_path)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}

# Largest accepted max |logit difference| against base + adapter (unmerged), relative to the size of the logits:
#     tolerance = RELATIVE_TOLERANCE[dtype] * max(1, max |reference logit|)
# Measured on the verification input with random adapters (lora_B ~ N(0, 0.1), r=16, alpha=32) on the tiny /
# cpu-small presets (logits of size ~0.8, so the bound is the constant itself):
# - fp32: merging only reorders float32 sums (W x + s B (A x)  vs.  (W + s B A) x): 5e-7 .. 8e-7 (2e-5 with
#   lora_B ~ N(0, 0.5), an update 15x the size of the base weights). 1e-4 keeps a wide margin and still catches
#   any real error: a lost, doubled or misplaced adapter moves these logits by ~1.
# - bf16 / fp16: W + s B A is rounded to 16 bits (bf16 keeps 8 significant bits), while the unmerged forward keeps
#   W exact and adds the adapter's output on top. Measured 9e-3 .. 1.2e-2 (bf16) and 1.2e-3 .. 1.4e-3 (fp16): the
#   same size as the gap between a 16-bit and a float32 forward of the same model (5e-3 .. 1.2e-2 bf16,
#   5e-4 .. 1.1e-3 fp16), i.e. the cost of the dtype itself, not of the merge. The bounds are ~4x (bf16) and ~7x
#   (fp16) the measurements. Adapters whose update dwarfs the base weights round more (lora_B ~ N(0, 0.5): 0.07 ..
#   0.18 bf16, 7e-3 .. 1.6e-2 fp16, as far as the unmerged 16-bit forward is from float32) and can fail the check;
#   merge those at fp32. `adapter_effect` in the report says how much the adapter moves the logits at all.
# Not measured on trained full-size checkpoints (logits of size ~10-40, 28 layers): scaling by the logits' size is
# what carries these bounds there; check `adapter_effect` against the tolerance on a first real merge.
RELATIVE_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}

INFO_FILE = "merge_info.json"


@dataclass
class MergeReport:
    """What `merge_adapter` wrote and how closely the merged model matches base + adapter."""

    out: Path
    dtype: str  # bf16 | fp16 | fp32
    max_abs_diff_merged: float  # merged model vs. base + adapter (unmerged), same input, same dtype
    max_abs_diff_reloaded: float  # the saved folder reloaded with plain transformers vs. base + adapter
    tolerance: float  # the bound both must stay within (see RELATIVE_TOLERANCE)
    lora_modules: int  # LoRA layers merged
    adapter_effect: float = float("nan")  # max |logit difference| base + adapter vs. base alone (scale of the test)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff_merged <= self.tolerance and self.max_abs_diff_reloaded <= self.tolerance


def canonical_dtype(name: str) -> str:
    """'bf16' | 'fp16' | 'fp32' (also accepts bfloat16, float16, float32); UserError otherwise."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r} for merge: choose bf16, fp16 or fp32")
    return key


# ----------------------------------------------------------------------------- verification input


def verification_image(width: int = 84, height: int = 84):
    """A deterministic RGB image (a gradient with a few shapes), 84x84 by default (9 visual tokens of Qwen2-VL);
    another size draws the same picture stretched to it."""
    from PIL import Image, ImageDraw

    def at(x: float, y: float) -> tuple[int, int]:  # a point of the 84x84 drawing, at this size
        return int(x * width / 84), int(y * height / 84)

    image = Image.new("RGB", (width, height))
    image.putdata([(3 * x * 84 // width, 3 * y * 84 // height, 255 - (x * 84 // width + y * 84 // height))
                   for y in range(height) for x in range(width)])
    draw = ImageDraw.Draw(image)
    draw.ellipse((*at(8, 10), *at(40, 42)), fill=(220, 30, 30))
    draw.rectangle((*at(46, 40), *at(76, 74)), fill=(30, 60, 210))
    draw.polygon([at(14, 76), at(30, 50), at(44, 78)], fill=(240, 220, 40))
    return image


VERIFICATION_PROMPT = "Which shapes are in this image? Answer in <answer></answer> tags."
VERIFICATION_ANSWER = "<answer>circle, square</answer>"


def verification_inputs(processor) -> dict:
    """Processor outputs (batch of 1, CPU) for the fixed image, prompt and a short answer through the chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VERIFICATION_PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text + VERIFICATION_ANSWER], images=[verification_image()], return_tensors="pt"))


def verification_logits(model, processor) -> torch.Tensor:
    """Logits of `model` (of any family, peft-wrapped or not) on the fixed verification input.  -> [L, V] fp32 CPU.

    Puts the model in eval mode (no dropout) and runs without gradients.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in verification_inputs(processor).items()}
    model.eval()
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return logits[0].float().cpu()


# ----------------------------------------------------------------------------- merge


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    device: str = "auto",
    overwrite: bool = False,
) -> MergeReport:
    """Merge `adapter` into the full-precision `base` at `dtype` and save a from_pretrained folder into `out`.

    `base` is the from_pretrained folder (or `tiny:PRESET`) the adapter was trained on. An adapter trained in
    qlora mode saw the NF4-quantized copy of these weights; it is merged into the full-precision weights that copy
    was quantized from (the usual QLoRA practice): merging into the 4-bit weights would round the sum to NF4 and
    lose most of the adapter's small update, so a quantized base folder is refused. The merged model therefore
    differs from the 4-bit training model by the base's quantization error, as any full-precision use of a
    QLoRA adapter does.

    The merged weights, the base's processor, its generation config and `merge_info.json` are written into a
    temporary sibling of `out`, reloaded with plain transformers, and only then renamed to `out`; a failure leaves
    `out` untouched. A non-empty `out` is refused unless `overwrite`. Prints nothing; see `MergeReport.ok`.
    """
    from transformers import AutoModelForImageTextToText

    from qlora_rft import pretrained

    short = canonical_dtype(dtype)
    torch_dtype = DTYPES[short]
    base_path = resolve_model_path(str(base))
    check_base(base_path)
    adapter_path = check_adapter(Path(adapter).expanduser())
    out = Path(out).expanduser()
    check_output_folder(out, "--out", overwrite, inputs=[base_path, adapter_path])
    dev = pick_device(device)

    with quiet():
        model, lora_modules = load_with_adapter(base_path, adapter_path, torch_dtype, dev)
        if (base_path / "generation_config.json").is_file():  # the merged folder ships the base's own settings
            model.generation_config = pretrained.load_generation_config(base_path)
        processor = pretrained.load_processor(base_path)

        reference = verification_logits(model, processor)
        with model.disable_adapter():
            adapter_effect = _max_abs_diff(verification_logits(model, processor), reference)
        try:
            model = model.merge_and_unload(safe_merge=True)
        except ValueError as e:  # safe_merge found NaNs
            raise UserError(f"merging {adapter_path} gives non-finite weights ({_first_line(e)})") from e
        diff_merged = _max_abs_diff(verification_logits(model, processor), reference)
        tolerance = RELATIVE_TOLERANCE[short] * max(1.0, reference.abs().max().item())

        with atomic_folder(out) as tmp:
            model.save_pretrained(tmp)  # safetensors
            processor.save_pretrained(tmp)
            del model
            _free(dev)
            reloaded = pretrained.load_model(AutoModelForImageTextToText, tmp, dtype=torch_dtype,
                                             device_map={"": str(dev)})
            diff_reloaded = _max_abs_diff(verification_logits(reloaded, processor), reference)
            del reloaded
            _free(dev)
            report = MergeReport(
                out=out,
                dtype=short,
                max_abs_diff_merged=diff_merged,
                max_abs_diff_reloaded=diff_reloaded,
                tolerance=tolerance,
                lora_modules=lora_modules,
                adapter_effect=adapter_effect,
            )
            (tmp / INFO_FILE).write_text(json.dumps(_info(report, base, base_path, adapter_path), indent=2) + "\n")
    return report


def load_with_adapter(base: Path, adapter: Path, dtype: torch.dtype, device: torch.device):
    """(the full-precision base at `dtype` with the adapter applied by peft, unmerged; its number of LoRA layers),
    a UserError when the adapter does not fit the base or adds nothing."""
    from qlora_rft import pretrained

    model = load_base(base, ModelConfig(name_or_path=str(base), mode="full"), device, dtype)
    try:
        model = pretrained.load_adapter(model, adapter, trainable=False)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"adapter {adapter} does not fit base {base} ({_first_line(e)}): merge an adapter into the "
                        "base model it was trained on") from e
    _check_all_weights_loaded(model, adapter, base)
    lora_modules = _count_lora_layers(model)
    if lora_modules == 0:
        raise UserError(f"adapter {adapter} adds no LoRA layer to base {base}: nothing to merge")
    return model, lora_modules


# ----------------------------------------------------------------------------- checks and helpers


def check_base(path: Path) -> None:
    config = check_model_folder(path)
    if config.get("quantization_config"):
        raise UserError(
            f"base {path} is a quantized checkpoint: merge into the full-precision base the adapter was trained "
            "on (the folder qlora mode quantized on load), not into 4-bit weights"
        )
    check_weight_files(path, "base")


def check_adapter(path: Path) -> Path:
    config = read_adapter_config(path)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path} holds a {config.get('peft_type')!r} adapter; only LoRA adapters can be merged")
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(f"{path} has no adapter weights (adapter_model.safetensors): the adapter folder is incomplete")
    return path.resolve()


def _check_all_weights_loaded(model, adapter: Path, base: Path) -> None:
    """Every tensor in the adapter file found a home in the base, and every LoRA layer got its tensors."""
    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = set(load_peft_weights(str(adapter), device="cpu"))
    loaded = set(get_peft_model_state_dict(model))
    missing = sorted(saved - loaded) + sorted(loaded - saved)
    if missing:
        raise UserError(
            f"adapter {adapter} does not match the architecture of base {base}: {len(missing)} LoRA tensors have "
            f"no counterpart (e.g. {missing[0]}); merge an adapter into the base model it was trained on"
        )


def _count_lora_layers(model) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _info(report: MergeReport, base_arg, base: Path, adapter: Path) -> dict:
    import peft
    import transformers

    info = asdict(report)
    info.pop("out")
    return {
        "base": str(base_arg),
        "base_path": str(base.resolve()),
        "adapter": str(adapter),
        **info,
        "ok": report.ok,
        "tolerance_rule": f"{RELATIVE_TOLERANCE[report.dtype]:g} * max(1, max |reference logit|)",
        "verification": "logits on a fixed 84x84 synthetic image + prompt, vs. base + adapter (unmerged)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


@contextlib.contextmanager
def quiet():
    """No progress bars or info logging from transformers while merging (the library function prints nothing)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
