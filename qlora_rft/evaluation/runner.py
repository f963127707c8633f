"""Evaluation runs: greedy, batched inference of a base (with an optional adapter) into predictions.jsonl, decoded by
the sampler training uses (eval.decode, eval.sampling_weights), then the metrics from that file alone (`scoring`), so
`qlora-rft score` reproduces them without a model.

Resumable: each line is written as soon as its batch is done, and a rerun skips the prompts already written; a
rerun whose settings would change the answers (eval_info.json) is refused rather than mixed into the same file.
A prompt over data.max_prompt_length is not asked: its line says why (`skipped`), and the scorer reports it.
Detection asks every (image, class) pair of an annotation file, or only the classes present (`eval.ask`); an
LVIS v1 image (no file_name) is found from its coco_url, in COCO's train2017/ or val2017/ folder under eval.images.
A family that answers boxes in pixels (Qwen2.5-VL) gets a `frame` [width, height] in each line, for the scorer.
`eval.protocol=paper` asks as the original Visual-RFT evaluation did (`Asking`, resolved once per run; detection
classes from its class-existence map), and eval_info.json and metrics.json record which protocol ran.
A task whose metric is its rewards (generic) gets each completion's rewards in its line, computed with the run's
rewards (built-in and rewards.plugins).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from qlora_rft.config import Config
from qlora_rft.data import Example, load_images, load_split, resolve_source
from qlora_rft.errors import DataError, UserError
from qlora_rft.files import append_lines, atomic_file, lock_folder, unlock_folder
from qlora_rft.models import vision_token_in
from qlora_rft.prompts import encode_prompts, prompt_lengths, too_long
from qlora_rft.rewards import RewardSet, reward_set
from qlora_rft.sampling import Sampler, Settings, make_sampler
from qlora_rft.tasks import Task, detection, get_task
from qlora_rft.tasks.boxes import RELATIVE, Frame, to_scale
from qlora_rft.video import VideoRule

PREDICTIONS, METRICS, INFO = "predictions.jsonl", "metrics.json", "eval_info.json"
FORMER_PROTOCOLS = {"all_classes": "all", "present_classes": "present"}  # eval.protocol values before eval.ask


@dataclass(frozen=True)
class EvalItem:
    key: str  # unique per prompt: a rerun skips keys already in predictions.jsonl
    example: Example
    record: dict  # the identifying fields written next to the completion


@dataclass(frozen=True)
class Asking:
    """How every prompt of an evaluation is asked, as `eval.protocol` decides: image area bounds, tokens generated,
    the prompt-length limit (None: none) and greedy decoding's repetition penalty (1.0: none)."""

    protocol: str
    min_pixels: int
    max_pixels: int
    max_new_tokens: int
    max_prompt_length: int | None
    repetition_penalty: float


@dataclass
class EvalRun:
    output_dir: Path
    predictions: Path
    metrics: dict
    label: str


# ----------------------------------------------------------------------------- how it is asked


def resolve_asking(cfg: Config, task: Task) -> Asking:
    """ours: the config's settings. paper: the original evaluation's: the task's max_new_tokens, the model folder's
    image processor bounds (qwen-vl-utils and the processor applied those), no prompt-length limit, and greedy
    decoding with the repetition_penalty of the folder's generation_config.json (generate() read it there; its
    near-greedy temperature 0.01 / top_k 1 sampling is greedy)."""
    if cfg.eval.protocol == "ours":
        return Asking("ours", cfg.data.min_pixels, cfg.data.max_pixels, cfg.eval.max_new_tokens,
                      cfg.data.max_prompt_length, 1.0)
    from qlora_rft.model import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)
    min_pixels, max_pixels = processor_pixels(path)
    if task.paper_max_new_tokens is None:  # checked with the config; here for a library caller
        raise UserError(f"data.task={task.name} has no original evaluation: use eval.protocol=ours")
    return Asking("paper", min_pixels, max_pixels, task.paper_max_new_tokens, None,
                  shipped_repetition_penalty(path))


