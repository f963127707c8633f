"""Video rows: the frame and size rule by hand, clips checked at load (bad ones counted), prompts and token counts
on every family, log-probs of video prompts against a plain forward, and GRPO on mp4 rows that trains, evaluates and
resumes to the bit. The clips are drawn at run time with PyAV."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qlora_rft.data import load_split

from qlora_rft.errors import DataError
from qlora_rft.prompts import encode_prompt, encode_prompts, prompt_lengths
from qlora_rft.tasks import get_task
from qlora_rft.video import VideoRule, frame_size, probe, sample_indices, write_clip

PRESETS = ["tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny"]
RULE = VideoRule(fps=2.0, max_frames=32, max_pixels=401408)
TASK = get_task("classification")
PIXELS = dict(min_pixels=3136, max_pixels=3136, factor=28)


def frames(count: int, size=(64, 48), step: int = 4) -> list[np.ndarray]:
    """A red block moving right over grey, `step` pixels a frame."""
    width, height = size
    drawn = []
    for t in range(count):
        array = np.full((height, width, 3), 200, np.uint8)
        array[8:24, (step * t) % (width - 16) : (step * t) % (width - 16) + 16] = (220, 30, 30)
        drawn.append(array)
    return drawn


def clip(path: Path, count: int = 12, fps: float = 6, size=(64, 48)) -> str:
    write_clip(frames(count, size), path, fps)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ----------------------------------------------------------------------------- the rule, by hand


def test_frames_are_sampled_by_rate_and_capped():
    # 10 s at 30 fps sampled at 2 per second: 20 frames, linspace(0, 299, 20) rounded
    assert sample_indices(300, 30.0, RULE) == tuple(round(i * 299 / 19) for i in range(20))
    assert len(sample_indices(3000, 30.0, RULE)) == 32  # 200 at 2 fps, capped by max_frames
    assert len(sample_indices(3000, 30.0, VideoRule(2.0, 7, 401408))) == 6  # an even count: 7 -> 6
    assert sample_indices(5, 30.0, RULE) == (0, 1, 3, 4)  # 1/6 s: at least 4 frames
    assert sample_indices(3, 30.0, RULE) == (0, 2)  # fewer than 4 in the clip: an even count of them
    with pytest.raises(ValueError, match="at least 2 frames"):
        sample_indices(1, 30.0, RULE)


def test_frame_size_shares_the_budget_between_temporal_patches():
    # 8 frames of 640x480 share 401408 pixels: 100352 a frame; beta = sqrt(307200 / 100352) = 1.7496,
    # 480 / 1.7496 = 274.3 -> 252 (9 x 28), 640 / 1.7496 = 365.8 -> 364 (13 x 28)
    assert frame_size(640, 480, 8, RULE, 3136, 401408, 28) == (364, 252)
    # 2 frames: the share (401408) holds the whole frame, kept at its size rounded to 28 px tokens (23 x 17)
    assert frame_size(640, 480, 2, RULE, 3136, 401408, 28) == (644, 476)
    # capped by data.max_pixels 200704: beta = sqrt(1228800 / 200704) = 2.474, 960 / 2.474 / 28 = 13.9 -> 13 x 28,
    # 1280 / 2.474 / 28 = 18.5 -> 18 x 28
    assert frame_size(1280, 960, 2, RULE, 3136, 200704, 28) == (504, 364)
    # the cap is never below 1.05 x data.min_pixels = 3292, whether data.max_pixels (3136) or a small budget (3136
    # / 32 x 2 = 196) asks less: beta = sqrt(307200 / 3292) = 9.66, 480 / 9.66 / 28 = 1.8 -> 28, 640 -> 56 (the rule
    # does not come back up to the minimum after shrinking)
    assert frame_size(640, 480, 32, RULE, 3136, 3136, 28) == (56, 28)
    assert frame_size(640, 480, 32, VideoRule(2.0, 32, 3136), 3136, 401408, 28) == (56, 28)
    assert frame_size(64, 64, 4, RULE, 3136, 4096, 32) == (64, 64)  # Qwen3-VL's 32-pixel tokens: 2 x 2
    assert frame_size(64, 64, 4, RULE, 3136, 3136, 32) == (32, 32)  # 4096 over the cap 3292: 64 / 1.115 -> 32
    with pytest.raises(ValueError, match="aspect ratio"):
        frame_size(4000, 10, 4, RULE, 3136, 401408, 28)


# ----------------------------------------------------------------------------- loading


def test_probe_decodes_every_frame(tmp_path):
    found = probe({"bytes": None, "path": clip(tmp_path / "a.mp4", count=12, fps=6)})
    assert (found.frames, found.fps, found.width, found.height) == (12, 6.0, 64, 48)
    webm = tmp_path / "b.webm"
    import av

    with av.open(str(webm), "w") as container:  # VP9 in WebM: another container and codec PyAV's wheels carry
        stream = container.add_stream("libvpx-vp9", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for array in frames(5, (32, 32)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    assert probe({"bytes": webm.read_bytes(), "path": None}).frames == 5


def test_rows_with_a_video_file_or_frames_in_the_order_of_their_columns(tmp_path):
    clip(tmp_path / "a.mp4", count=12, fps=6)
    for i, array in enumerate(frames(3, (56, 56))):
        Image.fromarray(array).save(tmp_path / f"f{i}.png")
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "b.png")
    rows = [{"problem": "Which way?", "video": "a.mp4", "solution": "<answer>right</answer>"},
            {"problem": "Which way?", "image": "b.png", "video": ["f0.png", "f1.png", "f2.png"], "solution": "right"},
            {"video": "a.mp4", "problem": "Which way?", "images": ["b.png", "b.png"], "solution": "right"}]
    data = load_split(write_jsonl(tmp_path / "train.jsonl", rows), "train", TASK, **PIXELS, video=RULE)
    first, second, third = data.examples
    assert not data.skipped and first.image is None and first.images == ()
    assert first.clips[0].source["path"] == str(tmp_path / "a.mp4")  # relative to the file's folder
    assert (first.clips[0].total, first.clips[0].fps, first.clips[0].indices) == (12, 6.0, (0, 4, 7, 11))
    assert first.clips[0].size == (56, 56) and first.layout == ("video",)
    assert second.layout == ("image", "video") and second.clips[0].fps == RULE.fps
    assert second.clips[0].indices == (0, 2)  # three frames taken as shot at 2 per second: an even count
    assert third.layout == ("video", "image", "image")
    assert "video" not in first.reward_columns()


def test_a_corrupt_empty_or_cut_clip_is_a_counted_bad_row(tmp_path):
    good = clip(tmp_path / "good.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    whole = Path(good).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    write_clip(frames(1), tmp_path / "one.mp4", 6)
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    Image.new("RGB", (28, 56)).save(tmp_path / "b.png")
    os.mkfifo(tmp_path / "fifo.mp4")  # opened, it would block: never read
    names = ["good.mp4", "empty.mp4", "junk.mp4", "cut.mp4", "missing.mp4", "one.mp4", ["a.png", "b.png"],
             "fifo.mp4"]
    rows = [{"problem": "Which way?", "video": name, "solution": "right"} for name in names]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_split(path, "train", TASK, **PIXELS, video=RULE)
    assert [ex.index for ex in data.examples] == [0]
    reasons = {bad.index: bad.reason for bad in data.skipped}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert reasons[7] == f"video {tmp_path / 'fifo.mp4'} is not a regular file"
    assert all(reasons[i].startswith("video does not decode") for i in (1, 2, 3)), reasons
    assert reasons[4] == f"video {tmp_path / 'missing.mp4'} does not exist"
    assert "at least 2 frames" in reasons[5] and "differ in size (28x56, 56x56)" in reasons[6]
    with pytest.raises(DataError, match=r"row 1: video does not decode .*set data.on_bad_row=skip"):
        load_split(path, "train", TASK, **PIXELS, video=RULE, on_bad_row="error")


def test_parquet_rows_hold_a_path_or_the_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "clips").mkdir()
    clip(tmp_path / "clips" / "a.mp4")
    table = pa.table({"video": ["clips/a.mp4", str(tmp_path / "clips" / "a.mp4")],
                      "problem": ["Which way?"] * 2, "solution": ["right"] * 2})
    pq.write_table(table, tmp_path / "train.parquet")
    data = load_split(str(tmp_path / "train.parquet"), "train", TASK, **PIXELS, video=RULE)
    assert [ex.clips[0].source["path"] for ex in data.examples] == [str(tmp_path / "clips" / "a.mp4")] * 2
    embedded = pa.table({"video": [(tmp_path / "clips" / "a.mp4").read_bytes(), b"junk"],
                         "problem": ["Which way?"] * 2, "solution": ["right"] * 2})
    pq.write_table(embedded, tmp_path / "bytes.parquet")
    data = load_split(str(tmp_path / "bytes.parquet"), "train", TASK, **PIXELS, video=RULE)
    assert data.examples[0].clips[0].total == 12 and [b.index for b in data.skipped] == [1]


def test_a_box_task_takes_no_video(tmp_path):
    clip(tmp_path / "a.mp4")
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    rows = [{"problem": "Box it.", "image": "a.png", "video": "a.mp4", "solution": "<answer>(0,0),(10,10)</answer>"}]
    with pytest.raises(DataError, match="row 0 holds 1 video.*data.task=grounding takes one image per prompt"):
        load_split(write_jsonl(tmp_path / "t.jsonl", rows), "train", get_task("grounding"), **PIXELS, video=RULE)
    del rows[0]["image"]
    with pytest.raises(DataError, match="has no column 'image'; it has problem, solution, video"):
        load_split(write_jsonl(tmp_path / "t.jsonl", rows), "train", get_task("grounding"), **PIXELS, video=RULE)


# ----------------------------------------------------------------------------- prompts on every family


@pytest.mark.parametrize("preset", PRESETS)
def test_video_prompts_are_encoded_and_counted(tmp_path, preset):
    from transformers import AutoProcessor

    from qlora_rft.model import model_family, resolve_model_path

    clip(tmp_path / "a.mp4", count=12, fps=6)
    clip(tmp_path / "b.mp4", count=30, fps=10, size=(96, 64))
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "c.png")
    rows = [{"problem": "Which way?", "video": "a.mp4", "solution": "right"},
            {"problem": "Which way?", "images": ["c.png"], "videos": ["a.mp4", "b.mp4"], "solution": "right"}]
    family = model_family(f"tiny:{preset}")
    pixels = dict(min_pixels=3136, max_pixels=12544)
    examples = load_split(write_jsonl(tmp_path / "t.jsonl", rows), "train", TASK, factor=family.factor,
                          video=RULE, **pixels).examples
    processor = AutoProcessor.from_pretrained(str(resolve_model_path(f"tiny:{preset}")))
    for example, length in zip(examples, prompt_lengths(processor, TASK, examples, **pixels)):
        batch, _ = encode_prompts(processor, TASK, [example], **pixels, max_prompt_length=10_000, device="cpu")
        assert batch["input_ids"].shape[1] == length
        assert batch["video_grid_thw"].shape[0] == len(example.clips)
        for clip_, grid in zip(example.clips, batch["video_grid_thw"].tolist()):  # [T, H, W] in patches
            width, height = clip_.size
            assert grid == [len(clip_.indices) // 2, height // family.patch_size, width // family.patch_size]
        video_tokens = int((batch["mm_token_type_ids"] == 2).sum())
        assert video_tokens == sum(t * h * w // 4 for t, h, w in batch["video_grid_thw"].tolist())
        assert set(family.time_inputs) <= set(batch)
    text = processor.tokenizer.decode(batch["input_ids"][0])
    if family.name == "Qwen3-VL":  # the timestamps of a's two temporal patches (frames 0, 4 and 7, 11 at 6 fps)
        assert "<0.3 seconds>" in text and "<1.5 seconds>" in text
    if family.time_inputs:  # Qwen2.5-VL: seconds per temporal patch, 2 frames / the sampled rate (4 of 12 at 6 fps)
        assert batch["second_per_grid_ts"].tolist() == pytest.approx([1.0, 1.0])


def test_image_prompts_are_unchanged_by_the_video_template():
    """The template's video branch leaves image prompts as they were: the same text, so the same tokens."""
    from qlora_rft.prompts import messages
    from qlora_rft.tiny import CHAT_TEMPLATE, build_tokenizer

    video_branch = ("{% elif item['type'] == 'video' or 'video' in item %}"
                    "<|vision_start|><|video_pad|><|vision_end|>")
    assert video_branch in CHAT_TEMPLATE
    tokenizer = build_tokenizer()
    for layout in [("image",), ("image", "image")]:
        conversation = messages(TASK, "What is it?", layout=layout)
        now = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        before = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                               chat_template=CHAT_TEMPLATE.replace(video_branch, ""))
        assert now == before and now.count("<|image_pad|>") == len(layout)


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("preset", PRESETS)
def test_video_log_probs_equal_a_plain_forward(tmp_path, preset):
    """A long clip at 2 frames a second puts M-RoPE's time axis far beyond the text after it (32 temporal patches,
    Qwen2.5-VL's 2 positions a second): the sampler's log-probs, the cached scoring pass and the policy's plain
    forward of prompt + completion must still agree, whether the vision tower runs per pass or once."""
    from conftest import policy_with_adapters, sample

    from qlora_rft.rollout import completion_logprobs
    from qlora_rft.sampling import Settings, StaticBackend

    clip(tmp_path / "long.mp4", count=64, fps=2, size=(56, 56))
    rows = [{"problem": "Which way?", "video": "long.mp4", "solution": "right"}]
    cfg, policy = policy_with_adapters([f"model.name_or_path=tiny:{preset}", "data.max_pixels=3136",
                                        "data.video_max_frames=64", "data.video_max_pixels=200704",
                                        "data.max_prompt_length=4096", "lora.dropout=0.0"], seed=0)
    example = load_split(write_jsonl(tmp_path / "t.jsonl", rows), "train", TASK, min_pixels=3136, max_pixels=3136,
                         factor=policy.family.factor, video=VideoRule.of(cfg.data)).examples[0]
    prompt = encode_prompt(policy.processor, TASK, example, cfg.data, policy.device)
    assert prompt.video_grid_thw.tolist()[0][0] == 32
    rule = Settings(max_new_tokens=6, min_new_tokens=6, temperature=1.0)
    for backend in (None, StaticBackend()):  # generate, then the static decoder
        torch.manual_seed(0)
        (rollout,) = sample(policy, [prompt], 4, 4, rule, backend=backend)
        policy.model.eval()
        with torch.no_grad():
            plain = completion_logprobs(policy.model, prompt, rollout.completion_ids, rollout.mask, 64)
            cached = completion_logprobs(policy.model, prompt, rollout.completion_ids, rollout.mask, 64,
                                         share_prompt=True)
        torch.testing.assert_close(rollout.sampler_logp, plain * rollout.mask, atol=1e-5, rtol=0)
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)
    shared = encode_prompt(policy.processor, TASK, example, cfg.data, policy.device)
    from qlora_rft.rollout import share_vision

    share_vision(policy.model, shared)
    assert len(shared.video_vision) == 1 and len(shared.video_vision[0]) == (3 if preset == "qwen3-vl-tiny" else 1)
    with torch.no_grad():
        once = completion_logprobs(policy.model, shared, rollout.completion_ids, rollout.mask, 64)
    torch.testing.assert_close(once, plain, atol=1e-6, rtol=0)


