"""The locked environment: the constraints file covers every dependency, satisfies pyproject's bounds, and the
environment the tests run in is the locked one (scripts/_env.sh installs with it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from qlora_rft.environment import LOCK, normalize, read_lock, report

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_the_lock_pins_every_dependency_within_pyprojects_bounds():
    lock = read_lock()
    for requirement in requirements():
        name = normalize(requirement.name)
        assert name in lock, f"{name} is not in {LOCK.name}: run bash scripts/lock.sh"
        assert requirement.specifier.contains(lock[name], prereleases=True), (name, lock[name])


def test_the_report_names_each_package_at_another_version():
    lock = {"torch": "2.14.1", "transformers": "5.25.0", "lvis": "0.5.3", "peft": "0.21.2"}
    found = {"torch": "2.14.1", "transformers": "5.26.0", "lvis": None, "peft": "0.22.0"}.get
    text, same = report(lock, find=found)
    assert not same
    lines = text.splitlines()
    assert lines[1] == "2 installed at another version than the tested one:"
    assert lines[2].split() == ["peft", "locked", "0.21.2", "installed", "0.22.0"]
    assert lines[3].split() == ["transformers", "locked", "5.25.0", "installed", "5.26.0"]
    assert lines[4] == "1 locked but not installed: lvis"  # not counted: a library user need not have the extras
    assert report(lock, find={"torch": "2.14.1", "transformers": "5.25.0", "peft": "0.21.2"}.get)[1]


@pytest.mark.skipif(os.environ.get("QLORA_RFT_LOCK") == "0", reason="installed without the lock (QLORA_RFT_LOCK=0)")
def test_the_tests_run_in_the_locked_environment():
    proc = subprocess.run([sys.executable, "-m", "qlora_rft", "env"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every installed locked package has its tested version" in proc.stdout
