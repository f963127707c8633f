"""Task families, registered by name: Visual-RFT's three and `generic` (your own data, scored by its rewards). Each
module defines its `Task` (prompt, parser, rewards, metric function, prediction keys, headline metric), and `TASKS`
lists them.

Adding a task is one module defining `TASK = Task(...)` plus its line in `TASKS`; the config's `data.task` choices,
the reward registry and the scorer all read this registry. `get_task(name)` refuses an unknown name; `get_task(name,
"paper")` is the task as the original evaluation asks and reads it (eval.protocol=paper; only grounding differs).
"""

from __future__ import annotations

from qlora_rft.errors import ConfigError
from qlora_rft.tasks import classification, detection, generic, grounding
from qlora_rft.tasks.common import FORMAT_INSTRUCTION
from qlora_rft.tasks.task import Reward, Task  # noqa: F401  (the public names)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        classification.TASK,
        detection.TASK,
        grounding.TASK,
        generic.TASK,
    )
}

# The tasks whose original evaluation asks or reads otherwise (eval.protocol=paper), by name.
PAPER_TASKS: dict[str, Task] = {task.name: task for task in (grounding.PAPER_TASK,)}


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
        if task.thought:
            lines.append(f"<think>{task.thought}</think><answer></answer>")
    lines += synthetic.corpus_lines()
    return lines
