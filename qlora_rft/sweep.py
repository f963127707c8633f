"""Small-budget ablations: every combination of a grid is trained and evaluated in turn, then tabulated.

Resumable: a finished setting (its evaluation's metrics.json exists) is skipped, a half-trained one resumes from its
newest checkpoint (or starts afresh when it wrote none). The base is evaluated once as the reference row. Writes
results.md, results.csv, results.png.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qlora_rft import checkpoint
from qlora_rft.config import Config, load_config
from qlora_rft.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    name: str  # folder name, e.g. "train.method=sft"
    overrides: tuple[str, ...]


@dataclass
class SweepRow:
    setting: str
    metric: str
    value: float  # percent
    steps: int
    train_seconds: float | None


@dataclass
class SweepResult:
    folder: Path
    rows: list[SweepRow]
    table: Path
    csv: Path
    plot: Path


def parse_grid(items: list[str]) -> list[Setting]:
    """`["train.method=grpo,sft", "lora.r=8,16"]` -> the cartesian product of settings, in order."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or "." not in key or not options:
            raise ConfigError(f"--grid {item!r} must look like section.key=v1,v2 (e.g. train.method=grpo,sft)")
        axes.append([f"{key}={v}" for v in options])
    if not axes:
        raise ConfigError("sweep needs at least one --grid section.key=v1,v2")
    return [Setting(",".join(combo), combo) for combo in itertools.product(*axes)]


def run_sweep(config: str | Path, grid: list[str], out: str | Path | None = None, eval_config: str | Path | None = None,
              overrides: list[str] | None = None, console: Console | None = None) -> SweepResult:
    from qlora_rft.evaluation.runner import main_metric, run_eval
    from qlora_rft.trainer import fit

    console = console or Console()
    settings = parse_grid(grid)
    common = list(overrides or [])
    out = Path(out or f"runs/sweep-{Path(config).stem}")
    for setting in settings:  # every setting must be a valid config before anything runs
        load_config(config, [*common, *setting.overrides])

    rows, bases = [], {}
    for setting in settings:
        folder = out / setting.name
        cfg = load_config(config, [*common, *setting.overrides, f"train.output_dir={folder / 'train'}"])
        console.rule(f"[bold]{setting.name}")
        done = folder / "eval" / "metrics.json"
        if not done.exists():
            if not (folder / "train" / "adapter" / "adapter_config.json").exists():
                resume = checkpoint.latest(folder / "train") is not None  # else start afresh, whatever is there
                fit(cfg, resume=resume, overwrite=not resume, console=console)
            base = json.loads((folder / "train" / "train_summary.json").read_text())["base"]
            run_eval(_eval_config(cfg, config, eval_config, common, setting, base, folder / "train" / "adapter",
                                  folder / "eval"), console)
        else:
            console.print(f"finished earlier: {done}")
        summary = json.loads((folder / "train" / "train_summary.json").read_text())
        bases.setdefault(summary["base"], cfg)
        metric, value = main_metric(json.loads(done.read_text()))
        rows.append(SweepRow(setting.name, metric, value, summary["steps"], summary.get("seconds")))

    for i, (base, cfg) in enumerate(bases.items()):  # the reference: each distinct base without adapters
        folder = out / ("base" if len(bases) == 1 else f"base-{i}")
        done = folder / "eval" / "metrics.json"
        if not done.exists():
            run_eval(_eval_config(cfg, config, eval_config, common, None, base, None, folder / "eval"), console)
        metric, value = main_metric(json.loads(done.read_text()))
        rows.insert(i, SweepRow(folder.name, metric, value, 0, None))
    return _write_results(out, rows, console)


def _eval_config(cfg: Config, config, eval_config, common, setting: Setting | None, base: str, adapter: Path | None,
                 out: Path) -> Config:
    """The evaluation settings (the sweep config's, or --eval's) on the trained base, with the adapter if any."""
    if eval_config is not None:
        cfg = load_config(eval_config, [*common, *(setting.overrides if setting else ())])
    model = replace(cfg.model, name_or_path=base)
    label = setting.name if setting else "base"
    ev = replace(cfg.eval, adapter=str(adapter or ""), output_dir=str(out), label=label)
    return replace(cfg, model=model, eval=ev)


def _write_results(out: Path, rows: list[SweepRow], console: Console) -> SweepResult:
    out.mkdir(parents=True, exist_ok=True)
    metric = rows[0].metric if rows else ""
    lines = [f"| setting | {metric} (%) | steps | train seconds |", "|---|---:|---:|---:|"]
    for r in rows:
        seconds = "" if r.train_seconds is None else f"{r.train_seconds:.0f}"
        lines.append(f"| {r.setting} | {r.value:.2f} | {r.steps} | {seconds} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "metric", "value", "steps", "train_seconds"])
        for r in rows:
            writer.writerow([r.setting, r.metric, f"{r.value:.4f}", r.steps, r.train_seconds or ""])
    plot = _plot(rows, out / "results.png")
    table = Table(title=f"sweep: {out}")
    for column in ("setting", f"{metric} (%)", "steps"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for r in rows:
        table.add_row(r.setting, f"{r.value:.2f}", str(r.steps))
    console.print(table)
    return SweepResult(out, rows, out / "results.md", out / "results.csv", plot)


def _plot(rows: list[SweepRow], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bars = axes.bar(range(len(rows)), [r.value for r in rows], color="#4c72b0")
    axes.bar_label(bars, fmt="%.1f")
    axes.set_xticks(range(len(rows)), [r.setting for r in rows], rotation=20, ha="right")
    axes.set_ylabel(f"{rows[0].metric} (%)" if rows else "")
    axes.set_title("metric per setting")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
