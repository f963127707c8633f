"""Small-budget ablations: every combination of a grid is trained and evaluated in turn, then tabulated.

Resumable: a finished setting (its evaluation's metrics.json exists) is skipped, a half-trained one resumes from its
newest checkpoint (or starts afresh when it wrote none). The base is evaluated once as the reference row. Settings
that differ only by `train.seed` are summarised together (`summarise`: mean, sample standard deviation, min and max
over the seeds). Writes results.md and results.png (one row per setting), results.csv (one line per run).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qlora_rft import checkpoint
from qlora_rft.config import Config, load_config
from qlora_rft.errors import ConfigError
from qlora_rft.files import check_output_folder


SEED_KEY = "train.seed"  # the grid axis whose runs are summarised together


@dataclass(frozen=True)
class Setting:
    name: str  # folder name, e.g. "train.method=sft,train.seed=1"
    overrides: tuple[str, ...]

    @property
    def group(self) -> str:
        """The name without its seed: the settings that differ only by train.seed share it ("" for a seed alone)."""
        return ",".join(o for o in self.overrides if o.partition("=")[0] != SEED_KEY)


@dataclass
class SweepRow:
    """One run: a trained setting, or a base evaluated as the reference."""

    setting: str
    metric: str
    value: float  # percent
    steps: int
    train_seconds: float | None
    group: str  # the rows of one group are the same setting at different seeds
    seed: int  # train.seed of the run (of the setting that warmed a base, for a base)


@dataclass
class SettingSummary:
    """A setting's metric over the runs of its group (its seeds)."""

    setting: str
    metric: str
    runs: int
    mean: float  # percent
    sd: float | None  # sample standard deviation (n - 1); None for a single run
    low: float
    high: float
    values: list[float]  # per run, in the grid's order
    seeds: list[int]
    steps: int
    train_seconds: float | None  # mean over the runs


@dataclass
class SweepResult:
    folder: Path
    rows: list[SweepRow]  # one per run
    settings: list[SettingSummary]  # one per group of rows
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


def summarise(rows: list[SweepRow]) -> list[SettingSummary]:
    """One summary per group of rows, in the order the groups first appear.

    >>> rows = [SweepRow("train.seed=0", "accuracy", 20.0, 10, 4.0, "grpo", 0),
    ...         SweepRow("train.seed=1", "accuracy", 40.0, 10, 6.0, "grpo", 1),
    ...         SweepRow("train.seed=2", "accuracy", 60.0, 10, 5.0, "grpo", 2)]
    >>> s = summarise(rows)[0]
    >>> s.mean, s.sd, s.low, s.high, s.train_seconds
    (40.0, 20.0, 20.0, 60.0, 5.0)
    """
    groups: dict[str, list[SweepRow]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    summaries = []
    for name, members in groups.items():
        values = [r.value for r in members]
        seconds = [r.train_seconds for r in members if r.train_seconds is not None]
        summaries.append(SettingSummary(
            setting=name, metric=members[0].metric, runs=len(values), mean=statistics.fmean(values),
            sd=statistics.stdev(values) if len(values) > 1 else None, low=min(values), high=max(values),
            values=values, seeds=[r.seed for r in members], steps=max(r.steps for r in members),
            train_seconds=statistics.fmean(seconds) if seconds else None,
        ))
    return summaries


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
    check_output_folder(out, "--out", overwrite=None, own=sweep_outputs(out))  # a sweep's own, to resume or extend

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
        bases.setdefault(summary["base"], (cfg, setting))
        metric, value = main_metric(json.loads(done.read_text()))
        rows.append(SweepRow(setting.name, metric, value, summary["steps"], summary.get("seconds"),
                             setting.group or "adapter", cfg.train.seed))

    # The reference: each distinct base without adapters (one per seed when each seed warms its own); bases of
    # settings that differ only by seed are one group.
    base_groups = list(dict.fromkeys(setting.group for _, setting in bases.values()))
    for i, (base, (cfg, setting)) in enumerate(bases.items()):
        folder = out / ("base" if len(bases) == 1 else f"base-{i}")
        done = folder / "eval" / "metrics.json"
        if not done.exists():
            run_eval(_eval_config(cfg, config, eval_config, common, None, base, None, folder / "eval"), console)
        metric, value = main_metric(json.loads(done.read_text()))
        group = "base" if len(base_groups) == 1 else f"base-{base_groups.index(setting.group)}"
        rows.insert(i, SweepRow(folder.name, metric, value, 0, None, group, cfg.train.seed))
    return _write_results(out, rows, console)


RESULTS = ("results.md", "results.csv", "results.png", "report")


def sweep_outputs(out: Path) -> list[str]:
    """What in `out` a sweep wrote: the results, the settings' folders (named section.key=value,...) and the bases'."""
    if not out.is_dir():
        return []
    return [*RESULTS, *(p.name for p in out.iterdir() if p.is_dir() and ("=" in p.name or re.fullmatch(
        r"base(-\d+)?", p.name)))]


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
    settings = summarise(rows)
    seeded = any(s.runs > 1 for s in settings)
    if not seeded:  # one run per setting: each row under its own name
        settings = [replace(s, setting=r.setting) for s, r in zip(settings, rows)]
    header, cells = _columns(settings, seeded)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "metric", "value", "steps", "train_seconds"])
        for r in rows:
            writer.writerow([r.setting, r.metric, f"{r.value:.4f}", r.steps, r.train_seconds or ""])
    plot = _plot(settings, out / "results.png")
    table = Table(title=f"sweep: {out}")
    for column in header:
        table.add_column(column, justify="left" if column == "setting" else "right")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    return SweepResult(out, rows, settings, out / "results.md", out / "results.csv", plot)


