"""Write requirements/lock.txt from pip's resolution report (``pip install --dry-run --report``).

``make lock`` resolves pyproject.toml's ranges afresh without installing anything, then calls this to
keep one exact ``name==version`` line per package, which ``make setup`` passes to pip as constraints.
Standard library only: it runs before any venv has the project's dependencies.

A local version label (``torch==2.13.0+cpu``) is dropped: ``torch==2.13.0`` is satisfied by the CPU
wheel and by the CUDA one alike (PEP 440 ignores local labels when the pin has none).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HEADER = """\
# Exact versions `make setup` / `make test` install (pip constraints: `pip install -c requirements/lock.txt`).
# pyproject.toml keeps ranges for users; this file is what CI last passed with. Written by `make lock`
# from a fresh resolution of `.[dev,gguf,qlora,rl]` + {torch} (python {python}, {platform}).
# Update on purpose: `make lock`, then `make test`; commit the lock with that passing run, never without.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(report: dict, skip: set[str]) -> dict[str, str]:
    """``{canonical name: version}`` for every package pip would install, minus ``skip``."""
    found = {}
    for item in report["install"]:
        name = canonical(item["metadata"]["name"])
        if name not in skip:
            found[name] = item["metadata"]["version"].split("+", 1)[0]
    return dict(sorted(found.items()))


def main(report_path: str, lock_path: str) -> int:
    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    locked = pins(report, skip={"tunelab"})
    env = report.get("environment", {})
    header = HEADER.format(
        torch=f"torch=={locked.get('torch', '?')}",
        python=env.get("python_full_version", "?"),
        platform=f"{env.get('sys_platform', '?')} {env.get('platform_machine', '?')}",
    )
    body = "".join(f"{name}=={version}\n" for name, version in locked.items())
    Path(lock_path).write_text(header + body, encoding="utf-8")
    print(f"{lock_path}: {len(locked)} packages pinned; now run `make test` before committing it")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python requirements/lock.py PIP_REPORT.json requirements/lock.txt", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