def processor_pixels(path: Path) -> tuple[int, int]:
    """The image area bounds of a model folder's own image processor (min_pixels, max_pixels); its family's
    released bounds when the processor does not say."""
    from qlora_rft.models import family_of
    from qlora_rft.pretrained import load_image_processor

    processor = load_image_processor(path)
    size = getattr(processor, "size", None)
    low = getattr(processor, "min_pixels", None) or (size.get("shortest_edge") if hasattr(size, "get") else None)
    high = getattr(processor, "max_pixels", None) or (size.get("longest_edge") if hasattr(size, "get") else None)
    family = family_of(path)
    return int(low or family.min_pixels), int(high or family.max_pixels)


def shipped_repetition_penalty(path: Path) -> float:
    """The repetition_penalty of a model folder's generation_config.json; 1.0 (none) when it sets none."""
    from qlora_rft.pretrained import load_generation_config

    try:
        config = load_generation_config(path)
    except OSError:  # no generation_config.json
        return 1.0
    return float(config.repetition_penalty or 1.0)


# ----------------------------------------------------------------------------- what is asked


def detection_items(cfg: Config, asking: Asking | None = None) -> list[EvalItem]:
    """Every image of a COCO/LVIS annotation file x the evaluated classes (or only those present, or under the
    paper protocol those its class-existence map lists). The images asked something are checked first (decoded,
    sized), as dataset rows are: a bad one is refused or skipped per data.on_bad_row. `asking`: resolved from cfg
    when not given."""
    from qlora_rft.evaluation.class_sets import resolve_classes
    from qlora_rft.evaluation.exist_map import asked_classes, check_exist_map, read_exist_map
    from qlora_rft.evaluation.coco import load_annotations

    if not cfg.eval.annotations:
        raise DataError(f"data.task={cfg.data.task} is evaluated against an annotation file: set "
                        "eval.annotations=FILE (a COCO or LVIS JSON) and eval.images=DIR (its images)")
    path = Path(resolve_source(cfg.eval.annotations))
    if not path.is_file():
        raise DataError(f"eval.annotations={path} not found: pass a COCO- or LVIS-format JSON")
    coco = load_annotations(path)  # the scorer's checks: eval and `score` accept and refuse the same files
    for image in coco["images"]:
        if not isinstance(image.get("file_name"), str) and not isinstance(image.get("coco_url"), str):
            raise DataError(f"annotation file {path}: image {image['id']!r} has neither a 'file_name' nor a "
                            "'coco_url' (eval reads the image)")
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    classes = resolve_classes(cfg.eval.classes, list(names.values()))
    for name in classes:  # a class name is asked in the prompt
        token = vision_token_in(name)
        if token is not None:
            raise DataError(f"annotation file {path}: category {name!r} holds the vision token {token}, which the "
                            "processor would take for an image slot: rename it, or leave it out of eval.classes")
    root = Path(resolve_source(cfg.eval.images)) if cfg.eval.images else path.parent
    truth: dict[tuple[int, str], list] = {}
    for ann in coco.get("annotations", []):
        truth.setdefault((ann["image_id"], names[ann["category_id"]]), []).append(ann["bbox"])
    asking = asking or resolve_asking(cfg, get_task("detection"))
    paper = asking.protocol == "paper"
    if paper:
        exist_map = read_exist_map(resolve_source(cfg.eval.exist_map))
        check_exist_map(exist_map, [image["id"] for image in coco["images"]], list(names.values()),
                        cfg.eval.exist_map, path)
    asked = []  # (image, the classes it is asked)
    for image in coco["images"]:
        if paper:
            chosen = asked_classes(exist_map[str(image["id"])], classes)
        else:
            chosen = [name for name in classes if cfg.eval.ask == "all" or (image["id"], name) in truth]
        if chosen:
            asked.append((image, chosen))
    files = [image_file(image, root) for image, _ in asked]
    cells = load_images(files, asking.min_pixels, asking.max_pixels, cfg.data.on_bad_row, str(path),
                        factor=_factor(cfg))
    problem = detection.released_problem if paper else detection.problem  # paper: the text the models trained on
    items = []
    for (image, chosen), file in zip(asked, files):
        if file not in cells:  # skipped, reported
            continue
        w, h = image["width"], image["height"]
        for name in chosen:
            boxes = [to_scale((x, y, x + bw, y + bh), w, h) for x, y, bw, bh in truth.get((image["id"], name), [])]
            example = Example(
                index=image["id"],
                problem=problem(name),
                solution=detection.solution([tuple(b) for b in boxes]),
                image=cells[file],  # one cell per image: a large one decoded once, for every class
            )
            items.append(EvalItem(f"{image['id']}|{name}", example, {"image_id": image["id"], "category": name}))
    return items


