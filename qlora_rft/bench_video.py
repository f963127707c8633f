"""One video prompt per family on the tiny presets: our QLoRA GRPO step on a clip of N frames, each setting in its
own process (time per step and peak memory are its own). `python -m qlora_rft.bench_video --out FILE`.

The clip is a square changing colour halfway (the shapes-colour-change task's), 84 x 84 pixels at 2 frames a second,
N frames all sampled; completions have a fixed length, so every step decodes as many tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PRESETS = ("tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny")
FRAMES = (4, 16, 64)


def write_row(folder: Path, frames: int) -> Path:
    """A JSON-lines file of one row: a clip of `frames` frames at 2 fps (84 x 84) and its question."""
    import random

    import numpy as np

    from qlora_rft.tasks.synthetic import CHANGE_PROBLEM, _canvas, _paint
    from qlora_rft.video import write_clip

    rng = random.Random(0)
    background, drawn = _canvas(rng, 84), []
    for t in range(frames):
        image = background.copy()
        _paint(image, random.Random(0), "red" if t < frames // 2 else "blue", "square", (20, 20, 55, 55))
        drawn.append(np.asarray(image))
    folder.mkdir(parents=True, exist_ok=True)
    write_clip(drawn, folder / "clip.mp4", 2)
    row = {"video": "clip.mp4", "problem": CHANGE_PROBLEM, "solution": "<answer>blue</answer>"}
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    return folder / "train.jsonl"


def overrides(preset: str, data: Path, frames: int, out: Path, steps: int, generations: int, length: int) -> list:
    return [f"model.name_or_path=tiny:{preset}", "model.mode=qlora", "model.gradient_checkpointing=false",
            "lora.dropout=0.0", f"data.train={data}", "data.max_pixels=7056", f"data.video_max_frames={frames}",
            "data.max_prompt_length=4096", f"grpo.num_generations={generations}",
            f"grpo.max_completion_length={length}", f"grpo.min_completion_length={length}", "grpo.beta=0.04",
            f"train.max_steps={steps}", "train.save_steps=0", "train.learning_rate=1e-5", "train.warmup_ratio=0.0",
            f"train.output_dir={out}"]


def one(preset: str, frames: int, steps: int, generations: int, length: int) -> dict:
    """In this process: the step times of one setting, the clip's tokens and the peak resident memory."""
    import resource

    from qlora_rft.config import load_config
    from qlora_rft.data import load_split
    from qlora_rft.model import model_family
    from qlora_rft.prompts import encode_prompt
    from qlora_rft.tasks import get_task
    from qlora_rft.trainer import train
    from qlora_rft.video import VideoRule

    with tempfile.TemporaryDirectory(prefix="qlora-rft-video-bench-") as tmp:
        data = write_row(Path(tmp) / "data", frames)
        cfg = load_config(None, overrides(preset, data, frames, Path(tmp) / "run", steps, generations, length))
        result = train(cfg, log=False)
        example = load_split(str(data), "train", get_task("classification"), min_pixels=cfg.data.min_pixels,
                             max_pixels=cfg.data.max_pixels, factor=model_family(cfg.model.name_or_path).factor,
                             video=VideoRule.of(cfg.data)).examples[0]
        from transformers import AutoProcessor

        from qlora_rft.model import resolve_model_path

        processor = AutoProcessor.from_pretrained(str(resolve_model_path(cfg.model.name_or_path)))
        prompt = encode_prompt(processor, get_task("classification"), example, cfg.data, "cpu")
    later = result.metrics[1:] or result.metrics  # the first step builds the decoder's caches
    return {"preset": preset, "frames": frames, "frame_size": list(example.clips[0].size),
            "video_grid_thw": prompt.video_grid_thw.tolist()[0],
            "video_tokens": int((prompt.mm_token_type_ids == 2).sum()),
            "prompt_tokens": prompt.length, "step_seconds": statistics.median(m["step_seconds"] for m in later),
            "steps": len(result.metrics), "num_generations": generations, "completion_tokens": length,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(out: Path, presets=PRESETS, frames=FRAMES, steps: int = 3, generations: int = 8, length: int = 32) -> list:
    """Every (preset, frame count) in its own process; the rows, also written to `out` as JSON."""
    rows = []
    for preset in presets:
        for count in frames:
            cmd = [sys.executable, "-m", "qlora_rft.bench_video", "--one", preset, str(count), str(steps),
                   str(generations), str(length)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"video bench {preset} x {count} frames failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_rft.bench_video", description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/video-cpu.json")
    parser.add_argument("--frames", default=",".join(map(str, FRAMES)), help="clip lengths, comma-separated")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # a child: preset frames steps G length
    args = parser.parse_args(argv)
    if args.one:
        preset, frames, steps, generations, length = args.one
        print(json.dumps(one(preset, int(frames), int(steps), int(generations), int(length))))
        return 0
    rows = run(Path(args.out), args.presets.split(","), [int(f) for f in args.frames.split(",")], args.steps)
    print("| family preset | frames | frame px | video tokens | prompt tokens | step s | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['frames']} | {r['frame_size'][0]}x{r['frame_size'][1]} | {r['video_tokens']} | "
              f"{r['prompt_tokens']} | {r['step_seconds']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
