"""What a task is: one `Task` object with its prompt, parser, rewards, metric function, prediction keys and headline
metric. A task module defines `TASK = Task(...)`; `tasks.TASKS` lists them, and the config, the rewards and the
scorer find everything there (nothing else names a task).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from qlora_rft.errors import DataError
from qlora_rft.tasks.boxes import RELATIVE, Frame, frame_instruction
from qlora_rft.tasks.common import extract_answer

if TYPE_CHECKING:
    from qlora_rft.evaluation.rows import Row, ScoreOptions, Scored

RewardFn = Callable[..., list[float]]  # TRL's signature: fn(completions, **columns) -> one float per completion


@dataclass(frozen=True)
class Reward:
    """A reward function with TRL's signature and the range its values lie in (its tests check it)."""

    fn: RewardFn
    low: float = 0.0
    high: float = 1.0


def same_solution(solution: str, frame: Frame) -> str:
    """A task without boxes writes its solution the same in any frame."""
    return solution


@dataclass(frozen=True)
class Task:
    """Everything a task is. Rewards and evaluation both read answers through `parse` (one parser)."""

    name: str  # what data.task names
    prompt: Callable[[str], str]  # dataset problem -> user text
    parse: Callable[[str, Frame], object]  # (completion, its box frame) -> parsed answer (None when unusable)
    parse_solution: Callable[[str], object] | None  # a solution -> parsed answer (None: a bad row); None: no solution
    rewards: dict[str, Reward]  # its own rewards, by the names rewards.weights uses
    default_weights: dict[str, float]  # rewards.weights when the config leaves it empty
    metrics: Callable[[list["Row"], "ScoreOptions"], "Scored"]  # usable predictions lines -> metrics
    prediction_keys: tuple[str, ...]  # what a predictions line needs to be scored
    headline: str  # the metric that sums a run up (sweeps, reports), a key of the metrics
    thought: str = ""  # fixed reasoning of the supervised warm-up target
    in_frame: Callable[[str, Frame], str] = same_solution  # a solution with its boxes written in a frame
    has_boxes: bool = False  # answers are boxes: a family answering in pixels is told its frame
    needs_annotations: bool = False  # scored against an annotation file (detection's COCO / LVIS JSON): evaluated
    # from its images x classes, a prediction keyed by image_id and category (else by the row's id)
    paper_max_new_tokens: int | None = None  # the original evaluation's; None: it has none (eval.protocol=paper refused)
    one_row_per_image: bool = False  # asks each image file its first row only (the original LISA evaluation)
    read_json: Callable[[Path, str | None], list[dict]] | None = None  # (a .json split, image_root) -> rows, for a
    # task with JSON forms of its own (grounding: LISA's); None: the file is a JSON list of rows, as a .jsonl holds
    read_folder: Callable[[str, str], list[dict] | None] | None = None  # (folder, split) -> rows of a folder layout
    # of its own (grounding: ReasonSeg's), None when the folder is not one
    system: str = ""  # a system prompt before the user turn; empty: the chat template's default

    def ask(self, problem: str, frame: Frame = RELATIVE) -> str:
        """The user text; a box task shown to a family that answers in pixels also asks for that frame."""
        text = self.prompt(problem)
        note = frame_instruction(frame) if self.has_boxes else ""
        return f"{text} {note}" if note else text

    def warmup_target(self, solution: str, frame: Frame = RELATIVE) -> str:
        """The cold-start completion for a solution: a short think block, then the solution's answer (its boxes
        in `frame`). A task without solutions (generic) imitates the row's `solution` column, so it needs one."""
        if self.parse_solution is None and not solution.strip():
            raise DataError(f"data.task={self.name}: a row has no solution to learn from (train.method=sft and "
                            "warmup.steps imitate each row's 'solution' column): add one, or train with GRPO alone")
        return f"<think>{self.thought}</think><answer>{solution_answer(self.in_frame(solution, frame))}</answer>"


def solution_answer(solution: str) -> str:
    found = extract_answer(solution)
    return found if found is not None else solution.strip()
