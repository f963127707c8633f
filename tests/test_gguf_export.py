"""GGUF export: the files llama.cpp reads, checked by llama.cpp itself against the merged transformers model."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install -e '.[gguf]'")
pytest.importorskip("llama_cpp", reason="the gguf extra is not installed: pip install -e '.[gguf]'")

from qlora_rft.errors import UserError  # noqa: E402
from qlora_rft.gguf_export import (QUANTS, export_gguf, llama_pre_tokenizer, modelfile, rename,  # noqa: E402
                                   tensor_types, text_tensors, vision_tensors)
from qlora_rft.models import families, family_of  # noqa: E402
from qlora_rft.pretrained import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LORA_B_STD = 0.1  # as test_export.py: a strong but realistic update (the base's weights have std 0.02)


def adapter_for(base: Path, folder: Path, train_vision: bool = False) -> Path:
    """A peft adapter of `base` whose lora_B are N(0, LORA_B_STD), so that it moves the logits."""
    from qlora_rft.config import LoraSettings
    from qlora_rft.model import attach_lora

    torch.manual_seed(0)
    model = load_model(family_of(base).transformers_class(), base, dtype=torch.float32)
    model = attach_lora(model, LoraSettings(dropout=0.0, train_vision=train_vision), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=LORA_B_STD)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_run(private_cache, tmp_path_factory):
    """(base, a run's adapter/ folder): two QLoRA GRPO steps on the tiny Qwen2-VL, as the demo trains."""
    from conftest import TINY_RUN

    from qlora_rft.config import load_config
    from qlora_rft.model import resolve_model_path
    from qlora_rft.trainer import train

    run = tmp_path_factory.mktemp("run")
    train(load_config(None, [*TINY_RUN, f"train.output_dir={run}"]))
    return resolve_model_path("tiny:tiny"), run / "adapter"


def _tensor_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def _field(path: Path, key: str):
    return gguf.GGUFReader(str(path)).fields[key].contents()


# ----------------------------------------------------------------------------- the demo's form: a trained adapter


@pytest.mark.slow
def test_a_trained_adapter_exports_to_f16_by_the_cli_and_llama_cpp_agrees(trained_run, tmp_path):
    base, adapter = trained_run
    out = tmp_path / "gguf"
    done = subprocess.run([sys.executable, "-m", "qlora_rft", "export", "--base", str(base), "--adapter", str(adapter),
                           "--format", "gguf", "--quant", "f16", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "text logits" in done.stdout and "greedy answer, llama.cpp" in done.stdout

    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export_info.json", "mmproj-f16.gguf",
                                                     "model-f16.gguf"]
    info = json.loads((out / "export_info.json").read_text())
    assert info["ok"] and info["quant"] == "f16" and info["family"] == "Qwen2-VL" and info["tokenizer_agrees"]
    for c in info["comparisons"]:
        assert c["max_abs_diff"] <= c["tolerance"] == pytest.approx(QUANTS["f16"].tolerance * max(1, c["scale"]))
    # the answer to the image prompt comes out, token for token the same as transformers' greedy answer
    assert info["answers"]["tokens"] > 0 and info["answers"]["llama_cpp"] == info["answers"]["transformers"]
    # tiny: 16 matrices (embedding, output, 2 layers x q k v o gate up down) in f16, 11 vectors (2 x (2 norms +
    # q/k/v biases) + the final norm) in f32
    assert info["files"]["model-f16.gguf"]["tensor_types"] == {"F16": 16, "F32": 11}
    matrices = 768 * 64 * 2 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64)  # 172,032 weights
    vectors = 2 * (64 * 2 + 64 + 32 + 32) + 64  # 576
    assert _tensor_bytes(out / "model-f16.gguf") == matrices * 2 + vectors * 4
    assert _field(out / "model-f16.gguf", "general.architecture") == "qwen2vl"
    assert _field(out / "mmproj-f16.gguf", "clip.projector_type") == "qwen2vl_merger"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_a_trained_adapter_exports_to_q8_0_at_34_bytes_per_32_weights(trained_run, tmp_path):
    base, adapter = trained_run
    result = export_gguf(base, tmp_path / "gguf", quant="q8_0", adapter=adapter)
    check = result.check
    assert check.ok and check.tokenizer_agrees and check.image_tokens == 12 * 8
    assert [c.name for c in check.comparisons] == ["text logits", "image embedding", "logits after the image"]
    assert check.answers.tokens > 0
    model_file = tmp_path / "gguf" / "model-q8_0.gguf"
    assert tensor_types(model_file) == {"F32": 11, "Q8_0": 16}
    assert _tensor_bytes(model_file) == 172_032 // 32 * 34 + 576 * 4  # blocks of 32 weights: 32 int8 + an f16 scale


# ----------------------------------------------------------------------------- every family, every quant


@pytest.fixture(scope="module")
def adapters(private_cache, tmp_path_factory):
    """preset -> (base, adapter with LoRA on the language model, and on the vision tower but for `tiny`)."""
    from qlora_rft.model import resolve_model_path

    made = {}
    for preset in ("tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny"):
        base = resolve_model_path(f"tiny:{preset}")
        made[preset] = base, adapter_for(base, tmp_path_factory.mktemp(preset), train_vision=preset != "tiny")
    return made


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize("preset, arch, projector", [("qwen2.5-vl-tiny", "qwen2vl", "qwen2.5vl_merger"),
                                                     ("qwen3-vl-tiny", "qwen3vl", "qwen3vl_merger")])
def test_qwen2_5_and_qwen3_vl_export_and_llama_cpp_agrees(adapters, tmp_path, preset, arch, projector, quant):
    base, adapter = adapters[preset]
    result = export_gguf(base, tmp_path / "gguf", quant=quant, adapter=adapter)
    assert result.check.ok, result.check.failures()
    assert result.check.tokenizer_agrees and result.check.answers.tokens > 0
    model_file, mmproj = tmp_path / "gguf" / f"model-{quant}.gguf", tmp_path / "gguf" / "mmproj-f16.gguf"
    assert tensor_types(model_file) == {quant.upper(): 16, "F32": 11 if preset == "qwen2.5-vl-tiny" else 9}
    eps = result.check.norm_epsilon  # llama.cpp's qwen2vl reads no RMS-norm epsilon and uses 0; qwen3vl reads it
    assert (eps.model, eps.llama_cpp, eps.differs) == ((1e-5, 0.0, True) if arch == "qwen2vl" else (1e-6, 1e-6, False))
    assert eps.file == pytest.approx(eps.model)
    assert _field(model_file, "general.architecture") == arch
    assert _field(mmproj, "clip.projector_type") == projector
    if preset == "qwen3-vl-tiny":  # both vision blocks feed a deepstack merger; the text file expects 2 levels
        assert _field(mmproj, "clip.vision.is_deepstack_layers") == [True, True]
        assert _field(model_file, "qwen3vl.n_deepstack_layers") == 2
        assert _field(model_file, "qwen3vl.rope.dimension_sections") == [4, 2, 2, 0]
    else:  # full attention in block 1 of 2: every 2nd block
        assert _field(mmproj, "clip.vision.n_wa_pattern") == 2
        assert _field(model_file, "qwen2vl.rope.dimension_sections") == [2, 3, 3, 0]


def test_logits_are_compared_with_the_model_at_llama_cpps_norm_epsilon(adapters, tmp_path):
    """llama.cpp 0.3.36 computes Qwen2-VL's RMS norms with epsilon 0 (its load log says so); the tiny model's is
    1e-5. The check compares with the model run at 0 (the files are exact at f16: < 2e-3) and reports the gap's
    own effect (7e-3 here) apart; the model is left with its own epsilon."""
    from qlora_rft.gguf_check import text_norm_epsilon

    base, adapter = adapters["tiny"]
    check = export_gguf(base, tmp_path / "gguf", quant="f16", adapter=adapter).check
    eps = check.norm_epsilon
    assert (eps.model, eps.file, eps.llama_cpp) == (1e-5, pytest.approx(1e-5), 0.0) and check.ok
    text = check.comparisons[0]
    assert text.max_abs_diff < 2e-3 < eps.effect < text.tolerance

    model = load_model(family_of(base).transformers_class(), base)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with text_norm_epsilon(model, 0.0):
            at_zero = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(before, after) and not torch.equal(before, at_zero)
    assert {m.variance_epsilon for m in model.model.language_model.modules() if hasattr(m, "variance_epsilon")} == {
        1e-5}


def test_a_wrong_epsilon_in_the_file_is_an_export_error_not_excused(adapters, tmp_path, monkeypatch):
    """Qwen3-VL's reader reads the epsilon: a file stating 1e-2 (not the model's 1e-6) is compared with the model
    as it is, and fails."""
    from qlora_rft import gguf_export

    base, adapter = adapters["qwen3-vl-tiny"]
    original = gguf_export.text_writer

    def wrong_epsilon(config, *args):
        config.text_config.rms_norm_eps = 1e-2
        try:
            return original(config, *args)
        finally:
            config.text_config.rms_norm_eps = 1e-6

    monkeypatch.setattr(gguf_export, "text_writer", wrong_epsilon)
    with pytest.raises(UserError, match="beyond the f16 tolerance"):
        export_gguf(base, tmp_path / "gguf", quant="f16", adapter=adapter)


def test_bf16_keeps_8_significant_bits_and_llama_cpp_agrees(adapters, tmp_path):
    base, adapter = adapters["tiny"]
    result = export_gguf(base, tmp_path / "gguf", quant="bf16", adapter=adapter)
    assert result.check.ok, result.check.failures()
    assert tensor_types(tmp_path / "gguf" / "model-bf16.gguf") == {"BF16": 16, "F32": 11}
    assert _field(tmp_path / "gguf" / "model-bf16.gguf", "general.file_type") == 32  # LlamaFileType.MOSTLY_BF16


def test_a_tied_output_matrix_is_left_to_llama_cpp(private_cache, tmp_path):
    """As Qwen2-VL-2B ships: lm_head is embed_tokens. The file holds it once; llama.cpp uses it for both."""
    from qlora_rft.model import resolve_model_path

    result = export_gguf(resolve_model_path("tiny:tiny-tied"), tmp_path / "gguf", quant="f16")
    assert result.check.ok, result.check.failures()
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "gguf" / "model-f16.gguf")).tensors]
    assert "token_embd.weight" in names and "output.weight" not in names
    assert tensor_types(tmp_path / "gguf" / "model-f16.gguf") == {"F16": 15, "F32": 11}


