"""The checkout's state as git sees it, for the session check in conftest.py and its tests.

A module of its own (not conftest) because tests/data has a conftest too: `from conftest import ...`
resolves to whichever conftest pytest put first on sys.path."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout_state(root: Path) -> dict[str, str] | None:
    """`git status --porcelain` of the checkout, each entry with a hash of the file as it is now
    (so a test that changes an already modified file is seen too); None outside a git checkout."""
    try:
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all", "-z"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    state = {}
    for entry in filter(None, status.split("\0")):
        path = root / entry[3:]
        state[entry] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return state


def describe_change(before: dict[str, str], after: dict[str, str]) -> str:
    """The entries the session added, removed or rewrote, as one line."""
    changed = sorted(set(before.items()) ^ set(after.items()))
    return ", ".join(dict.fromkeys(entry[3:] for entry, _ in changed))
