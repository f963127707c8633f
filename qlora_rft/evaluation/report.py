"""`qlora-rft report RUN_DIR`: training curves from metrics.jsonl (the evaluation during training, eval/<metric>,
in a panel beside the reward) and evaluation summaries from metrics.json folders, written as PNGs and markdown under
RUN_DIR/report/ or --out (summary.md links everything; two or more evaluations get a comparison table, with a delta
column when there are exactly two). The folder is written whole, replacing an earlier report; one that holds files a
report does not write is refused, as are the run's own inputs."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qlora_rft.errors import UserError
from qlora_rft.files import atomic_folder, check_output_folder
from qlora_rft.runlog import read_metrics

EVAL_METRICS = ("mAP", "accuracy", "mIoU", "acc@0.5")  # percent values, in this order


class Panel(NamedTuple):
    """One plot of a training figure: metrics.jsonl keys ("rewards/*": every rewards/<name> key) and a title;
    `smooth`: a trailing mean over noisy per-step values (evaluations are means over many prompts already)."""

    keys: tuple[str, ...]
    title: str
    smooth: bool = True


# Training figures: file name -> panels side by side (a panel without values is left out; a figure without any).
TRAIN_PLOTS = {
    "rewards.png": (Panel(("reward", "rewards/*"), "Reward"),
                    Panel(tuple(f"eval/{key}" for key in EVAL_METRICS), "Evaluation during training (%)", False)),
    "kl.png": (Panel(("kl",), "KL to the reference"), Panel(("sampling/kl",), "KL of the sampler to the policy")),
    "entropy.png": (Panel(("entropy",), "Policy entropy (nats per completion token)"),),
    "completion_length.png": (Panel(("completion_length",), "Completion length (tokens)"),),
    "tokens_per_second.png": (Panel(("tokens_per_second",), "Generation throughput (tokens/s)"),),
}
REPORT_FILE = re.compile(r"summary\.md|eval_.+\.md|per_class_.+\.png|" + "|".join(map(re.escape, TRAIN_PLOTS)))
COUNT_KEYS = ("num_predictions", "skipped")
MAX_BARS = 60  # per-class charts with more classes keep the best and the worst MAX_BARS // 2


class Report(NamedTuple):
    folder: Path  # RUN_DIR/report, or the folder asked for
    files: list[Path]  # every file written, summary.md last
    summary: Path  # RUN_DIR/report/summary.md


@dataclass
class Evaluation:
    label: str
    slug: str  # the label made safe for file names (unique within the report)
    folder: Path
    metrics: dict
    info: dict


def make_report(run_dir: Path | str, out: Path | str | None = None) -> Report:
    """Write `out` (default RUN_DIR/report/) from the run's metrics.jsonl and evaluation folders; see the module
    docstring."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass a training or evaluation output folder")
    log = find_metrics_log(run_dir)
    evals = find_evaluations(run_dir)
    if log is None and not evals:
        raise UserError(
            f"nothing to report in {run_dir}: expected a training metrics.jsonl (in it or in its train/ subfolder) "
            "or an evaluation metrics.json (in it or in a direct subfolder)"
        )
    out = Path(out) if out is not None else run_dir / "report"
    inputs = [*([log] if log is not None else []), *(ev.folder for ev in evals)]
    check_output_folder(out, "the report folder", overwrite=None, inputs=inputs, own=report_files(out))
    rows = _training_rows(log) if log is not None else []
    with atomic_folder(out) as tmp:
        files = plot_training(rows, tmp)
        for ev in evals:
            files += write_evaluation(ev, tmp)
        names = [f.name for f in files]
        (tmp / "summary.md").write_text(summary_markdown(run_dir, log, rows, evals, names))
    return Report(folder=out, files=[*(out / name for name in names), out / "summary.md"], summary=out / "summary.md")


def report_files(folder: Path) -> list[str]:
    """The names in `folder` that a report writes (an earlier report's files, replaced by the next one)."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    return [p.name for p in folder.iterdir() if p.is_file() and REPORT_FILE.fullmatch(p.name)]


# ---------------------------------------------------------------- finding inputs


def find_metrics_log(run_dir: Path) -> Path | None:
    for path in (run_dir / "metrics.jsonl", run_dir / "train" / "metrics.jsonl"):
        if path.is_file():
            return path
    return None


def find_evaluations(run_dir: Path) -> list[Evaluation]:
    """RUN_DIR itself and its direct subfolders that hold a metrics.json; "base" first, then in folder order."""
    folders = [run_dir] + sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name != "report")
    evals, slugs = [], set()
    for folder in folders:
        if not (folder / "metrics.json").is_file():
            continue
        metrics = _read_json(folder / "metrics.json")
        info = _read_json(folder / "eval_info.json") if (folder / "eval_info.json").is_file() else {}
        label = str(info.get("label") or folder.name)
        slug = _unique(_slugify(label), slugs)
        evals.append(Evaluation(label, slug, folder, metrics, info))
    return sorted(evals, key=lambda ev: ev.label != "base")  # stable: the rest keep folder order


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-run the evaluation that wrote it") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _slugify(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "eval"


def _unique(slug: str, taken: set[str]) -> str:
    candidate, n = slug, 2
    while candidate in taken:
        candidate, n = f"{slug}_{n}", n + 1
    taken.add(candidate)
    return candidate


def _number(value) -> float | None:
    """A finite float, or None for None, NaN, inf, booleans and anything not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------- training curves


