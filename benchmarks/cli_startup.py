"""How fast the everyday commands start, and how much memory they take (issue 26 §5).

    python benchmarks/cli_startup.py [--runs 5] [--before /path/to/other/checkout/src] [--json]

Each command runs ``--runs`` times, each time in a fresh ``python -m tunelab`` process on small real
inputs (a 30-row instruction file, a recipe, an empty recipe, a finished run directory), and the
table shows the median wall time and the median peak RSS of those processes against the target
(under 1 s and 150 MB). Peak RSS is each child's own (``os.wait4``), not the largest child so far.
The CPU time (user + system) of the same processes is shown beside the wall time: on a machine
shared with other work the wall time grows with the load, the CPU time much less.

Peers in the same run: ``python -c pass`` (the interpreter alone) and ``python -c "import torch"``
(the floor every one of these commands paid while the recipe schema imported the ML stack).
``--before SRC`` runs the same commands with another checkout's ``src`` first on the path (e.g. the
main branch before this change), as extra rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET_S, TARGET_MB = 1.0, 150.0


def prepare(root: Path) -> dict[str, str]:
    """Inputs for every command, written under ``root``; returns the paths by name."""
    pairs = [("Say hi", "hi there"), ("Count to three", "one two three"), ("Name a colour", "blue")]
    rows = [{"instruction": f"{q} ({i})", "output": a} for i in range(10) for q, a in pairs]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "max_length": 64},
        "method": {"name": "lora", "r": 8},
        "output": {"dir": str(root / "runs")},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "empty.yaml").write_text("")
    run = root / "runs" / "done"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    manifest = {"run_name": "done", "status": "completed", "started_at": "2025-01-01T00:00:00+00:00"}
    (run / "manifest.json").write_text(json.dumps(manifest | {"final_eval": {"eval_loss": 1.5}}))
    return {
        "data": str(data),
        "recipe": str(root / "recipe.yaml"),
        "empty": str(root / "empty.yaml"),
        "runs": str(root / "runs"),
        "run": str(run),
        "out": str(root / "out"),
    }


def commands(p: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(label, tunelab arguments) for every command issue 26 names; outputs go to fresh names each run."""
    return [
        ("tunelab --help", ["--help"]),
        ("recipe check (empty file)", ["recipe", "check", p["empty"]]),
        ("recipe check", ["recipe", "check", p["recipe"]]),
        ("recipe show", ["recipe", "show", p["recipe"]]),
        ("runs ls", ["runs", "ls", p["runs"]]),
        ("runs show", ["runs", "show", p["run"]]),
        ("data audit", ["data", "audit", p["data"]]),
        ("data clean", ["data", "clean", p["data"], "-o", p["out"] + "/clean-{i}.jsonl"]),
        ("data split", ["data", "split", p["data"], "-o", p["out"] + "/split-{i}"]),
        ("data convert", ["data", "convert", p["data"], "-o", p["out"] + "/convert-{i}.jsonl"]),
    ]


def measure(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds, peak RSS in MB and exit code of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, proc.returncode  # ru_maxrss is in KiB on Linux


def row(label: str, argv: list[str], runs: int, env: dict[str, str], cwd: Path) -> dict:
    walls, cpus, rss, codes = [], [], [], set()
    for i in range(runs):
        wall, cpu, mb, code = measure([a.replace("{i}", f"{label[:2]}{i}") for a in argv], env, cwd)
        walls.append(wall)
        cpus.append(cpu)
        rss.append(mb)
        codes.add(code)
    return {
        "command": label,
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "rss_mb": statistics.median(rss),
        "exit": sorted(codes),
    }


def env_for(src: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"TERM": "dumb"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])
    return env


def table(rows: list[dict]) -> str:
    lines = [
        f"| command | median wall (s) | median CPU (s) | median peak RSS (MB) | exit | target {TARGET_S:g} s / {TARGET_MB:g} MB |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        verdict = r.get("verdict") or (
            "ok"
            if r["wall_s"] < TARGET_S and r["rss_mb"] < TARGET_MB
            else "over: "
            + ", ".join(
                w
                for w, over in (("time", r["wall_s"] >= TARGET_S), ("memory", r["rss_mb"] >= TARGET_MB))
                if over
            )
        )
        codes = ",".join(str(c) for c in r["exit"])
        lines.append(
            f"| {r['command']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['rss_mb']:.0f} | {codes} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command (median reported)")
    parser.add_argument("--before", type=Path, help="another checkout's src/, measured as extra rows")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON as well")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tunelab-startup-") as tmp:
        root = Path(tmp)
        paths = prepare(root)
        py = sys.executable
        for label, extra in (
            ("peer: python -c pass", ["-c", "pass"]),
            ("peer: python -c 'import torch'", ["-c", "import torch"]),
        ):
            rows.append(row(label, [py, *extra], args.runs, env_for(None), root) | {"verdict": "peer"})
        for label, cli in commands(paths):
            rows.append(row(label, [py, "-m", "tunelab", *cli], args.runs, env_for(REPO / "src"), root))
        if args.before is not None:
            for label, cli in commands(paths):
                before = row(
                    f"before: {label}", [py, "-m", "tunelab", *cli], args.runs, env_for(args.before), root
                )
                rows.append(before | {"verdict": "before"})
    print(
        f"{args.runs} fresh processes per command; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(table(rows))
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