def image_file(image: dict, root: Path) -> str:
    """The file of an annotation image: COCO's `file_name` under `root`; for LVIS v1, which has only a `coco_url`
    (".../val2017/000000397133.jpg"), its split folder and name under `root` (COCO's layout), else the name alone.

    >>> image_file({"coco_url": "http://images.cocodataset.org/val2017/1.jpg"}, Path("/nowhere"))
    '/nowhere/1.jpg'
    """
    if isinstance(image.get("file_name"), str):
        return str(root / image["file_name"])
    split, name = image["coco_url"].split("/")[-2:]
    in_split = root / split / name
    return str(in_split if in_split.is_file() else root / name)


def dataset_items(cfg: Config, task: Task, asking: Asking) -> list[EvalItem]:
    """Each usable row of data.eval (default: data.train's source) at data.eval_split; for grounding under the paper
    protocol only the first row of each image file (the original asked each LISA image its first instruction)."""
    source = cfg.data.eval or cfg.data.train
    data = load_split(source, cfg.data.eval_split, task, cfg.data.on_bad_row, cfg.data.image_root,
                      min_pixels=asking.min_pixels, max_pixels=asking.max_pixels, factor=_factor(cfg),
                      video=VideoRule.of(cfg.data))
    examples = data.examples
    if task.one_row_per_image:
        examples = first_per_image(examples)
    return [EvalItem(str(ex.index), ex, {"id": ex.index, "solution": ex.solution}) for ex in examples]


def first_per_image(examples: list[Example]) -> list[Example]:
    """The first example of each image file, in order. Only absolute paths (what the LISA loaders write) identify a
    file: examples with none, such as parquet rows, are all kept."""
    seen: set[str] = set()
    kept = []
    for example in examples:
        path = example.image.get("path")
        path = path if isinstance(path, str) and os.path.isabs(path) else None
        if path is None or path not in seen:
            kept.append(example)
        if path is not None:
            seen.add(path)
    return kept


def _factor(cfg: Config) -> int:
    from qlora_rft.model import model_family

    return model_family(cfg.model.name_or_path).factor


def eval_items(cfg: Config, task: Task, asking: Asking | None = None) -> list[EvalItem]:
    asking = asking or resolve_asking(cfg, task)
    if task.needs_annotations:
        items = detection_items(cfg, asking)
    else:
        items = dataset_items(cfg, task, asking)
    return items[: cfg.eval.limit] if cfg.eval.limit else items


# ----------------------------------------------------------------------------- inference


@torch.no_grad()
def answer_batches(sampler: Sampler, task: Task, items: list[EvalItem], asking: Asking, batch_size: int
                   ) -> Iterator[tuple[list[EvalItem], list[str], list[Frame]]]:
    """Greedy completions from the sampler (inside its `synced()`), one batch at a time (left padding, explicit
    settings, the protocol's image bounds), with the box frame each prompt asked for."""
    settings = Settings(max_new_tokens=asking.max_new_tokens, do_sample=False,
                        repetition_penalty=asking.repetition_penalty)
    no_limit = 2**31 - 1
    for start in range(0, len(items), batch_size):
        batch_items = items[start : start + batch_size]
        batch, frames = encode_prompts(sampler.processor, task, [it.example for it in batch_items],
                                       asking.min_pixels, asking.max_pixels, asking.max_prompt_length or no_limit,
                                       sampler.device)
        yield batch_items, sampler.greedy(batch, settings), frames


