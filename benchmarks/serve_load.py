"""Load test of `tunelab serve` on loopback: requests/s and latency with 1 and 4 adapters on one base.

    python benchmarks/serve_load.py [--base tiny:llama] [--requests 200] [--seconds 30] [--concurrency 8]

Trains small LoRA adapters on the base first (one step each; speed does not depend on what an
adapter learned), starts a real uvicorn server in this process on 127.0.0.1, and sends greedy chat
completions from ``--concurrency`` client threads, round-robin over the adapters (so with 4
adapters the worker switches adapter on nearly every request). The base with no adapter loaded is
the peer: the difference is what serving through PEFT adapters costs. Each scenario stops at
``--requests`` requests or ``--seconds`` seconds, whichever comes first; any error fails the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.engine import Engine
from tunelab.serve.routing import Router, percentile
from tunelab.serve.server import BackgroundServer

KEY = "bench"
QUESTIONS = ["Say hi", "Count to three", "Name a colour", "Name an animal", "What is two plus two", "Say bye"]


@dataclass
class Result:
    scenario: str
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    completion_tokens: int

    def row(self) -> list[str]:
        return [
            self.scenario,
            str(self.requests),
            str(self.errors),
            f"{self.requests / self.seconds:.1f}",
            f"{self.completion_tokens / self.seconds:.0f}",
            f"{percentile(self.latencies, 50) * 1000:.0f}",
            f"{percentile(self.latencies, 95) * 1000:.0f}",
        ]


def train_adapters(base: str, n: int, root: Path) -> dict[str, Path]:
    """``n`` one-step LoRA runs on ``base``, each on different answers."""
    from tunelab.recipe import parse_recipe  # noqa: PLC0415
    from tunelab.train.run import train  # noqa: PLC0415

    runs = {}
    for i in range(n):
        data = root / f"a{i}.jsonl"
        rows = [{"instruction": q, "output": f"answer {i} to {q}"} for q in QUESTIONS]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        raw = {
            "seed": 0,
            "model": {"name_or_path": base},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "lora", "r": 8, "alpha": 16},
            "training": {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0},
            "output": {"dir": str(root / "runs"), "name": f"adapter-{i}"},
        }
        runs[f"adapter-{i}"] = train(parse_recipe(raw)).run_dir
    return runs


def load(
    url: str, models: list[str], *, requests: int, seconds: float, concurrency: int, max_tokens: int
) -> Result:
    """Closed-loop load: each thread sends its next request when the last one returns."""
    lock, issued = threading.Lock(), [0]
    latencies: list[float] = []
    errors, tokens = [0], [0]
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            while time.monotonic() < stop_at:
                with lock:
                    if issued[0] >= requests:
                        return
                    i = issued[0]
                    issued[0] += 1
                body = {
                    "model": models[i % len(models)],
                    "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                started = time.monotonic()
                response = client.post("/v1/chat/completions", json=body)
                elapsed = time.monotonic() - started
                with lock:
                    if response.status_code != 200:
                        errors[0] += 1
                        print(f"error {response.status_code}: {response.text[:200]}", file=sys.stderr)
                        continue
                    latencies.append(elapsed)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    began = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Result("", len(latencies) + errors[0], errors[0], time.monotonic() - began, latencies, tokens[0])


def scenario(base: str, adapters: dict[str, Path], args: argparse.Namespace) -> Result:
    engine = Engine.load(
        base, adapters, device=args.device, queue_size=args.concurrency * 2, max_tokens_limit=512
    )
    router = Router(engine.base_name, list(engine.adapters))
    models = list(adapters) or [engine.base_name]
    with BackgroundServer(create_app(engine, router, ServeSettings(api_key=KEY))) as server:
        load(server.url, models, requests=2, seconds=30, concurrency=1, max_tokens=2)  # warm-up
        result = load(
            server.url,
            models,
            requests=args.requests,
            seconds=args.seconds,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
        )
    names = {0: "base only (peer)", 1: "1 adapter"}
    result.scenario = names.get(len(adapters), f"{len(adapters)} adapters, round robin")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny:llama")
    parser.add_argument("--requests", type=int, default=200, help="requests per scenario at most")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds per scenario at most")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    console = Console(emoji=False)  # or `tiny:llama` renders as an emoji
    with tempfile.TemporaryDirectory() as tmp:
        console.print(f"training 4 one-step LoRA adapters on {args.base} ...")
        runs = train_adapters(args.base, 4, Path(tmp))
        names = list(runs)
        results = [
            scenario(args.base, {}, args),
            scenario(args.base, {names[0]: runs[names[0]]}, args),
            scenario(args.base, runs, args),
        ]
    table = Table(
        title=f"tunelab serve on {args.base}: {args.concurrency} clients, {args.max_tokens} new tokens, greedy"
    )
    for column in ("scenario", "requests", "errors", "req/s", "tokens/s", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for result in results:
        table.add_row(*result.row())
    console.print(table)
    if any(r.errors for r in results):
        console.print("[red]errors during the load test[/]")
        sys.exit(1)


if __name__ == "__main__":
    main()