def _k_quant_model(folder: Path) -> Path:
    """A Qwen2-VL folder whose rows are 256 wide (K-quants' block): hidden 256, MLP 512, random weights."""
    from transformers import GenerationConfig

    from qlora_rft import tiny

    family = family_of({"model_type": "qwen2_vl"})
    tokenizer = tiny.build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    config = family.build_config(ids, vocab=len(tokenizer), hidden=256, layers=2, heads=4, kv_heads=2,
                                 intermediate=512, vision_depth=1, vision_dim=32, vision_heads=2)
    torch.manual_seed(0)
    model = family.transformers_class()(config)
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    model.save_pretrained(folder)
    family.build_processor(tokenizer, tiny.CHAT_TEMPLATE, *tiny.TINY_PIXELS).save_pretrained(folder)
    return folder


def test_q4_k_m_is_made_by_llama_cpps_quantizer(private_cache, tmp_path):
    from qlora_rft.model import resolve_model_path

    # rows of 64 and 128 (the tiny preset): no K-quant fits, llama.cpp falls back to 32-blocks (q4_K -> q5_0,
    # q6_K -> q8_0)
    result = export_gguf(resolve_model_path("tiny:tiny"), tmp_path / "tiny", quant="q4_k_m")
    assert result.check.ok, result.check.failures()
    types = tensor_types(tmp_path / "tiny" / "model-q4_k_m.gguf")
    assert set(types) == {"F32", "Q5_0", "Q8_0"} and types["F32"] == 11 and types["Q5_0"] + types["Q8_0"] == 16
    # rows of 256: q4_K with q6_K where Q4_K_M keeps more bits (the output matrix at least)
    result = export_gguf(_k_quant_model(tmp_path / "wide"), tmp_path / "wide-gguf", quant="q4_k_m")
    assert result.check.ok, result.check.failures()
    types = tensor_types(tmp_path / "wide-gguf" / "model-q4_k_m.gguf")
    assert types["Q4_K"] >= 8 and types["Q6_K"] >= 1 and "F16" not in types
    assert not (tmp_path / "wide-gguf" / "model-q4_k_m.gguf.f16").exists()  # llama.cpp's input is removed