def predict(sampler: Sampler, task: Task, items: list[EvalItem], cfg: Config, asking: Asking | None = None
            ) -> Iterator[list[dict]]:
    """The predictions lines of `items`, a list per batch: first a `skipped` line for each prompt over
    data.max_prompt_length (refused instead under data.on_bad_row=error; no limit under the paper protocol), then
    the greedy answers of the sampler (inside its `synced()`), with their rewards for a task scored by them
    (generic). What `eval` writes, and what the evaluation during training (train.eval_steps) scores."""
    if not items:
        return
    asking = asking or resolve_asking(cfg, task)
    rewards = reward_set(cfg.rewards, task) if records_rewards(task) else None
    todo, too_long = fitting_prompts(sampler.processor, task, items, cfg, asking)
    if too_long:  # the scorer reports these lines as skipped
        yield [{**item.record, "skipped": reason} for item, reason in too_long]
    for batch_items, texts, frames in answer_batches(sampler, task, todo, asking, cfg.eval.batch_size):
        yield [{**item.record, "completion": text, **frame_record(frame),
                **(reward_record(rewards, item, text, frame) if rewards is not None else {})}
               for item, text, frame in zip(batch_items, texts, frames)]


def fitting_prompts(processor, task: Task, items: list[EvalItem], cfg: Config, asking: Asking
                    ) -> tuple[list[EvalItem], list[tuple[EvalItem, str]]]:
    """The items whose prompt fits data.max_prompt_length (all of them when the protocol sets no limit), and the
    others with the reason (refused instead under data.on_bad_row=error)."""
    if asking.max_prompt_length is None:
        return items, []
    lengths = prompt_lengths(processor, task, [it.example for it in items], asking.min_pixels, asking.max_pixels)
    fitting, refused = [], []
    for item, length in zip(items, lengths):
        reason = too_long(length, asking.max_prompt_length)
        if reason is None:
            fitting.append(item)
        elif cfg.data.on_bad_row == "error":
            raise DataError(f"eval prompt {item.key}: {reason} (set data.on_bad_row=skip to skip it)")
        else:
            refused.append((item, reason))
    return fitting, refused


def frame_record(frame: Frame) -> dict:
    """A prediction's `frame` field: the pixel frame its boxes are written in; none for the 0-1000 scale."""
    return {} if frame == RELATIVE else {"frame": [frame.width, frame.height]}


def done_keys(path: Path, per_class: bool) -> set[str]:
    """Keys already in a predictions file. Lines the scorer would skip (e.g. the last one, cut by a crash) are
    dropped from the file, so appending stays valid and those prompts are asked again."""
    from qlora_rft.evaluation.scoring import read_predictions

    if not path.exists():
        return set()
    required = ("image_id", "category", "completion") if per_class else ("id", "completion")
    rows = read_predictions(path, required).rows
    with atomic_file(path) as tmp:  # a full disk leaves the file as it was
        tmp.write_text("".join(json.dumps(row.record) + "\n" for row in rows))
    return {record_key(r.record, per_class) for r in rows}


def record_key(record: dict, per_class: bool) -> str:
    """The EvalItem key of a predictions line: by image and class (a task asked per class: detection), else by row.

    >>> record_key({"image_id": 7, "category": "cat", "completion": ""}, True), record_key({"id": 3}, False)
    ('7|cat', '3')
    """
    return f"{record['image_id']}|{record['category']}" if per_class else str(record["id"])


def reward_record(rewards: RewardSet, item: EvalItem, completion: str, frame: Frame) -> dict:
    """A line's rewards, for a task scored by them: each one (`rewards`) and their weighted sum (`reward`)."""
    values = rewards.score([completion], item.example.reward_columns(), frame, item.example.index)
    return {"reward": rewards.weighted(values, item.example.index)[0],
            "rewards": {name: v[0] for name, v in values.items()}}