class Recorder:
    """A logits processor that keeps every step's scores (what a backend decides the next token from)."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_decoding_of_a_long_clip_sees_the_plain_forwards_logits(tmp_path, preset):
    """Each backend's next-token logits, step by step, are those of a plain forward of the prompt and the tokens so
    far: the M-RoPE positions after the clip are the forward's, in generate's own loop and continuing from a shared
    prefill (a row decoded twice) alike."""
    from conftest import policy_with_adapters

    from qlora_rft.model import base_model
    from qlora_rft.sampling import GenerateBackend, Settings, StaticBackend, left_pad
    from qlora_rft.sampling.backend import evaluating

    clip(tmp_path / "long.mp4", count=64, fps=2, size=(56, 56))
    rows = [{"problem": "Which way?", "video": "long.mp4", "solution": "right"}]
    cfg, policy = policy_with_adapters([f"model.name_or_path=tiny:{preset}", "model.mode=lora",
                                        "data.max_pixels=3136", "data.video_max_frames=64",
                                        "data.video_max_pixels=200704", "data.max_prompt_length=4096"], seed=0)
    example = load_split(write_jsonl(tmp_path / "t.jsonl", rows), "train", TASK, min_pixels=3136, max_pixels=3136,
                         factor=policy.family.factor, video=VideoRule.of(cfg.data)).examples[0]
    prompt = encode_prompt(policy.processor, TASK, example, cfg.data, policy.device)
    settings = Settings(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    base = base_model(policy.model)
    for backend in (GenerateBackend(), StaticBackend()):
        for repeat in (1, 2):
            recorder = Recorder()
            with evaluating(policy.model) as model, torch.no_grad():
                ids = backend.decode(model, left_pad([prompt], policy.tokens.pad, 1), repeat, settings,
                                     policy.tokens, recorder, None).ids  # [repeat, 5]
                inputs = prompt.repeated(repeat)
                inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], dim=1)
                inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(ids)], dim=1)
                inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
                hidden = base.model(**inputs, use_cache=False).last_hidden_state[:, prompt.length - 1 : -1]
                plain = base.lm_head(hidden).float()  # [repeat, 5, V]
            decided = torch.stack(recorder.steps, dim=1)  # [repeat, 5, V]: -inf where a token is never sampled
            assert decided.shape == plain.shape
            kept = decided.isfinite()
            torch.testing.assert_close(decided[kept], plain[kept], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- training, evaluation, resume


def motion_rows(folder: Path) -> str:
    """Four rows of mp4 clips (a block moving right or down), the classification task's schema."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (direction, step) in enumerate([("right", 4), ("down", 4), ("right", 6), ("down", 6)]):
        drawn = frames(8, (56, 56), step)
        if direction == "down":
            drawn = [np.ascontiguousarray(f.transpose(1, 0, 2)) for f in drawn]
        write_clip(drawn, folder / f"{i}.mp4", 4)
        rows.append({"video": f"{i}.mp4", "problem": "In which direction does the block move?",
                     "solution": f"<answer>{direction}</answer>"})
    return write_jsonl(folder / "train.jsonl", rows)