def _columns(settings: list[SettingSummary], seeded: bool) -> tuple[list[str], list[list[str]]]:
    """results.md's header and cells: metric, steps and train seconds; over seeds, the mean, the sample standard
    deviation, min, max and the seeds."""
    metric = f"{settings[0].metric} (%)" if settings else "(%)"
    header = ["setting", metric, "steps", "train seconds"]
    if seeded:
        header = ["setting", f"{metric} mean", "sd", "min", "max", "seeds", "steps", "train seconds"]
    cells = []
    for s in settings:
        seconds = "" if s.train_seconds is None else f"{s.train_seconds:.0f}"
        if not seeded:
            cells.append([s.setting, f"{s.mean:.2f}", str(s.steps), seconds])
            continue
        sd = "" if s.sd is None else f"{s.sd:.2f}"
        seeds = ",".join(str(seed) for seed in s.seeds) if s.runs > 1 else ""
        cells.append([s.setting, f"{s.mean:.2f}", sd, f"{s.low:.2f}", f"{s.high:.2f}", seeds, str(s.steps),
                      seconds])
    return header, cells


def _plot(settings: list[SettingSummary], path: Path) -> Path:
    """A bar per setting (its mean); over seeds, each run as a point and the sample standard deviation as an
    error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.0, 1.2 * len(settings) + 2), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    x = range(len(settings))
    bars = axes.bar(x, [s.mean for s in settings], color="#4c72b0")
    seeded = [(i, s) for i, s in enumerate(settings) if s.sd is not None]
    if seeded:  # the means inside the bars, clear of the error bars
        axes.bar_label(bars, fmt="%.1f", label_type="center", color="white")
        axes.errorbar([i for i, _ in seeded], [s.mean for _, s in seeded], yerr=[s.sd for _, s in seeded],
                      fmt="none", ecolor="black", capsize=4, label="sample sd (n-1)")
        axes.scatter([i for i, s in seeded for _ in s.values], [v for _, s in seeded for v in s.values],
                     color="#dd8452", s=14, zorder=3, label="each seed")
        axes.set_ylim(0, 1.3 * max(max(s.high, s.mean + s.sd) for _, s in seeded) or 1)
        axes.legend(fontsize="small", loc="upper left")
    else:
        axes.bar_label(bars, fmt="%.1f")
    axes.set_xticks(x, [s.setting for s in settings], rotation=20, ha="right")
    axes.set_ylabel(f"{settings[0].metric} (%)" if settings else "")
    axes.set_title("metric per setting" + (" (mean over seeds)" if seeded else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