def records_rewards(task: Task) -> bool:
    """Whether the task's predictions lines carry the completions' rewards (its metric is their mean)."""
    return "rewards" in task.prediction_keys


def eval_settings(cfg: Config, task: Task, asking: Asking) -> dict:
    """What decides the prompts asked and the answers given (the values in force under the protocol; for a task
    scored by its rewards, the rewards too): a resumed evaluation must keep every one of these."""
    settings = {"task": task.name, "model": cfg.model.name_or_path, "mode": cfg.model.mode, "dtype": cfg.model.dtype,
                "adapter": cfg.eval.adapter or None, "annotations": cfg.eval.annotations or None,
                "images": cfg.eval.images or None, "classes": cfg.eval.classes, "protocol": asking.protocol,
                "ask": cfg.eval.ask, "exist_map": cfg.eval.exist_map or None,
                "data": cfg.data.eval or cfg.data.train, "split": cfg.data.eval_split,
                "image_root": cfg.data.image_root, "min_pixels": asking.min_pixels, "max_pixels": asking.max_pixels,
                "video_fps": cfg.data.video_fps, "video_max_frames": cfg.data.video_max_frames,
                "video_max_pixels": cfg.data.video_max_pixels,
                "max_prompt_length": asking.max_prompt_length, "max_new_tokens": asking.max_new_tokens,
                "repetition_penalty": asking.repetition_penalty, "decode": cfg.eval.decode,
                "sampling_weights": cfg.eval.sampling_weights}
    if records_rewards(task):
        settings["rewards"] = {"weights": cfg.rewards.weights, "plugin_sha256": cfg.rewards.plugin_sha256}
    return settings