def _training_rows(log: Path) -> list[dict]:
    return [row for row in read_metrics(log) if isinstance(row, dict)]


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key, leaving out rows where it is missing or not a finite number."""
    steps, values = [], []
    for i, row in enumerate(rows):
        value = _number(row.get(key))
        if value is not None:
            steps.append(_number(row.get("step")) or float(i + 1))
            values.append(value)
    return steps, values


def _expand_keys(rows: list[dict], patterns: tuple[str, ...]) -> list[str]:
    keys = []
    for pattern in patterns:
        if pattern.endswith("*"):
            keys += sorted({k for row in rows for k in row if k.startswith(pattern[:-1])})
        else:
            keys.append(pattern)
    return keys


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per entry of TRAIN_PLOTS with at least one panel whose keys have a finite value; the others are
    skipped."""
    written = []
    for name, panels in TRAIN_PLOTS.items():
        drawn = []
        for panel in panels:
            lines = {key: _series(rows, key) for key in _expand_keys(rows, panel.keys)}
            lines = {key: line for key, line in lines.items() if line[1]}
            if lines:
                drawn.append((panel, lines))
        if drawn:
            _line_figure(drawn, out / name)
            written.append(out / name)
    return written


def _line_figure(panels: list[tuple[Panel, dict[str, tuple[list[float], list[float]]]]], path: Path) -> None:
    fig = Figure(figsize=(7 * len(panels), 4), layout="constrained")
    for ax, (panel, lines) in zip(fig.subplots(1, len(panels), squeeze=False, sharex=True)[0], panels):
        for i, (key, (steps, values)) in enumerate(lines.items()):
            colour = f"C{i}"
            window = max(1, min(25, len(values) // 10)) if panel.smooth else 1
            if window > 1:
                ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
            marker = "." if len(values) < 3 or not panel.smooth else None
            ax.plot(steps, moving_average(values, window), color=colour, label=key, marker=marker)
        ax.set(title=panel.title, xlabel="step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        else:
            ax.set_ylabel(next(iter(lines)))
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # the non-interactive Agg backend, without touching pyplot's global state
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- one evaluation


def _per_class(ev: Evaluation) -> dict[str, float | None]:
    per_class = ev.metrics.get("per_class")
    if not isinstance(per_class, dict):
        return {}
    return {str(name): _number(ap) for name, ap in per_class.items()}


def _fmt(value: float | None) -> str:
    """Counts (int) as they are, percentages (float) with two decimals, None as n/a."""
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def _count(value) -> int | None:
    """num_predictions / skipped as a count (skipped may be a number or a list of skipped lines)."""
    if isinstance(value, (list, tuple)):
        return len(value)
    number = _number(value)
    return int(number) if number is not None else None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_evaluation(ev: Evaluation, out: Path) -> list[Path]:
    """eval_<slug>.md, plus per_class_<slug>.png when the evaluation has at least one per-class AP."""
    written = []
    chart = out / f"per_class_{ev.slug}.png"
    if plot_per_class(_per_class(ev), f"Per-class AP: {ev.label}", chart):
        written.append(chart)
    md = out / f"eval_{ev.slug}.md"
    md.write_text(evaluation_markdown(ev, chart.name if written else None))
    return [*written, md]


def plot_per_class(per_class: dict[str, float | None], title: str, path: Path) -> bool:
    """Horizontal bars of the classes with an AP (null ones are left out); False when there is none."""
    known = sorted(((ap, name) for name, ap in per_class.items() if ap is not None), reverse=True)
    if not known:
        return False
    if len(known) > MAX_BARS:
        title += f" (best and worst {MAX_BARS // 2} of {len(known)})"
        known = known[: MAX_BARS // 2] + known[-(MAX_BARS // 2):]
    fig = Figure(figsize=(7, 1.2 + 0.28 * len(known)), layout="constrained")
    ax = fig.add_subplot()
    aps, names = zip(*known)
    ax.barh(range(len(known)), aps, color="C0")
    ax.set_yticks(range(len(known)), names)
    ax.invert_yaxis()  # best on top
    ax.set(title=title, xlabel="AP (%)", xlim=(0, max(100.0, max(aps))))
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def evaluation_markdown(ev: Evaluation, chart: str | None) -> str:
    m, lines = ev.metrics, [f"# Evaluation: {ev.label}", ""]
    lines += [f"- folder: `{ev.folder}`", f"- task: {m.get('task', 'n/a')}"]
    lines += [f"- {key}: {ev.info[key]}" for key in ("model", "adapter") if key in ev.info]
    lines += [f"- **{key}**: {_fmt(_number(m[key]))} %" for key in EVAL_METRICS if key in m]
    lines += [f"- {key}: {_fmt(_count(m[key]))}" for key in COUNT_KEYS if key in m]
    shown = {"task", "per_class", *EVAL_METRICS, *COUNT_KEYS}
    lines += [f"- {key}: {value}" for key, value in m.items() if key not in shown and _is_scalar(value)]
    lines += _skipped_lines(m.get("skipped"))
    per_class = _per_class(ev)
    if per_class:
        lines += ["", "## Per-class AP (%)", "", "| class | AP |", "|---|---:|"]
        lines += [f"| {_cell(name)} | {_fmt(ap)} |" for name, ap in per_class.items()]
    if chart:
        lines += ["", f"![per-class AP]({chart})"]
    return "\n".join(lines) + "\n"


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _skipped_lines(skipped, shown: int = 10) -> list[str]:
    if not isinstance(skipped, (list, tuple)) or not skipped:
        return []
    lines = ["", "## Skipped", ""] + [f"- {_cell(str(item))}" for item in skipped[:shown]]
    if len(skipped) > shown:
        lines.append(f"- ... and {len(skipped) - shown} more")
    return lines


# ---------------------------------------------------------------- summary.md


def comparison_rows(evals: list[Evaluation]) -> list[tuple[str, list]]:
    """(row name, one value per evaluation) for the main metrics, the counts and every per-class AP."""
    rows = [(key, [_number(ev.metrics.get(key)) for ev in evals]) for key in EVAL_METRICS
            if any(key in ev.metrics for ev in evals)]
    rows += [(key, [_count(ev.metrics.get(key)) for ev in evals]) for key in COUNT_KEYS
             if any(key in ev.metrics for ev in evals)]
    per_class = [_per_class(ev) for ev in evals]
    classes = list(dict.fromkeys(name for pc in per_class for name in pc))
    rows += [(f"AP {name}", [pc.get(name) for pc in per_class]) for name in classes]
    return rows


def comparison_table(evals: list[Evaluation]) -> list[str]:
    with_delta = len(evals) == 2
    header = ["metric", *(_cell(ev.label) for ev in evals)]
    if with_delta:
        header.append(f"Δ ({_cell(evals[1].label)} − {_cell(evals[0].label)})")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, values in comparison_rows(evals):
        cells = [_cell(name), *(_fmt(v) for v in values)]
        if with_delta:
            cells.append(_delta(*values))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _delta(first: float | None, second: float | None) -> str:
    if first is None or second is None:
        return "n/a"
    return f"{second - first:+d}" if isinstance(first, int) and isinstance(second, int) else f"{second - first:+.2f}"


def _training_table(rows: list[dict]) -> list[str]:
    keys = _expand_keys(rows, tuple(key for panels in TRAIN_PLOTS.values() for panel in panels for key in panel.keys))
    lines = ["| metric | first | last | max |", "|---|---:|---:|---:|"]
    for key in keys:
        values = _series(rows, key)[1]
        if values:
            lines.append(f"| {key} | {values[0]:.4g} | {values[-1]:.4g} | {max(values):.4g} |")
    return lines


def summary_markdown(run_dir: Path, log: Path | None, rows: list[dict], evals: list[Evaluation],
                     files: list[str]) -> str:
    lines = [f"# Run report: {run_dir.name or run_dir}", ""]
    if log is not None:
        steps = _series(rows, "step")[1]
        last = f", last step {int(steps[-1])}" if steps else ""
        lines += ["## Training", "", f"`{log.relative_to(run_dir)}`: {len(rows)} logged steps{last}.", ""]
        if rows:
            lines += _training_table(rows) + [""]
        lines += [f"![{name[:-4]}]({name})\n" for name in TRAIN_PLOTS if name in files]
    if evals:
        lines += ["## Evaluations", ""]
        lines += [f"- [{ev.label}](eval_{ev.slug}.md): task {ev.metrics.get('task', 'n/a')}, folder "
                  f"`{ev.folder.relative_to(run_dir).as_posix()}`" for ev in evals] + [""]
    if len(evals) >= 2:
        lines += ["## Comparison", "", "Metrics and AP in percent; n/a: no value (null AP or missing).", ""]
        lines += comparison_table(evals) + [""]
    for ev in evals:
        if f"per_class_{ev.slug}.png" in files:
            lines += [f"![per-class AP: {ev.label}](per_class_{ev.slug}.png)", ""]
    return "\n".join(lines)
