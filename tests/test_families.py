"""Model families: the registry by config.json model_type, each family's image rule and LoRA targets, the real-shape
presets against the released config.json values, and the tiny Qwen2.5-VL and Qwen3-VL presets through every command
(shared vision, train, eval, score, merge)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import TINY_RUN
from PIL import Image

from qlora_rft.config import LoraSettings, load_config
from qlora_rft.data import resize_image
from qlora_rft.errors import UserError
from qlora_rft.models import families, family_of, preset_names
from qlora_rft.prompts import encode_prompt
from qlora_rft.tasks import get_task

NEW_FAMILIES = ["qwen2.5-vl-tiny", "qwen3-vl-tiny"]


def test_each_model_type_picks_its_family_and_others_are_refused_with_the_list():
    assert family_of({"model_type": "qwen2_vl"}).name == "Qwen2-VL"
    assert family_of({"model_type": "qwen2_5_vl"}).name == "Qwen2.5-VL"
    assert family_of({"model_type": "qwen3_vl"}).name == "Qwen3-VL"
    with pytest.raises(UserError) as caught:
        family_of({"model_type": "qwen3_vl_moe"})
    for model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        assert f"({model_type})" in str(caught.value)
    names = preset_names()
    assert len(names) == len(set(names)) and {"tiny", *NEW_FAMILIES, "qwen3-vl-8b"} <= set(names)


def test_image_token_side_is_the_familys():
    assert [f.factor for f in families()] == [28, 28, 32]  # 14 x 2, 14 x 2, 16 x 2
    for factor in (28, 32):
        w, h = resize_image(Image.new("RGB", (1000, 500)), min_pixels=3136, max_pixels=401408, factor=factor).size
        assert w % factor == 0 and h % factor == 0 and w * h <= 401408 and abs(w / h - 2) < 0.1


# The released config.json values of each real-shape preset. The hub files are not reachable from here; each value
# was read from public copies of them (named below) and agrees across every copy found. Where a released
# config.json leaves a field out, transformers' default for it is what the released model uses (noted).
_QWEN2_TEXT = {"text.max_position_embeddings": 32768, "text.rms_norm_eps": 1e-6, "rope.rope_theta": 1e6,
               "rope.mrope_section": [16, 24, 24]}
_QWEN2_VISION = {"vision.depth": 32, "vision.embed_dim": 1280, "vision.num_heads": 16, "vision.mlp_ratio": 4,
                 "vision.patch_size": 14, "vision.spatial_merge_size": 2, "vision.temporal_patch_size": 2}
_QWEN2_5_VISION = {"vision.depth": 32, "vision.hidden_size": 1280, "vision.intermediate_size": 3420,
                   "vision.num_heads": 16, "vision.patch_size": 14, "vision.spatial_merge_size": 2,
                   "vision.temporal_patch_size": 2, "vision.window_size": 112,
                   "vision.fullatt_block_indexes": [7, 15, 23, 31], "vision.tokens_per_second": 2}
_QWEN3_TEXT = {"text.head_dim": 128, "text.max_position_embeddings": 262144, "text.rms_norm_eps": 1e-6,
               "rope.rope_theta": 5e6, "rope.mrope_section": [24, 20, 20], "rope.mrope_interleaved": True,
               "vocab": 151936}
_QWEN3_VISION = {"vision.patch_size": 16, "vision.spatial_merge_size": 2, "vision.temporal_patch_size": 2,
                 "vision.num_heads": 16, "vision.num_position_embeddings": 2304}


def _shape(hidden, layers, heads, kv_heads, intermediate, tied, **more) -> dict:
    return {"text.hidden_size": hidden, "text.num_hidden_layers": layers, "text.num_attention_heads": heads,
            "text.num_key_value_heads": kv_heads, "text.intermediate_size": intermediate, "tie_word_embeddings": tied,
            **{k if "." in k or k == "vocab" else f"vision.{k}": v for k, v in more.items()}}


RELEASED = {
    # Qwen/Qwen2-VL-2B-Instruct: copies at huggingface.co/onnx-community/Qwen2-VL-2B-Instruct and
    # lightonai/MonoQwen2-VL-v0.1 (both "_name_or_path": "Qwen/Qwen2-VL-2B-Instruct"), and Qwen's own
    # Qwen/Qwen2-VL-2B-Instruct-AWQ (same fields). Its vision_config holds only hidden_size 1536 (the merger's
    # output), in_chans and spatial_patch_size 14: the rest are transformers' Qwen2VLVisionConfig defaults.
    "qwen2-vl-2b": {**_QWEN2_TEXT, **_QWEN2_VISION, "vocab": 151936,
                    **_shape(1536, 28, 12, 2, 8960, True, hidden_size=1536)},
    # Qwen/Qwen2-VL-7B-Instruct: Qwen's Qwen/Qwen2-VL-7B-Instruct-GPTQ-Int8 and a copy of a Qwen/Qwen2-VL-7B-Instruct
    # snapshot (huggingface.co/pbarker/Qwen2-VL-7B-sk-googleflights-full-750-47ep); vision_config as the 2B's, its
    # hidden_size left to the default 3584.
    "qwen2-vl-7b": {**_QWEN2_TEXT, **_QWEN2_VISION, "vocab": 152064,
                    **_shape(3584, 28, 28, 4, 18944, False, hidden_size=3584)},
    # Qwen/Qwen2.5-VL-3B-Instruct: copies at huggingface.co/dahwinsingularity/vllm2 ("_name_or_path":
    # "Qwen/Qwen2.5-VL-3B-Instruct") and zyoNoob/Qwen2.5-VL-3B-Instruct-AWQ (a Qwen/Qwen2.5-VL-3B-Instruct
    # snapshot): text fields, tie, vision hidden_size 1280, out_hidden_size 2048, tokens_per_second 2. Depth,
    # intermediate size, window and full-attention blocks are not in that file: Qwen2_5_VLVisionConfig's defaults
    # (also what public code copies of the 3B's vision config spell out).
    "qwen2.5-vl-3b": {**_QWEN2_5_VISION, "text.max_position_embeddings": 128000, "text.rms_norm_eps": 1e-6,
                      "rope.rope_theta": 1e6, "rope.mrope_section": [16, 24, 24], "vocab": 151936,
                      **_shape(2048, 36, 16, 2, 11008, True, out_hidden_size=2048)},
    # Qwen/Qwen2.5-VL-7B-Instruct: Qwen's Qwen/Qwen2.5-VL-7B-Instruct-AWQ ("_name_or_path":
    # "Qwen/Qwen2.5-VL-7B-Instruct") for the text fields; the vision_config block of the original release (depth 32
    # ... fullatt_block_indexes [7, 15, 23, 31], tokens_per_second 2), quoted whole in several public code files.
    "qwen2.5-vl-7b": {**_QWEN2_5_VISION, "text.max_position_embeddings": 128000, "text.rms_norm_eps": 1e-6,
                      "rope.rope_theta": 1e6, "rope.mrope_section": [16, 24, 24], "vocab": 152064,
                      **_shape(3584, 28, 28, 4, 18944, False, out_hidden_size=3584)},
    # Qwen/Qwen3-VL-2B-Instruct: no copy of the hub file itself was found; two public code files that state the
    # 2B's config agree on every field here (text 2048 x 28 layers, 6144 MLP, tied; vision 24 x 1024, deepstack
    # 5/11/17) but mrope_interleaved, which is the family's (in the 4B and 8B files). The weakest-sourced preset.
    "qwen3-vl-2b": {**_QWEN3_TEXT, **_QWEN3_VISION, **_shape(2048, 28, 16, 8, 6144, True, depth=24, hidden_size=1024,
                                                             intermediate_size=4096, out_hidden_size=2048,
                                                             deepstack_visual_indexes=[5, 11, 17])},
    # Qwen/Qwen3-VL-4B-Instruct: a full copy ("transformers_version": "4.57.0.dev0") embedded in a public model
    # wrapper, and huggingface.co/chamber111/PVM-4B (a 4B derivative, same text fields).
    "qwen3-vl-4b": {**_QWEN3_TEXT, **_QWEN3_VISION, **_shape(2560, 36, 32, 8, 9728, True, depth=24, hidden_size=1024,
                                                             intermediate_size=4096, out_hidden_size=2560,
                                                             deepstack_visual_indexes=[5, 11, 17])},
    # Qwen/Qwen3-VL-8B-Instruct: fine-tunes that keep its config.json (huggingface.co/Steinate/Cortex,
    # Chhagan005/CSM-DocExtract-8N, Balfiky/mobthing2); the vision tower is also transformers' Qwen3VLVisionConfig
    # default (its text defaults are not the 8B's: 32 layers, 22016 MLP).
    "qwen3-vl-8b": {**_QWEN3_TEXT, **_QWEN3_VISION, **_shape(4096, 36, 32, 8, 12288, False, depth=27, hidden_size=1152,
                                                             intermediate_size=4304, out_hidden_size=4096,
                                                             deepstack_visual_indexes=[8, 16, 24])},
}


def _config_value(cfg, key: str):
    """`text.X`, `vision.X`, `rope.X` (text_config.rope_parameters), `vocab` or a top-level field of a config."""
    if key == "vocab":
        return cfg.text_config.vocab_size
    section, _, name = key.rpartition(".")
    if section == "rope":
        return cfg.text_config.rope_parameters.get(name)
    value = getattr({"": cfg, "text": cfg.text_config, "vision": cfg.vision_config}[section], name)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_real_shapes_have_the_released_config_values(preset):
    from qlora_rft import tiny

    cfg = tiny.build_config(preset, tiny.build_tokenizer())
    assert {key: _config_value(cfg, key) for key in RELEASED[preset]} == RELEASED[preset]


@pytest.mark.parametrize("preset", ["tiny", *NEW_FAMILIES])
def test_lora_targets_are_the_language_linears_and_with_train_vision_every_vision_linear(preset):
    from qlora_rft import tiny

    model, _ = tiny.build_model(preset)
    family = family_of(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    language = {n for n in linears if ".language_model." in n}
    vision = {n for n in linears if ".visual." in n}
    assert any(".merger." in n for n in vision)
    for train_vision, expected in ((False, language), (True, language | vision)):
        pattern = family.lora_regex(LoraSettings().target_modules, train_vision)
        assert {n for n in linears if re.fullmatch(pattern, n)} == expected  # peft matches a string in full


def _policy_and_prompt(preset, mode="qlora"):
    from conftest import policy_with_adapters, training_examples

    cfg, policy = policy_with_adapters([*TINY_RUN, f"model.name_or_path=tiny:{preset}", f"model.mode={mode}"])
    example = training_examples(cfg, policy)[0]
    return policy, encode_prompt(policy.processor, get_task("classification"), example, cfg.data, policy.device)


@pytest.mark.parametrize("preset", NEW_FAMILIES)
def test_shared_vision_and_prefill_give_the_logprobs_of_plain_passes(preset):
    """The vision encoding reused (Qwen3-VL: with its deepstack levels) and the prompt computed once give the
    log-probs of passes that run everything."""
    from qlora_rft.rollout import completion_logprobs, share_vision

    policy, prompt = _policy_and_prompt(preset)
    ids = torch.randint(7, 300, (3, 5), generator=torch.Generator().manual_seed(0))  # above the special ids
    mask = torch.ones(3, 5)
    with torch.no_grad():
        plain = completion_logprobs(policy.model, prompt, ids, mask, 1024)
        shared = share_vision(policy.model, copy.copy(prompt))
        assert len(shared.vision[0]) == (3 if policy.family.name == "Qwen3-VL" else 1)  # merged + 2 deepstack
        reused = completion_logprobs(policy.model, shared, ids, mask, 1024)
        prefilled = completion_logprobs(policy.model, shared, ids, mask, 1024, share_prompt=True)
    assert torch.allclose(reused, plain, atol=1e-5)
    assert torch.allclose(prefilled, plain, atol=1e-4)


@pytest.mark.parametrize("preset", NEW_FAMILIES)
def test_train_qlora_lora_and_sft_eval_score_and_merge(preset, tmp_path):
    """Every command on the family's tiny preset; the merged folder loads with the Auto class alone."""
    from transformers import AutoModelForImageTextToText

    from qlora_rft.cli import main
    from qlora_rft.evaluation import runner
    from qlora_rft.export import merge_adapter
    from qlora_rft.sft import train_sft
    from qlora_rft.trainer import train

    model = [*TINY_RUN, f"model.name_or_path=tiny:{preset}"]
    qlora = train(load_config(None, [*model, f"train.output_dir={tmp_path / 'qlora'}"]))
    steps = [json.loads(line)["step"] for line in (qlora.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (qlora.adapter_dir / "adapter_model.safetensors").is_file()
    lora = train(load_config(None, [*model, "model.mode=lora", "train.max_steps=1",
                                    f"train.output_dir={tmp_path / 'lora'}"]))
    assert (lora.adapter_dir / "adapter_model.safetensors").is_file()
    sft = train_sft(load_config(None, [*model, "train.method=sft", "train.max_steps=1", "data.task=grounding",
                                       "data.train=synthetic:shapes-grounding", "data.max_prompt_length=512",
                                       f"train.output_dir={tmp_path / 'sft'}"]))
    assert (sft.adapter_dir / "adapter_model.safetensors").is_file()

    run = runner.run_eval(load_config(None, [*model, "eval.limit=2", "eval.max_new_tokens=8",
                                             f"eval.adapter={qlora.adapter_dir}", f"eval.output_dir={tmp_path / 'eval'}"]))
    assert "accuracy" in run.metrics
    assert main(["score", "classification", "--predictions", str(run.predictions), "--out",
                 str(tmp_path / "scored.json")]) == 0
    assert json.loads((tmp_path / "scored.json").read_text())["accuracy"] == run.metrics["accuracy"]

    report = merge_adapter(f"tiny:{preset}", qlora.adapter_dir, tmp_path / "merged", dtype="fp32", device="cpu")
    assert report.ok and report.lora_modules == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged"))
    assert family_of(merged).name == family_of(tmp_path / "merged").name != "Qwen2-VL"


def test_a_folder_saved_by_transformers_in_the_hub_layout_loads_and_trains(tmp_path):
    """Sharded weights with an index, preprocessor_config.json, tokenizer files and chat_template.json, written by
    transformers' own classes (as on the hub), not by our builder's write_model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qlora_rft import tiny
    from qlora_rft.trainer import train

    tokenizer = tiny.build_tokenizer()
    folder = tmp_path / "Qwen2.5-VL-hub-layout"
    Qwen2_5_VLForConditionalGeneration(tiny.build_config("qwen2.5-vl-tiny", tokenizer)).save_pretrained(
        folder, max_shard_size="300KB")
    processor = tiny.build_processor("qwen2.5-vl-tiny", tokenizer)
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": tiny.CHAT_TEMPLATE}))
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert (folder / "preprocessor_config.json").is_file() and not (folder / "processor_config.json").exists()

    result = train(load_config(None, [*TINY_RUN, f"model.name_or_path={folder}", "train.max_steps=1",
                                      f"train.output_dir={tmp_path / 'run'}"]))
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- box conventions
# Qwen2.5-VL answers in pixels of its resized input; here a 560x280 input. The truth (100, 250, 500, 1000) on the
# datasets' 0-1000 scale is x 560/1000 and y 280/1000 in that frame: (56, 70, 280, 280).

def test_the_same_box_scores_the_same_in_either_convention():
    from qlora_rft import rewards
    from qlora_rft.tasks import detection, grounding
    from qlora_rft.tasks.boxes import RELATIVE, Box, Frame

    frame = Frame(560, 280)
    truth = "<answer>(100,250),(500,1000)</answer>"
    pixels = "<think>.</think><answer>(56,70),(280,280)</answer>"
    relative = "<think>.</think><answer>(100,250),(500,1000)</answer>"
    assert grounding.parse(pixels, frame) == Box(100, 250, 500, 1000)
    assert grounding.score(pixels, truth, frame) == grounding.score(relative, truth, RELATIVE) == 1.0
    assert grounding.score(pixels, truth) < 0.3  # read on the wrong scale it is another box
    assert grounding.parse("<answer>(56,70),(600,280)</answer>", frame) is None  # x beyond the 560-pixel width
    assert rewards.grounding_reward([pixels, relative], [truth] * 2, frame=[frame, RELATIVE]) == [2.0, 2.0]

    solution = "<answer>[{'Position': [100, 250, 500, 1000], 'Confidence': 1.0}]</answer>"
    answer = "<answer>[{'Position': [56, 70, 280, 280], 'Confidence': 0.9}]</answer>"
    assert detection.iou_reward(answer, solution, frame) == 1.0
    assert rewards.score([answer], solution, {"iou": 1.0, "confidence": 1.0}, frame) == {"iou": [1.0],
                                                                                          "confidence": [0.9]}
    # A box past x = 1000 is valid in a 1120-pixel-wide frame: (1000, 0, 1120, 560) -> (892.9, 0, 1000, 1000).
    wide = detection.parse("<answer>[{'Position': [1000, 0, 1120, 560], 'Confidence': 0.5}]</answer>",
                           Frame(1120, 560))
    assert [tuple(round(v, 1) for v in d.box) for d in wide] == [(892.9, 0.0, 1000.0, 1000.0)]


def test_prompts_and_warmup_targets_ask_for_the_familys_frame():
    from qlora_rft.tasks import get_task
    from qlora_rft.tasks.boxes import RELATIVE, Frame

    detection = get_task("detection")
    classification = get_task("classification")
    assert "pixels of this 560x280 image" in detection.ask("Find every cat.", Frame(560, 280))
    assert detection.ask("Find every cat.", RELATIVE) == detection.prompt("Find every cat.")
    assert classification.ask("Which flower?", Frame(560, 280)) == classification.prompt("Which flower?")
    target = detection.warmup_target("<answer>[{'Position': [100, 250, 500, 1000], 'Confidence': 1.0}]</answer>",
                                     Frame(560, 280))
    assert target.endswith("<answer>[{'Position': [56, 70, 280, 280], 'Confidence': 1.0}]</answer>")


@pytest.mark.parametrize("preset, absolute", [("tiny", False), ("qwen2.5-vl-tiny", True), ("qwen3-vl-tiny", False)])
def test_encoded_prompts_carry_the_frame_of_the_resized_image(preset, absolute):
    from qlora_rft import tiny
    from qlora_rft.data import load_split
    from qlora_rft.models import family_of
    from qlora_rft.prompts import encode_prompts
    from qlora_rft.tasks.boxes import RELATIVE, Frame

    processor = tiny.build_processor(preset, tiny.build_tokenizer())
    family = family_of(processor)
    task = get_task("grounding")
    examples = load_split("synthetic:shapes-grounding", "train", task, min_pixels=3136, max_pixels=12544,
                          factor=family.factor).examples[:1]
    batch, (frame,) = encode_prompts(processor, task, examples, 3136, 12544, 512, torch.device("cpu"))
    _, h, w = batch["image_grid_thw"][0].tolist()
    side = processor.image_processor.patch_size
    assert frame == (Frame(w * side, h * side) if absolute else RELATIVE)
    text = processor.batch_decode(batch["input_ids"])[0]
    assert ("absolute pixels" in text) == absolute


def test_scoring_maps_recorded_pixel_frames_back(tmp_path):
    from qlora_rft.evaluation.scoring import score_file

    predictions = tmp_path / "p.jsonl"
    predictions.write_text(
        '{"id": 1, "completion": "<answer>(56,70),(280,280)</answer>", "solution": "<answer>(100,250),(500,1000)'
        '</answer>", "frame": [560, 280]}\n'
        '{"id": 2, "completion": "<answer>(100,250),(500,1000)</answer>", "solution": "<answer>(100,250),'
        '(500,1000)</answer>"}\n'
    )
    metrics = score_file("grounding", predictions)
    assert metrics["mIoU"] == 100.0 and metrics["acc@0.5"] == 100.0


@pytest.mark.parametrize("preset", NEW_FAMILIES)
def test_tiny_model_command_writes_a_folder_the_auto_classes_load(preset, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qlora_rft.cli import main

    assert main(["tiny-model", "--out", str(tmp_path / "m"), "--preset", preset]) == 0
    family = family_of(tmp_path / "m")
    assert f"({family.name})" in capsys.readouterr().out
    assert type(AutoModelForImageTextToText.from_pretrained(str(tmp_path / "m"))).__name__ == family.model_class
    assert type(AutoProcessor.from_pretrained(str(tmp_path / "m"))).__name__ == family.processor_class
