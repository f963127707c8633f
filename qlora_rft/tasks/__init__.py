"""Task families of Visual-RFT. Each owns its prompt, its answer parser, its per-sample score and default rewards.

`get_task(name)` returns a `Task`; rewards and evaluation both go through the task's own parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qlora_rft.errors import ConfigError
from qlora_rft.tasks import classification, detection, grounding
from qlora_rft.tasks.common import FORMAT_INSTRUCTION


@dataclass(frozen=True)
class Task:
    name: str
    prompt: Callable[[str], str]  # dataset problem -> user text
    parse: Callable[[str], object]  # completion -> parsed answer (None when unusable)
    parse_solution: Callable[[str], object]  # a dataset's solution -> parsed answer (None: a bad row)
    score: Callable[[str, str], float]  # (completion, solution) -> per-sample score (accuracy, IoU, ...)
    thought: str  # fixed reasoning for the supervised warm-up target
    default_rewards: dict = field(default_factory=dict)

    def warmup_target(self, solution: str) -> str:
        """The cold-start completion for a solution: a short think block, then the solution's answer."""
        return f"<think>{self.thought}</think><answer>{solution_answer(solution)}</answer>"


def solution_answer(solution: str) -> str:
    from qlora_rft.tasks.common import extract_answer

    found = extract_answer(solution)
    return found if found is not None else solution.strip()


def _task(name: str, module, default_rewards: dict[str, float]) -> Task:
    """A Task from a task module: every one defines prompt, parse, parse_solution, score and THOUGHT."""
    return Task(name, module.prompt, module.parse, module.parse_solution, module.score, module.THOUGHT,
                default_rewards)


TASKS: dict[str, Task] = {
    "classification": _task("classification", classification, {"format": 1.0, "classification": 1.0}),
    "detection": _task("detection", detection, {"format": 1.0, "iou": 1.0, "confidence": 1.0}),
    "grounding": _task("grounding", grounding, {"format": 1.0, "grounding": 1.0}),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def corpus_lines() -> list[str]:
    """Text of every task's prompts and answers: what the local tokenizer is trained on."""
    from qlora_rft.tasks import synthetic

    lines = [FORMAT_INSTRUCTION, "You are a helpful assistant.", "system user assistant"]
    for task in TASKS.values():
        lines.append(f"<think>{task.thought}</think><answer></answer>")
    lines += synthetic.corpus_lines()
    return lines
