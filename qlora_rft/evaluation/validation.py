"""Evaluation during training (train.eval_steps): every N steps and at the end, the task's evaluation of the current
policy (greedy, eval.limit prompts of data.eval, decoded by a sampler of eval.decode and eval.sampling_weights)
through the functions `qlora-rft eval` runs (`runner.predict`, `runner.score_predictions`). Predictions and
metrics.json go to train.output_dir/evals/step-STEP/, the metrics into that step's metrics.jsonl line as eval/<metric>.

Training is untouched: the policy goes back to its training mode and every RNG to its state, so a run trains
bit-exactly as one without evaluation. Under a launch (DDP, ZeRO-3) every process answers its share of the prompts,
with the weights gathered whole under ZeRO-3 as for sampling; the main process scores them all, in one order.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_rft import checkpoint
from qlora_rft.errors import DataError
from qlora_rft.evaluation.runner import (METRICS, PREDICTIONS, EvalItem, eval_items, fitting_prompts, predict,
                                         record_key, resolve_asking, score_predictions)
from qlora_rft.sampling import Sampler, make_sampler
from qlora_rft.tasks import Task, get_task

if TYPE_CHECKING:
    from qlora_rft.run import Run

FOLDER = "evals"  # under train.output_dir: step-STEP/ per evaluation


@dataclass
class Validation:
    """The evaluation of a run: its prompts, read once, and when it is due (never when `every` is 0)."""

    every: int
    last_step: int
    items: list[EvalItem]
    task: Task | None = None  # the task as eval.protocol asks and reads it, as `qlora-rft eval` does
    sampler: Sampler | None = None  # eval.decode and eval.sampling_weights on the run's policy

    @classmethod
    def of(cls, run: Run) -> "Validation":
        """Read the evaluation prompts (none when train.eval_steps is 0) and refuse a set none of whose prompts fits
        data.max_prompt_length, before the first step; a resumed run drops the evaluations past its checkpoint."""
        cfg = run.cfg
        if not cfg.train.eval_steps:
            return cls(0, run.steps, [])
        task = get_task(cfg.data.task, cfg.eval.protocol)
        asking = resolve_asking(cfg, task)
        with run.accelerator.main_process_first():  # data built once, by the main process
            items = eval_items(cfg, task, asking)
        fitting, _ = fitting_prompts(run.policy.processor, task, items, cfg, asking)
        if not fitting:
            raise DataError(f"train.eval_steps: none of the {len(items)} evaluation prompts of "
                            f"{cfg.data.eval or cfg.eval.annotations} fits data.max_prompt_length="
                            f"{cfg.data.max_prompt_length}: raise it, or choose other data.eval")
        if run.accelerator.is_main_process:
            drop_later(run.out / FOLDER, run.start_step)
        sampler = make_sampler(cfg.eval, run.policy, run.accelerator, run.model)
        return cls(cfg.train.eval_steps, run.steps, items, task, sampler)

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.last_step)

    def metrics(self, run: Run, step: int) -> dict:
        """At an evaluation step, eval/<metric> of the current policy on the main process ({} on the others, and at
        other steps). Every process of a launch calls this at every step."""
        if not self.due(step):
            return {}
        started = time.perf_counter()
        lines = answer(run, self.sampler, self.task, self.items)
        if not run.accelerator.is_main_process:
            return {}
        folder = run.out / FOLDER / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PREDICTIONS).write_text("".join(json.dumps(line) + "\n" for line in lines))
        metrics = score_predictions(run.cfg, self.task, folder / PREDICTIONS)
        from qlora_rft.evaluation.scoring import write_metrics

        write_metrics(metrics, folder / METRICS)
        values = {f"eval/{key}": value for key, value in metrics.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return {**values, "eval/seconds": time.perf_counter() - started}


def answer(run: Run, sampler: Sampler, task: Task, items: list[EvalItem]) -> list[dict]:
    """The predictions lines of `items` in their order: this process answers every world_size-th one from its rank,
    and the main process gets them all (the others: []). RNG states and the training mode are left as they were."""
    rank, world = run.launch.rank, run.launch.world_size
    state = checkpoint.rng_state()
    try:
        with sampler.synced():  # under ZeRO-3: the weights gathered whole; merged/int8/fp8: the copy made
            lines = [line for batch in predict(sampler, task, items[rank::world], run.cfg) for line in batch]
    finally:
        checkpoint.set_rng_state(state)
    if world > 1:
        from accelerate.utils import gather_object

        lines = gather_object(lines)  # every process's lines, on every process
    if not run.accelerator.is_main_process:
        return []
    order = {item.key: i for i, item in enumerate(items)}
    return sorted(lines, key=lambda line: order[record_key(line, task.needs_annotations)])


def drop_later(folder: Path, start_step: int) -> None:
    """Remove the evaluations of steps after `start_step` (a resumed run makes them again; a fresh run: all)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith("step-") and path.name[5:].isdigit() and int(path.name[5:]) > start_step:
            shutil.rmtree(path)
