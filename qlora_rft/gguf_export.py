"""Export a fine-tuned model as GGUF for llama.cpp, LM Studio and Ollama: a language model file and a vision projector
(mmproj) file written with the gguf package from the merged float32 weights (K-quants by llama.cpp's quantizer), an
Ollama Modelfile and export_info.json; checked by llama.cpp (`gguf_check.py`) before the folder appears, atomically.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qlora_rft.errors import UserError
from qlora_rft.export import check_adapter, check_base, load_with_adapter, quiet
from qlora_rft.files import atomic_folder, check_output_folder
from qlora_rft.models import Family, family_of

if TYPE_CHECKING:
    from qlora_rft.gguf_check import GgufCheck


@dataclass(frozen=True)
class Quant:
    """One --quant choice: what this project writes, what llama.cpp's quantizer does after, and the tolerance."""

    name: str  # the --quant value, also in the file name
    weights: str  # GGMLQuantizationType member for 2-D weights of the text file as written here
    file_type: str  # LlamaFileType member of that file (general.file_type)
    llama_ftype: str | None  # the llama.cpp quantizer's LLAMA_FTYPE_* applied to it afterwards, if any
    tolerance: float  # relative: max |difference| <= tolerance * max(1, max |reference|) (see gguf_check.py)


# Tolerances, relative to the reference's largest value (at least 1), for every comparison of `gguf_check.py`.
# Measured (README, Export to GGUF), as max |difference| / max(1, max |reference|), the largest over the tiny
# presets of the three families and cpu-small with adapters (lora_B ~ N(0, 0.1), language model and vision tower)
# merged, and the demo's warmed base with its trained adapter: f16 0.0029, bf16 0.011, q8_0 0.049, q4_k_m 0.17 (the
# tiny rows of 64-128 take no K-quant: llama.cpp falls back to q5_0/q8_0). The largest are the demo's logits after
# the image, where llama.cpp's RMS norms without epsilon (see gguf_check.py) magnify the rounding of q8_0's 8-bit
# activations. The bounds are 2-4x those; a lost adapter moves the tiny logits by 0.86, beyond every bound. The
# mmproj file is f16 for every quant. Not measured on trained full-size checkpoints (logits of ~10-40).
QUANTS: dict[str, Quant] = {
    "f16": Quant("f16", "F16", "MOSTLY_F16", None, 1e-2),
    "bf16": Quant("bf16", "BF16", "MOSTLY_BF16", None, 4e-2),
    "q8_0": Quant("q8_0", "Q8_0", "MOSTLY_Q8_0", None, 0.1),
    "q4_k_m": Quant("q4_k_m", "F16", "MOSTLY_F16", "LLAMA_FTYPE_MOSTLY_Q4_K_M", 0.5),
}

VISION_NORM_EPS = 1e-6  # the vision towers' norms (fixed in transformers' code of all three families)
INFO_FILE = "export_info.json"

