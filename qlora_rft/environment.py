"""The environment the test suite passed on: `constraints.txt` (beside this file) pins every package's exact version;
`scripts/_env.sh` installs with it, `scripts/lock.sh` regenerates it, and `qlora-rft env` says what differs from it.

`python -m qlora_rft.environment freeze` prints this interpreter's packages in the lock's format (what lock.sh writes).
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LOCK = Path(__file__).with_name("constraints.txt")


def normalize(name: str) -> str:
    """A distribution name as pip compares them.

    >>> normalize("PyYAML"), normalize("huggingface_hub"), normalize("zope.interface")
    ('pyyaml', 'huggingface-hub', 'zope-interface')
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line of a constraints file (comments ignored).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     f = Path(d) / "c.txt"
    ...     _ = f.write_text("# tested\\nPyYAML==6.0.4\\ntorch==2.14.1  # CPU and CUDA\\n")
    ...     read_lock(f)
    {'pyyaml': '6.0.4', 'torch': '2.14.1'}
    """
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, pinned = line.split("==", 1)
            pins[normalize(name)] = pinned.strip()
    return pins


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Difference:
    package: str
    locked: str
    installed: str | None  # None: not installed


def differences(lock: dict[str, str] | None = None, find=installed) -> list[Difference]:
    """Every locked package whose installed version is another, or that is not installed."""
    lock = read_lock() if lock is None else lock
    found = ((name, pinned, find(name)) for name, pinned in sorted(lock.items()))
    return [Difference(name, pinned, now) for name, pinned, now in found if now != pinned]


def report(lock: dict[str, str] | None = None, find=installed) -> tuple[str, bool]:
    """What `qlora-rft env` prints, and whether every installed locked package has its locked version (packages
    not installed, e.g. the test extra's in a library user's environment, are listed but do not count)."""
    lock = read_lock() if lock is None else lock
    diff = differences(lock, find)
    other = [d for d in diff if d.installed is not None]
    missing = [d.package for d in diff if d.installed is None]
    lines = [f"{LOCK}: {len(lock)} packages locked; this environment: Python {platform.python_version()}"]
    if other:
        width = max(len(d.package) for d in other)
        lines.append(f"{len(other)} installed at another version than the tested one:")
        lines += [f"  {d.package:<{width}}  locked {d.locked:<12} installed {d.installed}" for d in other]
    else:
        lines.append("every installed locked package has its tested version")
    if missing:
        lines.append(f"{len(missing)} locked but not installed: {', '.join(missing)}")
    return "\n".join(lines), not other


def freeze() -> str:
    """This interpreter's packages as a constraints file (the project itself left out), with a header."""
    listed = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout
    pins = sorted((line for line in listed.splitlines() if "==" in line and not line.startswith("qlora-rft")),
                  key=str.lower)
    header = [
        "# The exact versions the whole test suite passed with (`bash scripts/test.sh` installs with this file).",
        "# Regenerate after an upgrade with `bash scripts/lock.sh` (newest releases pyproject.toml allows, suite",
        "# run, then this file written); `qlora-rft env` lists what an environment has otherwise.",
        f"# Written {datetime.now(UTC).date()} on Python {platform.python_version()}, {platform.machine()}.",
    ]
    return "\n".join(header + pins) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["freeze"]:
        sys.exit("usage: python -m qlora_rft.environment freeze")
    sys.stdout.write(freeze())
