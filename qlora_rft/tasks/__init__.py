"""Task families of Visual-RFT. Each owns its prompt, its answer parser, its per-sample score and default rewards.

`get_task(name)` returns a `Task`; rewards and evaluation both go through the task's own parser. `get_task(name,
"paper")` is the task as the original evaluation asks and reads it (eval.protocol=paper; only grounding differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from qlora_rft.errors import ConfigError
from qlora_rft.tasks import classification, detection, grounding
from qlora_rft.tasks.boxes import RELATIVE, Frame, frame_instruction
from qlora_rft.tasks.common import FORMAT_INSTRUCTION


@dataclass(frozen=True)
class Task:
    name: str
    prompt: Callable[[str], str]  # dataset problem -> user text
    parse: Callable[[str, Frame], object]  # (completion, its box frame) -> parsed answer (None when unusable)
    parse_solution: Callable[[str], object]  # a dataset's solution -> parsed answer (None: a bad row)
    score: Callable[[str, str, Frame], float]  # (completion, solution, frame) -> per-sample score (accuracy, IoU..)
    in_frame: Callable[[str, Frame], str]  # a solution with its boxes written in a frame
    thought: str  # fixed reasoning for the supervised warm-up target
    default_rewards: dict = field(default_factory=dict)
    has_boxes: bool = False
    system: str = ""  # a system prompt before the user turn; empty: the chat template's default

    def ask(self, problem: str, frame: Frame = RELATIVE) -> str:
        """The user text; a box task shown to a family that answers in pixels also asks for that frame."""
        text = self.prompt(problem)
        note = frame_instruction(frame) if self.has_boxes else ""
        return f"{text} {note}" if note else text

    def warmup_target(self, solution: str, frame: Frame = RELATIVE) -> str:
        """The cold-start completion for a solution: a short think block, then the solution's answer (its boxes
        in `frame`)."""
        return f"<think>{self.thought}</think><answer>{solution_answer(self.in_frame(solution, frame))}</answer>"


def solution_answer(solution: str) -> str:
    from qlora_rft.tasks.common import extract_answer

    found = extract_answer(solution)
    return found if found is not None else solution.strip()


def _task(name: str, module, default_rewards: dict[str, float], has_boxes: bool) -> Task:
    """A Task from a task module: every one defines prompt, parse, parse_solution, score, in_frame and THOUGHT."""
    return Task(name, module.prompt, module.parse, module.parse_solution, module.score, module.in_frame,
                module.THOUGHT, default_rewards, has_boxes)


TASKS: dict[str, Task] = {
    "classification": _task("classification", classification, {"format": 1.0, "classification": 1.0}, False),
    "detection": _task("detection", detection, {"format": 1.0, "iou": 1.0, "confidence": 1.0}, True),
    "grounding": _task("grounding", grounding, {"format": 1.0, "grounding": 1.0}, True),
}


# The original evaluation's LISA prompt (with its system prompt) and reading: the first box anywhere in the text.
PAPER_TASKS: dict[str, Task] = {
    "grounding": replace(TASKS["grounding"], prompt=grounding.paper_prompt, parse=grounding.parse_first_box,
                         score=grounding.paper_score, system=grounding.PAPER_SYSTEM),
}


def get_task(name: str, protocol: str = "ours") -> Task:
    """The task by name; under the paper protocol (eval.protocol) its original-evaluation variant, if it has one."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return PAPER_TASKS.get(name, TASKS[name]) if protocol == "paper" else TASKS[name]


def corpus_lines() -> list[str]:
    """Text of every task's prompts and answers: what the local tokenizer is trained on."""
    from qlora_rft.tasks import synthetic

    lines = [FORMAT_INSTRUCTION, "You are a helpful assistant.", "system user assistant"]
    for task in TASKS.values():
        lines.append(f"<think>{task.thought}</think><answer></answer>")
    lines += synthetic.corpus_lines()
    return lines