def video_run(preset: str, data: str, out: Path) -> list[str]:
    return [f"model.name_or_path=tiny:{preset}", "model.mode=qlora", "model.gradient_checkpointing=false",
            f"data.train={data}", "data.max_pixels=3136", "data.max_prompt_length=256", "grpo.num_generations=4",
            "grpo.max_completion_length=8", "train.max_steps=2", "train.save_steps=1", "train.prompts_per_step=2",
            "train.learning_rate=0.01", "train.warmup_ratio=0.0", "lora.dropout=0.0", f"train.output_dir={out}"]


@pytest.mark.parametrize("preset", PRESETS)
def test_mp4_rows_train_resume_to_the_bit_and_evaluate(tmp_path, preset):
    """QLoRA GRPO on a JSON-lines file of mp4 paths: two steps; a run stopped after its first checkpoint and resumed
    ends with the same adapter, to the bit; the adapter is evaluated and re-scored from its predictions."""
    import shutil
    import sys
    from dataclasses import replace

    from safetensors.torch import load_file

    from qlora_rft.config import load_config
    from qlora_rft.evaluation.runner import run_eval
    from qlora_rft.evaluation.scoring import score_file

    sys.path.insert(0, str(Path(__file__).parent))
    import resume_job  # rewards that depend on the sampled text: the result depends on every RNG

    data = motion_rows(tmp_path / "data")
    whole = resume_job.run(video_run(preset, data, tmp_path / "whole"))
    assert whole.steps == 2
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-1", stopped / "checkpoint-1")
    resume_job.run(video_run(preset, data, stopped), resume=True)
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(t.abs().sum() > 0 for n, t in a.items() if "lora_B" in n)

    cfg = load_config(None, [*video_run(preset, data, tmp_path / "whole"), f"data.eval={data}",
                             "data.eval_split=train", f"eval.output_dir={tmp_path / 'eval'}", "eval.max_new_tokens=8"])
    evaluated = run_eval(replace(cfg, eval=replace(cfg.eval, adapter=str(tmp_path / "whole" / "adapter"))))
    predictions = [json.loads(line) for line in evaluated.predictions.read_text().splitlines()]
    assert sorted(p["id"] for p in predictions) == [0, 1, 2, 3] and evaluated.metrics["num_predictions"] == 4
    assert score_file("classification", evaluated.predictions) == evaluated.metrics
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert (info["video_fps"], info["video_max_frames"]) == (2.0, 32)  # a resumed evaluation must keep them


