"""Your own rewards (`rewards.plugins`): a file's reward functions are usable by name, get the completions' text and
the row's columns, are logged like the built-in ones and recorded with the run; a bad plugin is a one-line error."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from qlora_rft.cli import main
from qlora_rft.config import load_config
from qlora_rft.errors import ConfigError, RewardError
from qlora_rft.rewards import reward_set
from qlora_rft.tasks import get_task

PLUGIN = '''
import math  # imported names are not rewards
from dataclasses import dataclass


@dataclass
class Note:  # a dataclass needs its module registered: plugins are
    text: str = ""


def words(text):  # a helper: its first parameter is not `completions`
    return len(text.split())


def _private(completions, **columns):
    return [9.0] * len(completions)


def brevity(completions, **columns):
    """1 / (1 + words): shorter is better."""
    return [1.0 / (1 + words(c)) for c in completions]


def names_solution(completions, solution, **columns):
    """1.0 when the completion's text contains the row's solution column."""
    return [float(s in c) for c, s in zip(completions, solution)]
'''


def write(path, text: str):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def plugin(tmp_path):
    return write(tmp_path / "my_rewards.py", PLUGIN)


def test_plugin_functions_are_rewards_by_name_with_the_columns(plugin, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a relative path is kept absolute
    cfg = load_config(None, ["rewards.plugins=my_rewards.py",
                             "rewards.weights={format: 1, brevity: 0.5, names_solution: 2}"])
    assert cfg.rewards.plugins == [str(plugin)]
    assert cfg.rewards.plugin_sha256 == {str(plugin): hashlib.sha256(plugin.read_bytes()).hexdigest()}
    rewards = reward_set(cfg.rewards, get_task("classification"))
    got = rewards.score(["<think>a</think><answer>red circle</answer>", "red"], {"solution": "red circle"}, row=4)
    assert got == {"format": [1.0, 0.0], "brevity": [1 / 3, 1 / 2], "names_solution": [1.0, 0.0]}
    assert rewards.origins == {"format": "built-in", "brevity": str(plugin), "names_solution": str(plugin)}
    with pytest.raises(ConfigError, match="unknown reward '_private'"):
        load_config(None, ["rewards.plugins=my_rewards.py", "rewards.weights={_private: 1}"])


@pytest.mark.parametrize(
    "body,message",
    [
        ("return [1.0 / 0 for c in completions]",
         r"reward 'bad' \(from .*bad.py\) raised ZeroDivisionError on row 7: float division by zero"),
        ("return [1.0]", r"reward 'bad' \(from .*bad.py\) returned 1 values for the 2 completions on row 7: return "
                         "one float per completion"),
        ("return [1.0, float('nan')]", r"returned nan for completion 1 on row 7: every value must be a finite number"),
        ("return [1.0, None]", r"returned None for completion 1 on row 7"),
    ],
)
def test_a_reward_that_fails_names_itself_and_the_row(tmp_path, body, message):
    path = write(tmp_path / "bad.py", f"def bad(completions, **columns):\n    {body}\n")
    cfg = load_config(None, [f"rewards.plugins={path}", "rewards.weights={bad: 1}"])
    with pytest.raises(RewardError, match=message) as caught:
        reward_set(cfg.rewards, get_task("classification")).score(["a", "b"], {"solution": "x"}, row=7)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "source,message",
    [
        (None, "does not exist: give the path of a Python file"),
        ("def format(completions, **columns):\n    return [1.0] * len(completions)\n",
         r"defines format\(\), the name of a built-in reward: rename it"),
        ("import no_such_module_here\n",
         "raised ModuleNotFoundError while importing: No module named 'no_such_module_here'"),
        ("def broken(completions:\n", "raised SyntaxError while importing"),
        ("def strict(completions, solution):\n    return [0.0]\n", r"strict\(\) in .* must take \*\*columns"),
        ("x = 1\n", "defines no reward: write def NAME"),
    ],
)
def test_a_bad_plugin_file_is_a_one_line_config_error(tmp_path, source, message):
    path = tmp_path / "plugin.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(None, [f"rewards.plugins={path}"])
    assert "\n" not in str(caught.value)


def test_two_files_defining_one_name_and_a_changed_file_are_refused(plugin, tmp_path):
    other = write(tmp_path / "other.py", "def brevity(completions, **columns):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError, match=r"brevity\(\) is defined in .*my_rewards.py and in .*other.py"):
        load_config(None, [f"rewards.plugins={plugin},{other}"])
    recorded = load_config(None, [f"rewards.plugins={plugin}"]).rewards.plugin_sha256
    plugin.write_text(PLUGIN + "\n# edited\n")
    with pytest.raises(ConfigError, match="has changed since rewards.plugin_sha256 recorded it"):
        load_config(None, [f"rewards.plugins={plugin}", f"rewards.plugin_sha256={json.dumps(recorded)}"])


def test_a_missing_plugin_stops_the_cli_before_any_model_loads(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qlora_rft", "train", "configs/tiny_demo.yaml",
                           f"rewards.plugins={tmp_path / 'nowhere.py'}", f"train.output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: rewards.plugins: {tmp_path / 'nowhere.py'} does not exist: "
                                                "give the path of a Python file whose functions fn(completions, "
                                                "**columns) -> list[float] are rewards"]
    assert not (tmp_path / "run").exists()


def test_a_plugin_reward_trains_is_logged_and_recorded(plugin, tiny_overrides, tmp_path):
    from qlora_rft.trainer import train

    cfg = load_config(None, [*tiny_overrides, f"rewards.plugins={plugin}",
                             "rewards.weights={format: 1, names_solution: 1, brevity: 0}"])
    train(cfg)
    out = tmp_path / "run"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert 0.0 <= line["rewards/names_solution"] <= 1.0 and 0.0 < line["rewards/brevity"] <= 1.0
    recorded = yaml.safe_load((out / "config.yaml").read_text())["rewards"]
    assert recorded["plugins"] == [str(plugin)]
    assert recorded["plugin_sha256"] == {str(plugin): hashlib.sha256(plugin.read_bytes()).hexdigest()}


def test_a_failing_plugin_stops_training_with_one_line(tmp_path, tiny_overrides, capsys):
    path = write(tmp_path / "fails.py", "def fails(completions, solution, **columns):\n"
                                        "    raise ValueError(f'cannot read {solution[0]}')\n")
    code = main(["train", "configs/tiny_demo.yaml", *tiny_overrides, "warmup.steps=0", "grpo.generation_chunk=0",
                 f"rewards.plugins={path}",
                 "rewards.weights={format: 1, fails: 1}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert re.fullmatch(rf"error: reward 'fails' \(from {re.escape(str(path))}\) raised ValueError on row \d+: "
                        r"cannot read <answer>.*</answer>", err)


@pytest.mark.parametrize(
    "body,message",
    [
        ("import sys; sys.exit(0)", r"reward 'bad' \(from .*bad.py\) called sys.exit\(0\) on row 7: plugin code must "
                                    "return, never exit"),
        ("raise KeyboardInterrupt", r"reward 'bad' \(from .*bad.py\) was interrupted \(KeyboardInterrupt\) on row 7"),
        ("while True:\n        try:\n            pass\n        except Exception:\n            pass",
         r"reward 'bad' \(from .*bad.py\) did not return within rewards.plugin_timeout=0.5 s on row 7: make it "
         r"faster, or raise rewards.plugin_timeout \(0: no limit\)"),
        ("return (1.0 for _ in iter(int, 1))",  # a generator that never ends: consumed within the limit too
         r"did not return within rewards.plugin_timeout=0.5 s on row 7"),
    ],
)
def test_a_plugin_that_exits_or_never_returns_is_an_error_naming_it(tmp_path, body, message):
    import signal
    import time

    class Hung(BaseException):  # the test's own limit, should the plugin's never act
        pass

    def hung(*_):
        raise Hung

    path = write(tmp_path / "bad.py", f"def bad(completions, **columns):\n    {body}\n")
    cfg = load_config(None, [f"rewards.plugins={path}", "rewards.weights={bad: 1}", "rewards.plugin_timeout=0.5"])
    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        started = time.monotonic()
        with pytest.raises(RewardError, match=message) as caught:
            reward_set(cfg.rewards, get_task("classification")).score(["a", "b"], {"solution": "x"}, row=7)
        assert time.monotonic() - started < 30 and "\n" not in str(caught.value)
        assert 30 < signal.getitimer(signal.ITIMER_REAL)[0] < 60  # the outer timer is put back
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_plugin_whose_import_exits_or_hangs_is_a_config_error(tmp_path):
    for source, message in (("import sys\nsys.exit(3)\n", r"called sys.exit\(3\) while importing"),
                            ("while True:\n    pass\n", "did not return within rewards.plugin_timeout=0.5 s while "
                                                        "importing")):
        path = write(tmp_path / f"p{len(message)}.py", source)
        with pytest.raises(ConfigError, match=rf"rewards.plugins: {re.escape(str(path))} {message}"):
            load_config(None, [f"rewards.plugins={path}", "rewards.plugin_timeout=0.5"])


def test_a_plugin_that_exits_mid_training_stops_the_process_with_one_line(tmp_path, tiny_overrides):
    path = write(tmp_path / "quits.py", "import sys\n\ndef quits(completions, **columns):\n    sys.exit(0)\n")
    proc = subprocess.run([sys.executable, "-m", "qlora_rft", "train", "configs/tiny_demo.yaml", *tiny_overrides,
                           "warmup.steps=0", "grpo.generation_chunk=0", f"rewards.plugins={path}",
                           "rewards.weights={format: 1, quits: 1}"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(rf"error: reward 'quits' \(from {re.escape(str(path))}\) called sys.exit\(0\) on row \d+: "
                        r"plugin code must return, never exit", proc.stderr.strip())
    assert not (tmp_path / "run" / "adapter").exists()


def test_each_reward_gets_its_own_copy_of_the_columns(tmp_path):
    path = write(tmp_path / "meddles.py", '''
        def meddles(completions, solution, boxes, **columns):
            solution[:] = ["<answer>blue square</answer>"] * len(solution)
            boxes[0].append(99)
            completions[:] = ["<answer>blue square</answer>"] * len(completions)
            return [0.0] * len(completions)

        def sees(completions, solution, boxes, **columns):
            return [float(solution[0] == "<answer>red circle</answer>" and boxes[0] == [1, 2])] * len(completions)
    ''')
    cfg = load_config(None, [f"rewards.plugins={path}", "rewards.weights={meddles: 1, classification: 1, sees: 1}"])
    rewards = reward_set(cfg.rewards, get_task("classification"))
    columns = {"solution": "<answer>red circle</answer>", "boxes": [1, 2]}
    completions = ["<answer>red circle</answer>", "<answer>blue square</answer>"]
    for _ in range(2):  # the row's own values are untouched too
        got = rewards.score(completions, columns, row=0)
        assert got["classification"] == [1.0, 0.0] and got["sees"] == [1.0, 1.0]
    assert columns == {"solution": "<answer>red circle</answer>", "boxes": [1, 2]}
    assert completions == ["<answer>red circle</answer>", "<answer>blue square</answer>"]


@pytest.mark.parametrize("value", ["1e308", "1e200"])
def test_a_weighted_reward_too_large_names_the_rewards(tmp_path, value):
    path = write(tmp_path / "huge.py", f"def huge(completions, **columns):\n    return [{value}] * len(completions)\n\n"
                                       f"def vast(completions, **columns):\n    return [{value}] * len(completions)\n")
    cfg = load_config(None, [f"rewards.plugins={path}", "rewards.weights={huge: 1, vast: 1}"])
    rewards = reward_set(cfg.rewards, get_task("classification"))
    values = rewards.score(["a"], {"solution": "x"}, row=3)
    with pytest.raises(RewardError, match=r"the weighted reward of completion 0 on row 3 is .* \('huge' .* x 1, "
                                          r"'vast' .* x 1\), beyond \+-1e\+15"):
        rewards.weighted(values, 3)
    assert rewards.weighted({"huge": [2.0], "vast": [-0.5]}) == [1.5]
