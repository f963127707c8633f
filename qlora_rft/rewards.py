"""Verifiable rewards with TRL's signature, `fn(completions, **columns) -> list[float]`, a registry by name, and
the user's own rewards from plugin files (`rewards.plugins`).

The built-in registry is `format` plus every registered task's own rewards (`Task.rewards`). Each is total: any
completion in, a finite float in its documented range out, never an exception. Completions are plain strings or
TRL's conversational form; `solution` is the dataset's `<answer>...</answer>`; `frame` (optional, one per
completion) is the box coordinates the model was asked for (`tasks.boxes.Frame`): box answers in an absolute frame
are mapped to the dataset's 0-1000 scale first, so a box scores the same in any family.
They plug into TRL's GRPOTrainer as they are (`reward_funcs=[format_reward, classification_reward]`).
A run scores with a `RewardSet`: as TRL does, each function gets the completions' text and every column of the row
(one value per completion), a copy of its own, so that no function can change what another scores; one that raises,
returns a wrong length or a value that is not finite, or whose weighted sum is not finite, stops the run with a
RewardError naming it and the row. A plugin's code runs only inside `run_plugin` (its import, each call): within
rewards.plugin_timeout seconds, and with sys.exit or KeyboardInterrupt turned into an error naming it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import inspect
import math
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from qlora_rft.errors import ConfigError, RewardError
from qlora_rft.tasks import TASKS, Task, get_task
from qlora_rft.tasks.boxes import RELATIVE, Frame
from qlora_rft.tasks.common import completion_text, has_format
from qlora_rft.tasks.task import Reward, RewardFn

if TYPE_CHECKING:
    from qlora_rft.config import RewardConfig

BUILT_IN = "built-in"
MAX_REWARD = 1e15  # a weighted reward beyond this (a group's squared deviations overflow float32) stops the run
MAX_TIMEOUT = 1e9  # seconds (31 years): a longer rewards.plugin_timeout is no limit (the OS timer takes no more)


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion is exactly `<think>..</think>` then `<answer>..</answer>`, else 0.0.  Range [0, 1].

    >>> format_reward(["<think>red</think><answer>red circle</answer>", "red circle"])
    [1.0, 0.0]
    """
    return [float(has_format(completion_text(c))) for c in completions]


def builtin_rewards() -> dict[str, Reward]:
    """`format` and every registered task's own rewards, by the names rewards.weights uses."""
    found = {"format": Reward(format_reward)}
    for task in TASKS.values():
        found.update(task.rewards)
    return found


REWARDS: dict[str, RewardFn] = {name: reward.fn for name, reward in builtin_rewards().items()}
RANGES: dict[str, tuple[float, float]] = {name: (reward.low, reward.high) for name, reward in builtin_rewards().items()}

# The shipped tasks' rewards under their public names (e.g. TRL's `reward_funcs=[classification_reward]`).
classification_reward = REWARDS["classification"]  # 1.0 when the answer names the solution's class
iou_reward = REWARDS["iou"]  # detection: sum of matched IoUs / max(#truth, #predictions)
confidence_reward = REWARDS["confidence"]  # detection: mean of (confidence if matched else 1 - confidence)
grounding_reward = REWARDS["grounding"]  # reasoning grounding: GIoU + 1, in [0, 2]


def default_weights(task: str) -> dict[str, float]:
    """The task's own reward weights (what an empty rewards.weights means)."""
    return dict(get_task(task).default_weights)


def score(completions: list[str], solution: str, weights: dict[str, float],
          frame: Frame = RELATIVE) -> dict[str, list[float]]:
    """Each named built-in reward of the G completions of one prompt: {name: [G floats]}."""
    found = builtin_rewards()
    rewards = RewardSet(dict(weights), {name: found[name].fn for name in weights}, dict.fromkeys(weights, BUILT_IN))
    return rewards.score(completions, {"solution": solution}, frame)


# ---------------------------------------------------------------------------------------------------------- a run's