# The language model's tensors, named under `model.language_model.` (every family), -> GGUF names.
TEXT_TENSORS: dict[str, str] = {
    "embed_tokens": "token_embd",
    "norm": "output_norm",
    "layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
    "layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "layers.{bid}.self_attn.q_norm": "blk.{bid}.attn_q_norm",
    "layers.{bid}.self_attn.k_norm": "blk.{bid}.attn_k_norm",
    "layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm",
    "layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate",
    "layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up",
    "layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}

# The Split regex of Qwen2's tokenizer.json (also Qwen2.5-VL's and Qwen3-VL's): llama.cpp's pre-tokenizer "qwen2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")


@dataclass
class GgufExport:
    """What `export_gguf` wrote and how llama.cpp's outputs compared with the merged transformers model."""

    out: Path
    quant: str
    files: dict[str, int]  # file name -> bytes
    check: GgufCheck


def canonical_quant(name: str) -> Quant:
    key = str(name).lower()
    if key not in QUANTS:
        raise UserError(f"unknown GGUF quant {name!r}: choose one of {', '.join(QUANTS)}")
    return QUANTS[key]


def require_extra():
    """(gguf, llama_cpp), or a one-line UserError saying how to install them."""
    try:
        import gguf
        import llama_cpp
    except ImportError as e:
        raise UserError(f"GGUF export needs the gguf extra ({e.name} is not installed): pip install -e '.[gguf]' "
                        "(gguf and llama-cpp-python, which compiles llama.cpp: a few minutes the first time)") from None
    return gguf, llama_cpp


def llama_cpp_version() -> str:
    import llama_cpp

    return f"llama.cpp of llama-cpp-python {llama_cpp.__version__}"


# ----------------------------------------------------------------------------- export


def export_gguf(base: str | Path, out: str | Path, quant: str = "q8_0", adapter: str | Path | None = None,
                overwrite: bool = False) -> GgufExport:
    """Write `out`/model-QUANT.gguf (language model), mmproj-f16.gguf (vision tower and projector), Modelfile and
    export_info.json: `adapter` merged into `base` in float32 (or `base` as it is: an already merged folder).

    Everything is checked before the model loads (extra installed, quant, family, folders, tokenizer); the files
    are then written into a temporary sibling of `out`, loaded by llama.cpp and compared with the merged model
    (`gguf_check.check_gguf`), and the folder is renamed to `out` only if every difference is within the quant's
    tolerance; otherwise a UserError gives the figures and nothing is left. Prints nothing.
    """
    from qlora_rft import pretrained
    from qlora_rft.gguf_check import check_gguf
    from qlora_rft.model import resolve_model_path

    spec = canonical_quant(quant)
    require_extra()
    base_path = resolve_model_path(str(base))
    check_base(base_path)
    family = family_of(base_path)
    if family.gguf is None:
        raise UserError(f"{family.name} has no GGUF format in {llama_cpp_version()}: it cannot be exported")
    adapter_path = check_adapter(Path(adapter).expanduser()) if adapter is not None else None
    out = Path(out).expanduser()
    check_output_folder(out, "--out", overwrite, inputs=[base_path, adapter_path or base_path])
    config, processor = pretrained.load_config(base_path), pretrained.load_processor(base_path)
    check_vision_config(config)
    text = text_writer(config, family, processor, base_path, spec)  # metadata first: refusals come before loading
    vision = vision_writer(config, family, processor, base_path)

    with quiet():
        model = _merged(base_path, adapter_path)
        model_file, mmproj_file = f"model-{spec.name}.gguf", "mmproj-f16.gguf"
        with atomic_folder(out) as tmp:
            write_text_file(text, model, spec, tmp / model_file)
            write_vision_file(vision, model, family, tmp / mmproj_file)
            (tmp / "Modelfile").write_text(modelfile(family, model_file, mmproj_file))
            check = check_gguf(tmp / model_file, tmp / mmproj_file, model, processor, family, spec.tolerance)
            files = {name: (tmp / name).stat().st_size for name in (model_file, mmproj_file)}
            info = _info(base, adapter_path, family, spec, files, check, tmp)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            if not check.ok:
                raise UserError(f"the GGUF files disagree with the merged model beyond the {spec.name} tolerance "
                                f"({check.failures()}); nothing was written")
    return GgufExport(out=out, quant=spec.name, files=files, check=check)


def _merged(base: Path, adapter: Path | None):
    """The model to export, float32 on the CPU: `adapter` merged into `base`, or `base` alone."""
    from qlora_rft.config import ModelConfig
    from qlora_rft.model import load_base

    cpu = torch.device("cpu")
    if adapter is None:
        return load_base(base, ModelConfig(name_or_path=str(base), mode="full"), cpu, torch.float32).eval()
    model, _ = load_with_adapter(base, adapter, torch.float32, cpu)
    try:
        return model.merge_and_unload(safe_merge=True).eval()
    except ValueError as e:  # safe_merge found NaNs
        raise UserError(f"merging {adapter} gives non-finite weights ({e})") from e


def check_vision_config(config) -> None:
    """What llama.cpp's Qwen-VL projectors assume of every family: two frames per patch (the Conv3d is written as
    two 2-D convolutions) and 2x2 merging."""
    vision = config.vision_config
    if vision.temporal_patch_size != 2 or vision.spatial_merge_size != 2:
        raise UserError(f"a vision tower with temporal_patch_size={vision.temporal_patch_size} and "
                        f"spatial_merge_size={vision.spatial_merge_size}: {llama_cpp_version()} reads only 2 and 2")


# ----------------------------------------------------------------------------- metadata


def text_writer(config, family: Family, processor, folder: Path, spec: Quant):
    """A GGUFWriter holding the language model file's metadata (architecture, shapes, M-RoPE, tokenizer)."""
    import gguf

    text = config.text_config
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.gguf.arch]], use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_file_type(gguf.LlamaFileType[spec.file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    writer.add_block_count(text.num_hidden_layers)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    rope = text.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_sections([*rope["mrope_section"], 0][:4])  # temporal, height, width, (extra)
    if family.gguf.text_keys is not None:
        family.gguf.text_keys(writer, config)
    add_tokenizer(writer, folder, processor, text)
    return writer


def vision_writer(config, family: Family, processor, folder: Path):
    """A GGUFWriter holding the mmproj file's metadata (projector type, tower shape, image normalisation)."""
    import gguf

    vision = config.vision_config
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], use_temp_file=True)
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(folder.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(getattr(gguf.VisionProjectorType, family.gguf.projector))
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_block_count(vision.depth)
    writer.add_vision_head_count(vision.num_heads)
    writer.add_vision_attention_layernorm_eps(VISION_NORM_EPS)
    writer.add_vision_spatial_merge_size(vision.spatial_merge_size)
    writer.add_vision_image_mean(list(processor.image_processor.image_mean))
    writer.add_vision_image_std(list(processor.image_processor.image_std))
    try:
        family.gguf.vision_keys(writer, config)
    except UserError as e:  # a vision layout the family's llama.cpp reader cannot run
        raise UserError(f"{e} ({llama_cpp_version()})") from None
    return writer


def add_tokenizer(writer, folder: Path, processor, text) -> None:
    """The byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer: tokens (added ones typed CONTROL or
    USER_DEFINED), merges, the pre-tokenizer, special ids (no BOS is added, as Qwen never does) and the chat
    template."""
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer = processor.tokenizer
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(text.vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(llama_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    if text.bos_token_id is not None:
        writer.add_bos_token_id(text.bos_token_id)
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    template = processor.chat_template or tokenizer.chat_template
    if template:
        writer.add_chat_template(template)


def llama_pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for a tokenizer.json's pre-tokenizer: Qwen2's split then byte-level ("qwen2"), or plain
    byte-level with GPT-2's regex ("gpt-2", the tokenizer of this project's tiny models); UserError otherwise."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") == "BPE":
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt-2"
        parts = pre.get("pretokenizers") or []
        if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
                and parts[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT and parts[1].get("type") == "ByteLevel"
                and not parts[1].get("use_regex", True)):
            return "qwen2"
    raise UserError(f"the tokenizer ({model.get('type')} model, {pre.get('type')} pre-tokenizer) is neither Qwen2's "
                    f"nor GPT-2's byte-level BPE: {llama_cpp_version()} would split text differently")


# ----------------------------------------------------------------------------- tensors


def rename(name: str, table: dict, deepstack: list[int] = ()) -> tuple[str, ...] | None:
    """GGUF name(s) of a tensor (its transformers name without .weight/.bias) by a family table, None if absent.
    `{bid}` matches a block number; `{ds}`, the ds-th deepstack merger, writes the vision block it reads."""
    for pattern, target in table.items():
        regex = re.escape(pattern).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{ds\}", r"(?P<ds>\d+)")
        found = re.fullmatch(regex, name)
        if found:
            groups = found.groupdict()
            bid = int(groups["bid"]) if "bid" in groups else deepstack[int(groups["ds"])] if "ds" in groups else 0
            return tuple(t.format(bid=bid) for t in ((target,) if isinstance(target, str) else target))
    return None


def text_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of the language model; the output matrix only when not tied to the embedding."""
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    found = []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not tied:  # llama.cpp reuses token_embd when the file has no output matrix
                found.append(("output.weight", tensor))
            continue
        if not name.startswith("model.language_model."):
            continue
        stem, _, kind = name.removeprefix("model.language_model.").rpartition(".")
        found.extend((f"{gguf_name}.{kind}", tensor) for gguf_name in _named(stem, TEXT_TENSORS, name))
    return found


def vision_tensors(model, family: Family) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of the vision tower and merger: a fused q/k/v split in row blocks, the Conv3d patch
    embedding written as its two temporal halves (`.weight` and `.weight.1`), as llama.cpp's projectors read it."""
    deepstack = list(getattr(model.config.vision_config, "deepstack_visual_indexes", []))
    found = []
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.visual."):
            continue
        stem, _, kind = name.removeprefix("model.visual.").rpartition(".")
        targets = _named(stem, family.gguf.vision_tensors, name, deepstack)
        if tensor.ndim == 5:  # [out, in, frames=2, h, w]
            found += [(f"{targets[0]}.weight", tensor[:, :, 0]), (f"{targets[0]}.weight.1", tensor[:, :, 1])]
        else:
            found.extend((f"{t}.{kind}", part) for t, part in zip(targets, tensor.chunk(len(targets))))
    return found


def _named(stem: str, table: dict, full_name: str, deepstack: list[int] = ()) -> tuple[str, ...]:
    targets = rename(stem, table, deepstack)
    if targets is None:
        raise UserError(f"tensor {full_name} has no GGUF name in {llama_cpp_version()}'s format: this checkpoint "
                        "holds more than the family's llama.cpp reader knows")
    return targets


def tensor_type(gguf_name: str, tensor: torch.Tensor, weights: str) -> str:
    """GGMLQuantizationType member of a tensor: 1-D ones (norms, biases) and position embeddings stay F32, as
    llama.cpp computes with them; the patch convolutions are F16; other weights `weights`."""
    if tensor.ndim <= 1 or gguf_name.startswith("v.position_embd"):
        return "F32"
    if gguf_name.startswith("v.patch_embd"):
        return "F16"
    return weights


def add_tensors(writer, named: list[tuple[str, torch.Tensor]], weights: str) -> None:
    """Each tensor encoded (a block type the row length does not divide falls back to F16) and added."""
    import gguf

    for name, tensor in named:
        data = tensor.detach().to(torch.float32).contiguous().numpy()
        qtype = gguf.GGMLQuantizationType[tensor_type(name, tensor, weights)]
        try:
            encoded = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:
            qtype = gguf.GGMLQuantizationType.F16
            encoded = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, encoded, raw_dtype=qtype)  # a uint8 (block) array: its byte shape says the shape