# ----------------------------------------------------------------------------- from a merged folder


def test_a_merged_folder_exports_the_same_tensors_as_base_plus_adapter(adapters, tmp_path):
    from qlora_rft.export import merge_adapter

    base, adapter = adapters["tiny"]
    merge_adapter(base, adapter, tmp_path / "merged", dtype="fp32", device="cpu")
    from_merged = export_gguf(tmp_path / "merged", tmp_path / "a", quant="f16")
    from_adapter = export_gguf(base, tmp_path / "b", quant="f16", adapter=adapter)
    assert from_merged.check.ok and from_adapter.check.ok
    for name in ("model-f16.gguf", "mmproj-f16.gguf"):
        a, b = (gguf.GGUFReader(str(tmp_path / side / name)).tensors for side in ("a", "b"))
        assert [t.name for t in a] == [t.name for t in b]
        assert all((x.data == y.data).all() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the check can fail


def test_a_lost_adapter_fails_the_check_and_leaves_no_folder(adapters, tmp_path, monkeypatch):
    """The language model written from the base alone while the reference is base + adapter (it moves these
    logits by ~0.86): every quant's tolerance sees it."""
    from qlora_rft import gguf_export
    from qlora_rft.config import ModelConfig
    from qlora_rft.model import load_base

    base, adapter = adapters["tiny"]
    plain = load_base(base, ModelConfig(name_or_path=str(base), mode="full"), torch.device("cpu"), torch.float32)
    original = gguf_export.text_tensors
    monkeypatch.setattr(gguf_export, "text_tensors", lambda model: original(plain))
    for quant in QUANTS:
        with pytest.raises(UserError, match=f"beyond the {quant} tolerance \\(text logits 0.8.* > .*nothing was "
                                            "written"):
            export_gguf(base, tmp_path / "gguf", quant=quant, adapter=adapter)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_mismatch_fails_the_command_in_one_line_and_leaves_no_folder(tmp_path):
    """A process whose exported embedding is scaled by 1.5: exit code 2, one line on stderr, no folder."""
    code = ("import sys; import qlora_rft.gguf_export as g; original = g.text_tensors; "
            "g.text_tensors = lambda m: [(n, t * 1.5 if n == 'token_embd.weight' else t) for n, t in original(m)]; "
            "from qlora_rft.cli import main; "
            f"sys.exit(main(['export', '--base', 'tiny:tiny', '--quant', 'f16', '--out', {str(tmp_path / 'g')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: the GGUF files disagree")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- refusals, before any work


def test_a_missing_extra_is_one_line(tmp_path):
    code = ("import sys; sys.modules['llama_cpp'] = None; from qlora_rft.cli import main; "
            f"sys.exit(main(['export', '--base', 'tiny:tiny', '--out', {str(tmp_path / 'g')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2
    assert done.stderr == ("error: GGUF export needs the gguf extra (llama_cpp is not installed): pip install -e "
                           "'.[gguf]' (gguf and llama-cpp-python, which compiles llama.cpp: a few minutes the first "
                           "time)\n")
    assert not (tmp_path / "g").exists()


def test_a_family_without_a_gguf_format_is_refused_naming_the_llama_cpp_version(tmp_path, monkeypatch):
    import llama_cpp

    from qlora_rft import gguf_export

    monkeypatch.setattr(gguf_export, "family_of", lambda path: replace(family_of(path), gguf=None))
    with pytest.raises(UserError, match=f"Qwen2-VL has no GGUF format in llama.cpp of llama-cpp-python "
                                        f"{llama_cpp.__version__}"):
        export_gguf("tiny:tiny", tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


def test_a_qwen2_5_vl_with_irregular_full_attention_blocks_is_refused():
    from types import SimpleNamespace

    from qlora_rft.models.qwen2_5_vl import gguf_vision_keys

    def config(full, window=112):
        return SimpleNamespace(vision_config=SimpleNamespace(fullatt_block_indexes=full, depth=32, window_size=window,
                                                             hidden_size=1280, intermediate_size=3420))

    writer = gguf.GGUFWriter(None, "clip")
    gguf_vision_keys(writer, config([7, 15, 23, 31]))  # the released one: every 8th block
    assert writer.kv_data[0]["clip.vision.n_wa_pattern"].value == 8
    for bad in (config([7, 15, 24, 31]), config([7, 15, 23]), config([7, 15, 23, 31], window=224)):
        with pytest.raises(UserError, match="llama.cpp runs only every n-th block full"):
            gguf_vision_keys(gguf.GGUFWriter(None, "clip"), bad)


def test_a_checkpoint_llama_cpp_cannot_run_is_refused_before_it_loads(private_cache, tmp_path, monkeypatch):
    import shutil

    import llama_cpp

    from qlora_rft import gguf_export
    from qlora_rft.model import resolve_model_path

    folder = tmp_path / "base"
    shutil.copytree(resolve_model_path("tiny:qwen2.5-vl-tiny"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["fullatt_block_indexes"] = [0]  # of 2 blocks: block 1 windowed, not "every n-th"
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(gguf_export, "_merged", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=f"full attention in blocks \\[0\\] of 2 .* \\(llama.cpp of "
                                        f"llama-cpp-python {llama_cpp.__version__}\\)$"):
        export_gguf(folder, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_bad_arguments_are_user_errors_and_write_nothing(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="unknown GGUF quant"):
        export_gguf("tiny:tiny", tmp_path / "a", quant="q3")
    with pytest.raises(UserError, match="not empty"):
        export_gguf("tiny:tiny", tmp_path / "full")
    with pytest.raises(UserError, match="adapter_config.json"):
        export_gguf("tiny:tiny", tmp_path / "b", adapter=tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- names, tokenizer, Modelfile


def test_family_tables_rename_by_hand():
    qwen2, qwen3 = (family_of({"model_type": t}).gguf.vision_tensors for t in ("qwen2_vl", "qwen3_vl"))
    assert rename("blocks.3.attn.qkv", qwen2) == ("v.blk.3.attn_q", "v.blk.3.attn_k", "v.blk.3.attn_v")
    assert rename("blocks.3.attn.qkv", qwen3) == ("v.blk.3.attn_qkv",)
    assert rename("merger.mlp.2", qwen2) == ("mm.2",) and rename("merger.linear_fc2", qwen3) == ("mm.2",)
    # the 2nd deepstack merger reads vision block 11 of (5, 11, 17)
    assert rename("deepstack_merger_list.1.norm", qwen3, [5, 11, 17]) == ("v.deepstack.11.norm",)
    assert rename("blocks.3.attn.qkv_extra", qwen2) is None and rename("blocks.x.norm1", qwen2) is None


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied", "qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def test_every_tensor_gets_a_name_the_gguf_package_knows(preset):
    """Each family's names are among the gguf package's names for the architecture (and MMPROJ), every weight
    is written once, and a tied output matrix is left to llama.cpp (it reuses token_embd)."""
    from qlora_rft.tiny import build_model

    model, _ = build_model(preset)
    fmt = family_of(model).gguf

    def known(arch):
        return {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[arch] for b in range(8)}

    text, vision = text_tensors(model), vision_tensors(model, family_of(model))
    text_names = {n.rsplit(".", 1)[0] for n, _ in text}
    vision_names = {n.removesuffix(".1").rsplit(".", 1)[0] for n, _ in vision}
    assert text_names <= known(gguf.MODEL_ARCH[fmt.arch])
    assert vision_names <= known(gguf.MODEL_ARCH.MMPROJ)
    weights = sum(t.numel() for n, t in model.state_dict().items() if n != "lm_head.weight" or preset != "tiny-tied")
    assert sum(t.numel() for _, t in text + vision) == weights
    assert ("output.weight" in dict(text)) == (preset != "tiny-tied")


def test_pre_tokenizers_llama_cpp_knows():
    from qlora_rft.gguf_export import QWEN2_SPLIT

    bpe = {"type": "BPE"}
    assert llama_pre_tokenizer({"model": bpe, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    qwen2 = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}},
                                                  {"type": "ByteLevel", "use_regex": False}]}
    assert llama_pre_tokenizer({"model": bpe, "pre_tokenizer": qwen2}) == "qwen2"
    with pytest.raises(UserError, match="would split text differently"):
        llama_pre_tokenizer({"model": bpe, "pre_tokenizer": {"type": "Metaspace"}})
    with pytest.raises(UserError, match="would split text differently"):
        llama_pre_tokenizer({"model": {"type": "Unigram"}, "pre_tokenizer": qwen2})


def test_modelfile_names_both_files_and_the_family_template():
    qwen2, qwen3 = (family_of({"model_type": t}) for t in ("qwen2_vl", "qwen3_vl"))
    text = modelfile(qwen2, "model-q8_0.gguf", "mmproj-f16.gguf")
    lines = text.splitlines()
    assert "FROM ./model-q8_0.gguf" in lines and "FROM ./mmproj-f16.gguf" in lines
    assert 'SYSTEM """You are a helpful assistant."""' in lines and 'PARAMETER stop "<|im_end|>"' in lines
    assert "<|im_start|>{{ .Role }}" in text
    assert "SYSTEM" not in modelfile(qwen3, "m.gguf", "p.gguf")  # Qwen3-VL's template has no default system prompt
    assert {f.gguf is not None for f in families()} == {True}
