"""Experiment trackers named by train.report_to: TensorBoard (train.output_dir/tensorboard/) and W&B
(train.output_dir/wandb/; offline with WANDB_MODE=offline). `runlog` feeds them from the one place metrics are written,
so every metrics.jsonl value reaches them as a scalar under its own name at its step, whoever wrote it (GRPO, sft, the
evaluation during training). Both packages are optional extras, imported only when named; `require` refuses a missing
one before anything loads. A resumed run continues the same W&B run and drops TensorBoard events past its checkpoint.
"""

from __future__ import annotations

import math
import os
import secrets
from importlib.util import find_spec
from pathlib import Path

from qlora_rft.errors import ConfigError


def require(names: list[str]) -> None:
    """A one-line ConfigError naming the extra to install, for a tracker whose package is missing."""
    for name in names:
        if name != "none" and find_spec(name) is None:
            raise ConfigError(f"train.report_to={name} needs the {name} package: pip install 'qlora-rft[{name}]' "
                              f"(from a checkout: pip install -e '.[{name}]'), or leave {name} out of train.report_to")


def scalars(line: dict) -> dict[str, float]:
    """The values of a metrics line a tracker plots: finite numbers, without the step.

    >>> scalars({"step": 3, "loss": 0.5, "eval/task": "classification", "kl": None, "n": 2})
    {'loss': 0.5, 'n': 2.0}
    """
    return {key: float(value) for key, value in line.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def flat(config: dict, prefix: str = "") -> dict:
    """A nested config as `section.key` hyperparameters; lists as their text.

    >>> flat({"train": {"seed": 0, "report_to": ["tensorboard"]}})
    {'train.seed': 0, 'train.report_to': "['tensorboard']"}
    """
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table (TensorBoard renders text as markdown); cells on one line, pipes escaped.

    >>> print(markdown_table([{"completion": "a|b\\nc", "reward": 1.0}]))
    | completion | reward |
    |---|---|
    | a\\|b c | 1.0 |
    """
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(key, "")) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoard:
    """Event files in `folder`; the config as the HParams dashboard's hyperparameters."""

    def __init__(self, folder: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: events of steps after the checkpoint resumed from (written before a crash) are hidden
        self._writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            for summary in hparams(flat(config), {}):
                self._writer.file_writer.add_summary(summary)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def text(self, name: str, rows: list[dict], step: int) -> None:
        self._writer.add_text(name, markdown_table(rows), step)

    def close(self) -> None:
        self._writer.close()


class WandB:
    """A W&B run under `folder`/wandb, named after the output folder (project: $WANDB_PROJECT, else qlora-rft). Its
    id is kept in wandb/run_id, so that a resumed training run continues it."""

    def __init__(self, folder: Path, config: dict, start_step: int):
        import wandb

        id_file = folder / "wandb" / "run_id"
        resumed = start_step and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)  # W&B ids: [a-z0-9]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        self._wandb = wandb
        try:
            self._run = wandb.init(dir=str(folder), project=os.environ.get("WANDB_PROJECT", "qlora-rft"),
                                   name=folder.resolve().name, id=run_id, resume="allow", config=config,
                                   settings=wandb.Settings(console="off"))  # rich's progress bar keeps the terminal
        except wandb.errors.Error as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"train.report_to=wandb: W&B did not start ({why}): run `wandb login`, or set "
                              f"WANDB_MODE=offline to keep the run in {folder / 'wandb'} only") from None

    def log(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)  # a step already in a resumed run's history is dropped by W&B

    def text(self, name: str, rows: list[dict], step: int) -> None:
        keys = list(rows[0])
        table = self._wandb.Table(columns=keys, data=[[row.get(key) for key in keys] for row in rows])
        self._run.log({name: table}, step=step)

    def close(self) -> None:
        self._run.finish()


class Trackers:
    """The trackers of a run as one: each call goes to every one of them; with none, calls do nothing."""

    def __init__(self, trackers: list | None = None):
        self._trackers = trackers or []

    def log(self, line: dict) -> None:
        values = scalars(line)
        for tracker in self._trackers:
            tracker.log(values, line["step"])

    def text(self, name: str, rows: list[dict], step: int) -> None:
        for tracker in self._trackers if rows else []:
            tracker.text(name, rows, step)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()


def open_trackers(names: list[str], folder: Path, config: dict, start_step: int = 0) -> Trackers:
    """The trackers `names` (train.report_to) writing under `folder` (train.output_dir)."""
    require(names)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {"tensorboard": lambda: TensorBoard(folder / "tensorboard", config, start_step),
             "wandb": lambda: WandB(folder, config, start_step)}
    return Trackers([kinds[name]() for name in names if name != "none"])
