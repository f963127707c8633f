"""The supervised baseline of the paper's comparison: the same 4-bit base and LoRA adapters, trained on the data's
solutions with cross-entropy (prompt tokens masked), on the run setup of run.py (schedule, checkpoints, resume).

Each step is supervised.py's, the same step the tiny base's warm-up takes.
"""

from __future__ import annotations

import time

from qlora_rft.config import Config
from qlora_rft.distributed import NonFiniteStep
from qlora_rft.errors import TrainingError
from qlora_rft.evaluation.validation import Validation
from qlora_rft.run import TrainResult, non_finite_message, prepare_run
from qlora_rft.supervised import supervised_step


def train_sft(cfg: Config, resume: bool = False, console=None, log: bool = True) -> TrainResult:
    """Supervised fine-tuning: each step, `train.prompts_per_step` examples, target = think + the solution."""
    run = prepare_run(cfg, resume, console)
    logger = run.logger(console, log, shown=("epoch", "loss", "tokens_per_second"))
    validation = Validation.of(run)  # train.eval_steps
    metrics = []
    started = time.perf_counter() - run.seconds_before  # the run's clock, across resumed sessions
    with logger:
        for step in range(run.start_step + 1, run.steps + 1):
            step_start = time.perf_counter()
            try:
                done = supervised_step(run.policy, run.task, run.examples(step), cfg.data, cfg.grpo.logprob_chunk,
                                       run.updates)
            except NonFiniteStep as e:  # stopped before the update is applied or saved
                raise TrainingError(non_finite_message(cfg, step, e)) from None
            seconds = time.perf_counter() - step_start
            line = {"step": step, "epoch": run.epoch(step), "loss": done.loss, "grad_norm": done.grad_norm,
                    "learning_rate": run.scheduler.get_last_lr()[0], "target_tokens": done.target_tokens,
                    "tokens_per_second": done.tokens / max(seconds, 1e-9),
                    "step_seconds": seconds, "elapsed_seconds": time.perf_counter() - started}
            line.update(validation.metrics(run, step))  # eval/<metric> at an evaluation step
            metrics.append(line)
            logger.log(line, write=step % cfg.train.logging_steps == 0 or step == run.steps or validation.due(step))
            run.checkpoint(step, time.perf_counter() - started)
    return run.finish(metrics, time.perf_counter() - started)