@dataclass(frozen=True)
class RewardSet:
    """The weighted rewards of a run, built-in or from plugin files, by name."""

    weights: dict[str, float]
    functions: dict[str, RewardFn]
    origins: dict[str, str]  # name -> BUILT_IN or the plugin file defining it (for messages)
    timeout: float = 0.0  # seconds a plugin function may take per call (rewards.plugin_timeout); 0: no limit

    def score(self, completions: list[str], columns: dict, frame: Frame = RELATIVE,
              row: int | None = None) -> dict[str, list[float]]:
        """Each reward of the completions of one row: {name: [one float per completion]}.

        Every function is called as `fn(completions, frame=[...], **{column: [...]})`, each column's value repeated
        once per completion (TRL's convention), on a copy of its own. `row` names the row in a RewardError.
        """
        n = len(completions)
        kwargs = {name: [value] * n for name, value in columns.items()} | {"frame": [frame] * n}
        return {name: self._checked(name, completions, kwargs, row) for name in self.weights}

    def weighted(self, values: dict[str, list[float]], row: int | None = None) -> list[float]:
        """The reward of each completion: the weighted sum of its rewards (`values` as `score` returns them). A sum
        that is not finite, or beyond +-MAX_REWARD, is a RewardError naming the rewards and their values."""
        totals = []
        for k in range(len(next(iter(values.values()), []))):
            total = sum(self.weights[name] * values[name][k] for name in self.weights)
            if not abs(total) <= MAX_REWARD:
                terms = ", ".join(f"{name!r} {values[name][k]:.3g} x {self.weights[name]:g}" for name in self.weights)
                on = "" if row is None else f" on row {row}"
                raise RewardError(f"the weighted reward of completion {k}{on} is {total:.3g} ({terms}), beyond "
                                  f"+-{MAX_REWARD:.0e} where a group's statistics overflow: scale those rewards or "
                                  "their rewards.weights down")
            totals.append(total)
        return totals

    def _checked(self, name: str, completions: list[str], kwargs: dict, row: int | None) -> list[float]:
        """One function's values, or a RewardError when it raised, returned a wrong length or a non-finite value."""
        plugin = self.origins[name] != BUILT_IN
        where = f"reward {name!r}" + (f" (from {self.origins[name]})" if plugin else "")
        on = "" if row is None else f" on row {row}"
        function, own = self.functions[name], copy.deepcopy(kwargs)  # its own copy: it may change it at will
        values = run_plugin(lambda: list(function(list(completions), **own)), where, on,
                            self.timeout if plugin else 0, RewardError)
        if len(values) != len(completions):
            raise RewardError(f"{where} returned {len(values)} values for the {len(completions)} completions{on}: "
                              "return one float per completion")
        out = []
        for k, value in enumerate(values):
            number = _finite(value)
            if number is None:
                raise RewardError(f"{where} returned {value!r:.40} for completion {k}{on}: every value must be a "
                                  "finite number")
            out.append(number)
        return out


def _finite(value) -> float | None:
    """`value` as a finite float (ints, floats, bools, NumPy scalars), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def reward_set(cfg: "RewardConfig", task: Task) -> RewardSet:
    """The rewards a run uses: rewards.weights (empty: the task's defaults), each found among the built-in
    rewards or in the rewards.plugins files."""
    weights = dict(cfg.weights or task.default_weights)
    found = {name: (reward.fn, BUILT_IN) for name, reward in builtin_rewards().items()}
    found |= plugin_rewards(cfg.plugins, cfg.plugin_timeout)
    unknown = [name for name in weights if name not in found]
    if unknown:
        raise ConfigError(f"rewards.weights names unknown reward {unknown[0]!r}: known are {', '.join(found)}")
    return RewardSet(weights, {name: found[name][0] for name in weights}, {name: found[name][1] for name in weights},
                     cfg.plugin_timeout)


# ---------------------------------------------------------------------------------------------------------- plugins


class _TimedOut(BaseException):
    """Raised into plugin code that ran past its time limit; a BaseException, so `except Exception` in the plugin
    does not swallow it."""


def run_plugin(call: Callable, where: str, on: str, timeout: float, error: type[Exception]):
    """`call()`, which runs a plugin's code, within `timeout` seconds (0: no limit); any way it fails (an exception,
    sys.exit, KeyboardInterrupt, the time limit) is an `error` naming `where` and `on` (the row), on one line."""
    try:
        with _time_limit(timeout):
            return call()
    except _TimedOut:
        raise error(f"{where} did not return within rewards.plugin_timeout={timeout:g} s{on}: make it faster, or "
                    "raise rewards.plugin_timeout (0: no limit)") from None
    except SystemExit as e:
        raise error(f"{where} called sys.exit({e.code!r}){on}: plugin code must return, never exit") from None
    except KeyboardInterrupt:
        raise error(f"{where} was interrupted (KeyboardInterrupt){on}") from None
    except BaseException as e:  # an Exception, or any other BaseException a plugin may raise
        raise error(f"{where} raised {type(e).__name__}{on}: {_first_line(e)}") from e


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _TimedOut in this thread once `seconds` have passed (SIGALRM; the main thread only, elsewhere no
    limit). Any timer already set is put back afterwards, less the time spent."""
    if not 0 < seconds < MAX_TIMEOUT or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        left, _ = signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (seconds - left), 1e-3))


