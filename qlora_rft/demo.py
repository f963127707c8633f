"""The demo: warm a tiny model up on synthetic shapes, run QLoRA GRPO, and compare held-out accuracy.

Everything comes from one config (configs/tiny_demo.yaml); the before/after numbers come from the same
evaluation code and parser as any other run. Writes runs/demo/summary.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qlora_rft.config import Config, load_config
from qlora_rft.files import check_output_folder

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_demo.yaml"
OUTPUTS = ("train", "eval_base", "eval_adapter", "summary.json", "report")  # what a demo writes into its --out


@dataclass
class DemoSummary:
    metric: str
    metric_before: float
    metric_after: float
    reward_first: float  # mean reward over the first 20% of steps
    reward_last: float  # mean reward over the last 20% of steps
    seconds: float
    device: str
    steps: int
    eval_rows: int


def evaluate_run(cfg: Config, base_path: str, adapter: Path | None, out: Path, console: Console | None = None):
    """Held-out evaluation through the evaluation runner (predictions.jsonl, metrics.json) of the 4-bit base, with
    the trained adapter when given: the same loading and the same parser for both."""
    from qlora_rft.evaluation.runner import run_eval

    eval_cfg = replace(cfg.eval, output_dir=str(out), adapter=str(adapter or ""),
                       label="adapter" if adapter else "base", max_new_tokens=cfg.grpo.max_completion_length)
    model_cfg = replace(cfg.model, name_or_path=base_path)
    return run_eval(replace(cfg, eval=eval_cfg, model=model_cfg), console)


def run_demo(config: str | Path | None = None, overrides: list[str] | None = None, out: str | Path = "runs/demo",
             console: Console | None = None) -> DemoSummary:
    from qlora_rft.evaluation.runner import main_metric
    from qlora_rft.trainer import train
    from qlora_rft.warmup import warmed_base

    console = console or Console()
    started = time.perf_counter()
    out = Path(out)
    cfg = load_config(config or DEFAULT_CONFIG, [f"train.output_dir={out / 'train'}", *(overrides or [])])
    check_output_folder(out, "--out", overwrite=None, own=OUTPUTS)  # a folder of other files is refused
    for name in OUTPUTS:  # the demo always starts afresh (use `qlora-rft train` for resumable runs)
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)

    console.rule("[bold]1. warm-up: the tiny base learns the answer format")
    base = warmed_base(cfg, console)
    console.rule("[bold]2. evaluate the 4-bit base on held-out images")
    before = evaluate_run(cfg, base, None, out / "eval_base", console)
    console.rule("[bold]3. QLoRA GRPO")
    result = train(cfg, console=console)
    console.rule("[bold]4. evaluate base + trained adapter")
    after = evaluate_run(cfg, base, result.adapter_dir, out / "eval_adapter", console)
    metric, value_before = main_metric(before.metrics)
    value_after = main_metric(after.metrics)[1]

    rewards = [m["reward"] for m in result.metrics]
    fifth = max(1, len(rewards) // 5)
    from qlora_rft.model import pick_device

    summary = DemoSummary(
        metric=metric,
        metric_before=value_before / 100,  # the evaluation reports percent; the summary keeps [0, 1]
        metric_after=value_after / 100,
        reward_first=sum(rewards[:fifth]) / fifth,
        reward_last=sum(rewards[-fifth:]) / fifth,
        seconds=time.perf_counter() - started,
        device=str(pick_device(cfg.model.device)),
        steps=result.steps,
        eval_rows=after.metrics["num_predictions"],
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(vars(summary), indent=2))

    table = Table(title=f"qlora-rft demo: QLoRA GRPO on synthetic shapes ({summary.device})")
    table.add_column("")
    table.add_column("before GRPO", justify="right")
    table.add_column("after GRPO", justify="right")
    table.add_row(f"held-out {summary.metric} ({summary.eval_rows} images)", f"{summary.metric_before:.3f}",
                  f"{summary.metric_after:.3f}")
    table.add_row("mean reward (first / last 20% of steps)", f"{summary.reward_first:.3f}",
                  f"{summary.reward_last:.3f}")
    console.print(table)
    console.print(f"{summary.steps} GRPO steps, {summary.seconds:.0f} s in all; summary: {out / 'summary.json'}")
    return summary