def test_generic_task_takes_video_rows_with_a_plugin_reward(tmp_path):
    from qlora_rft.config import load_config
    from qlora_rft.trainer import train

    data = tmp_path / "data"
    motion_rows(data)
    rows = [{"problem": "Which way does the block move? One word.", "video": f"{i}.mp4", "way": way}
            for i, way in enumerate(["right", "down", "right", "down"])]
    (tmp_path / "ways.py").write_text("def names_way(completions, way, **columns):\n"
                                      "    return [float(w in c) for c, w in zip(completions, way)]\n")
    cfg = load_config(None, [*video_run("tiny", write_jsonl(data / "generic.jsonl", rows), tmp_path / "run"),
                             "data.task=generic", f"rewards.plugins={tmp_path / 'ways.py'}",
                             "rewards.weights={names_way: 1}", "train.max_steps=1"])
    result = train(cfg)
    line = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["step"] == 1 and 0.0 <= line["rewards/names_way"] <= 1.0


def test_a_run_whose_clips_all_fail_to_decode_stops_in_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "a.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)  # an mp4 header, nothing more
    data = write_jsonl(tmp_path / "train.jsonl", [{"video": "a.mp4", "problem": "Which way?", "solution": "left"}])
    done = subprocess.run([sys.executable, "-m", "qlora_rft", "train", "configs/synthetic_video.yaml",
                           f"data.train={data}", f"train.output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "has no usable rows: all 1 are bad (row 0: video does not decode" in lines[0]


def test_the_synthetic_colour_change_clips_answer_by_order_alone():
    """shapes-colour-change: balanced final colours, and in every clip the square shows its first colour in the first
    frame of each temporal patch and the answer in the second, so both colours are on screen for as long."""
    from collections import Counter

    from qlora_rft.data import open_clip
    from qlora_rft.tasks.synthetic import CHANGE_COLOURS, COLOURS

    data = load_split("synthetic:shapes-colour-change", "test", TASK, min_pixels=3136, max_pixels=7056, factor=28,
                      video=RULE)
    assert len(data) == 100 and not data.skipped
    assert Counter(ex.solution for ex in data.examples) == {f"<answer>{c}</answer>": 25 for c in CHANGE_COLOURS}
    for example in data.examples[:8]:
        clip_ = example.clips[0]
        assert (clip_.total, clip_.fps, clip_.indices, clip_.size) == (4, 2.0, (0, 1, 2, 3), (84, 84))
        frames = open_clip(clip_).float()  # [4, 3, 84, 84]
        grey = frames[:, :, 0, 0][:, :, None, None]  # a corner is background
        square = (frames - grey).abs().sum(1) > 60  # [4, 84, 84]
        colours = [frames[t][:, square[t]].mean(-1) for t in range(4)]  # the square's mean colour per frame

        def nearest(rgb):
            return min(CHANGE_COLOURS, key=lambda c: float((rgb - torch.tensor(COLOURS[c]).float()).abs().sum()))

        end = example.solution[len("<answer>"):-len("</answer>")]
        assert [nearest(c) for c in colours][1::2] == [end, end]
        assert nearest(colours[0]) == nearest(colours[2]) != end


def test_the_supervised_step_takes_video_rows(tmp_path):
    """SFT and the warm-up: prompt (clip tokens included) masked, the target's tokens scored, a finite loss."""
    from conftest import policy_with_adapters

    from qlora_rft.supervised import sft_loss, supervised_batch

    data = motion_rows(tmp_path / "data")
    cfg, policy = policy_with_adapters(["model.name_or_path=tiny:tiny", "data.max_pixels=3136"], seed=0)
    examples = load_split(data, "train", TASK, min_pixels=3136, max_pixels=3136, factor=28, video=RULE).examples[:2]
    batch = supervised_batch(policy.processor, TASK, examples, cfg.data, policy.device)
    video = batch["mm_token_type_ids"] == 2
    assert int(video.sum()) == 2 * 2 * 4  # two clips of 2 temporal patches of 2 x 2 tokens
    assert (batch["labels"][video] == -100).all()  # the prompt, clips included, is never a target
    targets = [TASK.warmup_target(ex.solution) for ex in examples]
    scored = (batch["labels"] != -100).sum(-1).tolist()
    assert scored == [len(policy.processor.tokenizer(t + "<|im_end|>")["input_ids"]) for t in targets]
    loss, count = sft_loss(policy.model, batch, 64)
    assert count == sum(scored) and torch.isfinite(loss)


def test_the_video_bench_measures_one_prompt():
    from qlora_rft import bench_video

    row = bench_video.one("tiny", 4, steps=1, generations=2, length=4)
    # 4 frames at 84 x 84: 2 temporal patches of 6 x 6 patches, 3 x 3 tokens each
    assert row["frame_size"] == [84, 84] and row["video_grid_thw"] == [2, 6, 6] and row["video_tokens"] == 18
    assert row["steps"] == 1 and row["step_seconds"] > 0 and row["peak_rss_bytes"] > 0