def recorded_protocol(predictions: str | Path) -> str:
    """The eval.protocol an eval_info.json beside a predictions file records; "ours" when there is none."""
    try:
        info = json.loads((Path(predictions).expanduser().parent / INFO).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "ours"
    protocol = info.get("protocol") if isinstance(info, dict) else None
    return protocol if protocol in ("ours", "paper") else "ours"


def check_resumable(out: Path, info: dict) -> None:
    """Refuse to append to predictions that an evaluation with other settings wrote (one file, one setting). A
    setting the earlier eval_info.json does not record (older versions recorded fewer) is taken as unchanged. A
    predictions.jsonl without an eval_info.json, which an evaluation writes first, is no evaluation's: refused."""
    if not (out / PREDICTIONS).exists():
        return
    if not (out / INFO).exists():
        raise UserError(f"{out} holds a {PREDICTIONS} that no evaluation wrote (no {INFO} beside it): choose another "
                        "eval.output_dir, or move the file")
    try:
        before = json.loads((out / INFO).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        before = None
    if not isinstance(before, dict):
        raise UserError(f"{out / INFO} is unreadable, so {out / PREDICTIONS} cannot be resumed safely: choose another "
                        "eval.output_dir, or delete it to start afresh")
    if before.get("protocol") in FORMER_PROTOCOLS:  # written before eval.ask: its protocol named the classes asked
        before = {**before, "protocol": "ours", "ask": FORMER_PROTOCOLS[before["protocol"]]}
    changed = [f"{key} {before[key]!r} -> {value!r}" for key, value in info.items()
               if key != "label" and key in before and before[key] != value]
    if changed:
        raise UserError(f"{out} holds predictions of another evaluation ({'; '.join(changed)}): choose another "
                        "eval.output_dir, or delete it to start afresh")


def run_eval(cfg: Config, console: Console | None = None) -> EvalRun:
    """Evaluate `model.name_or_path` (+ `eval.adapter`) and write predictions.jsonl, metrics.json, eval_info.json."""
    from qlora_rft.evaluation.scoring import write_metrics
    from qlora_rft.memory import check_evaluation_fits
    from qlora_rft.model import pick_device, resolve_model_path

    console = console or Console()
    task = get_task(cfg.data.task, cfg.eval.protocol)
    asking = resolve_asking(cfg, task)
    check_evaluation_fits(cfg, resolve_model_path(cfg.model.name_or_path), pick_device(cfg.model.device),
                          asking.max_new_tokens, asking.max_prompt_length)
    out = Path(cfg.eval.output_dir)
    locked = lock_folder(out, "eval.output_dir")  # one evaluation at a time writes it
    try:
        label = cfg.eval.label or ("adapter" if cfg.eval.adapter else "base")
        predictions = write_predictions(cfg, task, asking, out, label, console)
        metrics = score_predictions(cfg, task, predictions)
        write_metrics(metrics, out / METRICS)
    finally:
        if locked:
            unlock_folder(out)
    console.print(metrics_table(metrics, label))
    return EvalRun(out, predictions, metrics, label)


def write_predictions(cfg: Config, task: Task, asking: Asking, out: Path, label: str, console: Console) -> Path:
    """The prompts read (a bad file refused before anything is written), eval_info.json, then the predictions of the
    prompts predictions.jsonl does not hold yet, a batch at a time."""
    from qlora_rft.model import load_for_inference

    info = {"label": label, **eval_settings(cfg, task, asking)}
    check_resumable(out, info)
    items = eval_items(cfg, task, asking)
    with atomic_file(out / INFO) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    predictions = out / PREDICTIONS
    done = done_keys(predictions, task.needs_annotations)
    todo = [it for it in items if it.key not in done]
    if todo:
        policy = load_for_inference(cfg.model, cfg.eval.adapter or None)
        sampler = make_sampler(cfg.eval, policy)
        console.print(sampler.summary())
        progress = Progress(TextColumn(f"[bold]eval {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console)
        kept = "the predictions written so far are kept: free some space and run the evaluation again to resume it"
        with progress, sampler.synced():
            bar = progress.add_task("eval", total=len(items), completed=len(items) - len(todo))
            for lines in predict(sampler, task, todo, cfg, asking):
                append_lines(predictions, [json.dumps(line) for line in lines], kept)
                progress.advance(bar, len(lines))
    return predictions


def score_predictions(cfg: Config, task: Task, predictions: Path) -> dict:
    """The metrics of a predictions file of this config's evaluation (detection: against eval.annotations)."""
    from qlora_rft.evaluation.scoring import score_file

    annotations = resolve_source(cfg.eval.annotations) if cfg.eval.annotations else None
    classes = cfg.eval.classes if annotations else None
    return score_file(task.name, predictions, annotations, classes, protocol=cfg.eval.protocol)


PERCENT = ("mAP", "accuracy", "mIoU", "acc@0.5")  # metrics in percent, shown in the table when present


def main_metric(metrics: dict) -> tuple[str, float]:
    """The headline number of a metrics dict: its task's headline metric (mAP, accuracy, mIoU...)."""
    key = get_task(metrics.get("task", "")).headline
    if key not in metrics:
        raise KeyError(f"no {key} in the {metrics.get('task')} metrics")
    return key, metrics[key]


def metrics_table(metrics: dict, label: str) -> Table:
    table = Table(title=f"{metrics.get('task', '')} evaluation: {label}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in PERCENT:
        if key in metrics:
            table.add_row(f"{key} (%)", "n/a" if metrics[key] is None else f"{metrics[key]:.2f}")
    for key, value in metrics.items():
        if key == "reward" or key.startswith("rewards/"):
            table.add_row(key, "n/a" if value is None else f"{value:.4f}")
    for name, value in (metrics.get("per_class") or {}).items():
        table.add_row(f"  AP {name}", "n/a" if value is None else f"{value:.2f}")
    table.add_row("predictions", str(metrics.get("num_predictions", "")))
    table.add_row("skipped lines", str(metrics.get("skipped", 0)))
    return table