@dataclass(frozen=True)
class Plugin:
    """A plugin file as imported: its path, the sha256 of its bytes, and its reward functions by name."""

    path: str
    sha256: str
    functions: dict[str, RewardFn]


def file_sha256(path: str) -> str:
    """The sha256 of a plugin file's bytes; a ConfigError when it cannot be read."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"rewards.plugins: {file} does not exist: give the path of a Python file whose functions "
                          "fn(completions, **columns) -> list[float] are rewards")
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError as e:
        raise ConfigError(f"rewards.plugins: cannot read {file}: {e.strerror or e}") from None


def load_plugin(path: str, timeout: float = 0.0) -> Plugin:
    """The plugin file at `path`, imported once per content (a ConfigError when missing or failing to import, or
    when its import runs past `timeout` seconds)."""
    return _import_plugin(str(path), file_sha256(path), timeout)


@functools.lru_cache(maxsize=None)
def _import_plugin(path: str, sha256: str, timeout: float) -> Plugin:
    name = f"qlora_rft_plugin_{sha256[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"rewards.plugins: {path} is not a Python file: name a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # what dataclasses and pickling look modules up by
    try:
        run_plugin(lambda: spec.loader.exec_module(module), f"rewards.plugins: {path}", " while importing",
                   timeout, ConfigError)
    except ConfigError as e:
        del sys.modules[name]
        raise ConfigError(str(e)) from None
    functions = {}
    for attr, value in vars(module).items():
        if _is_reward(value, module) and not attr.startswith("_"):
            if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(value).parameters.values()):
                raise ConfigError(f"rewards.plugins: {attr}() in {path} must take **columns (every column of the "
                                  f"row is passed by name): def {attr}(completions, **columns)")
            functions[attr] = value
    if not functions:
        raise ConfigError(f"rewards.plugins: {path} defines no reward: write def NAME(completions, **columns) -> "
                          "list[float] at module level")
    return Plugin(path, sha256, functions)


def _is_reward(value, module) -> bool:
    """A function defined in the plugin file itself whose first parameter is `completions`."""
    if not inspect.isfunction(value) or value.__module__ != module.__name__:
        return False
    parameters = list(inspect.signature(value).parameters)
    return bool(parameters) and parameters[0] == "completions"


def plugin_rewards(paths: list[str], timeout: float = 0.0) -> dict[str, tuple[RewardFn, str]]:
    """Every plugin file's rewards by name, with the file defining each (each file's import within `timeout`
    seconds). A name of a built-in reward, or one that two files define, is refused (ConfigError)."""
    builtin = builtin_rewards()
    found: dict[str, tuple[RewardFn, str]] = {}
    for path in paths:
        for name, fn in load_plugin(path, timeout).functions.items():
            if name in builtin:
                raise ConfigError(f"rewards.plugins: {path} defines {name}(), the name of a built-in reward: rename it")
            if name in found:
                raise ConfigError(f"rewards.plugins: {name}() is defined in {found[name][1]} and in {path}: rename "
                                  "one")
            found[name] = (fn, path)
    return found