def write_text_file(writer, model, spec: Quant, path: Path) -> None:
    """The language model file at `spec`: written here, then quantized by llama.cpp for a K-quant."""
    if spec.llama_ftype is None:
        add_tensors(writer, text_tensors(model), spec.weights)
        _write(writer, path)
        return
    source = path.with_name(path.name + ".f16")
    add_tensors(writer, text_tensors(model), spec.weights)
    _write(writer, source)
    llama_quantize(source, path, spec.llama_ftype)
    source.unlink()


def write_vision_file(writer, model, family: Family, path: Path) -> None:
    add_tensors(writer, vision_tensors(model, family), "F16")
    _write(writer, path)


def _write(writer, path: Path) -> None:
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_quantize(source: Path, target: Path, ftype: str) -> None:
    """llama.cpp's quantizer (what its llama-quantize tool runs), silenced; a row length a K-quant's 256-blocks do
    not divide falls back to a 32-block type (llama.cpp's rule: q4_K -> q5_0, q6_K -> q8_0)."""
    import llama_cpp

    from qlora_rft.gguf_check import llama_cpp_silenced

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = torch.get_num_threads()
    with llama_cpp_silenced():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed on {source} (status {status})")


# ----------------------------------------------------------------------------- beside the files


def modelfile(family: Family, model_file: str, mmproj_file: str) -> str:
    """Ollama's Modelfile: the two files, the family's chat template and its stop tokens."""
    system = f'SYSTEM """{family.gguf.ollama_system}"""\n' if family.gguf.ollama_system else ""
    return (f"# {family.name}, exported by qlora-rft. In this folder: ollama create NAME -f Modelfile\n"
            f"FROM ./{model_file}\n"
            f"FROM ./{mmproj_file}\n"
            f'TEMPLATE """{family.gguf.ollama_template}"""\n'
            f"{system}"
            'PARAMETER stop "<|im_end|>"\n'
            'PARAMETER stop "<|endoftext|>"\n')


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds, e.g. {"Q8_0": 14, "F32": 9}."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def _info(base, adapter: Path | None, family: Family, spec: Quant, files: dict, check, folder: Path) -> dict:
    import llama_cpp
    import transformers

    return {
        "base": str(base),
        "adapter": str(adapter) if adapter else None,
        "family": family.name,
        "quant": spec.name,
        "files": {name: {"bytes": size, "tensor_types": tensor_types(folder / name)} for name, size in files.items()},
        **asdict(check),
        "ok": check.ok,
        "tolerance_rule": f"{spec.tolerance:g} * max(1, max |reference|), per check",
        "reference": "the merged model in float32 with transformers, the same token ids and image",
        "versions": {"llama_cpp_python": llama_cpp.__version__, "gguf": _version("gguf"), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
