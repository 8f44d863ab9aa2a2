"""Serving load test: tunelab's built-in engine (unbatched and batched), llama.cpp's server, and
tunelab's router in front of that llama.cpp server, on one model with the same prompts.

    python benchmarks/serve_load.py                       # the embedded SmolLM2-135M-Instruct GGUF
    python benchmarks/serve_load.py --model path/to/model.gguf --max-tokens 64
    python benchmarks/serve_load.py --quick               # a smoke run: small, concurrency 1 and 4

Every engine runs as its own server process on 127.0.0.1 (so the load generator's threads never
share an interpreter with the engine), one at a time, and gets the same closed-loop load: N client
threads (the official ``openai`` client), each sending its next greedy chat completion when the
last one returns, round-robin over the same prompts, until each client has sent
``--requests-per-client`` requests or ``--seconds`` have passed. Reported per engine and
concurrency: aggregate completion tokens/s, p50/p95 request latency, and, for the router row, the
p50 latency it adds over the llama.cpp server it fronts (measured back to back at each
concurrency). The built-in rows also check that batched greedy answers equal the unbatched ones.

The built-in engine loads the model through ``tunelab.models.load`` (a GGUF is dequantised to the
model's float weights); llama.cpp runs the GGUF as it is (quantised), so compare each engine with
itself across concurrency more than across engines. llama-cpp-python's server answers one request
at a time. The router row needs ``tunelab serve --backend``; without it the row is skipped with a
note.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from tunelab.console import labelled, make_console
from tunelab.serve.routing import percentile

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a rainbow is to a child.",
    "List five fruits and say one thing about each.",
    "Tell me a story about a brave little mouse who lived in a big old library.",
    "What should I pack for a weekend trip to the mountains?",
    "Describe your favourite season and why.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
]
READY_TIMEOUT_S = 600


@dataclass
class Cell:
    """One engine at one concurrency."""

    engine: str
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    answers: dict[str, str] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies, q) if self.latencies else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    cmd: list[str], url: str, log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Start a server process and wait until ``/v1/models`` answers; returns it and its first model id."""
    out = log.open("w", encoding="utf-8")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise SystemExit(f"error: {' '.join(cmd[:4])} ... exited with {proc.returncode}:\n{tail}")
        try:
            models = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
            return proc, models[0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"error: {cmd[0]} did not answer on {url} within {READY_TIMEOUT_S} s; log: {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_load(url: str, model: str, cell: Cell, args: argparse.Namespace) -> Cell:
    """Closed loop: each client thread sends its next request when the last one has returned."""
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def client_loop(index: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900)
        for k in range(args.requests_per_client):
            if time.monotonic() > stop_at:
                return
            prompt = PROMPTS[(index + k * cell.concurrency) % len(PROMPTS)]
            started = time.monotonic()
            try:
                reply = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=args.max_tokens,
                    temperature=0,
                )
            except openai.OpenAIError as err:
                with lock:
                    cell.errors += 1
                print(f"{cell.engine}: {err}", file=sys.stderr)
                continue
            with lock:
                cell.latencies.append(time.monotonic() - started)
                cell.tokens += reply.usage.completion_tokens
                cell.answers[prompt] = reply.choices[0].message.content or ""

    began = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(cell.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cell.seconds = time.monotonic() - began
    return cell


def warm_up(url: str, model: str, args: argparse.Namespace) -> None:
    """First requests pay for lazy initialisation (allocations, kernel selection); not measured."""
    probe = argparse.Namespace(**{**vars(args), "requests_per_client": 1, "seconds": 600})
    run_load(url, model, Cell("warm-up", 2), probe)


def builtin_cells(model: str, max_batch: int, label: str, args: argparse.Namespace, tmp: Path) -> list[Cell]:
    """The built-in engine served by this script's own ``_serve-builtin`` mode, one process per row."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, __file__, "_serve-builtin", "--model", model, "--port", str(port), "--threads"]
    cmd.append(str(args.threads))
    proc, served = start_server([*cmd, "--max-batch", str(max_batch)], url, tmp / f"builtin-{max_batch}.log")
    try:
        warm_up(url, served, args)
        return [run_load(url, served, Cell(label, c), args) for c in args.concurrency]
    finally:
        stop_server(proc)


def serve_builtin(argv: list[str]) -> None:
    """``_serve-builtin``: the built-in engine behind tunelab's app, with a chosen ``max_batch``
    (``tunelab serve --max-batch`` does the same once that flag is wired)."""
    import torch  # noqa: PLC0415
    import uvicorn  # noqa: PLC0415

    from tunelab.serve.app import ServeSettings, create_app  # noqa: PLC0415
    from tunelab.serve.engine import Engine  # noqa: PLC0415
    from tunelab.serve.routing import Router  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="serve_load.py _serve-builtin")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    engine = Engine.load(opts.model, {}, device="cpu", queue_size=256, max_batch=opts.max_batch)
    router = Router(engine.base_name, [])
    app = create_app(engine, router, ServeSettings(request_timeout_s=900))
    uvicorn.run(app, host="127.0.0.1", port=opts.port, log_level="warning")


def router_env(args: argparse.Namespace) -> dict[str, str]:
    """The router process's environment: ``--router-src`` (a tunelab source tree, to measure a
    branch before it is merged) goes first on its PYTHONPATH."""
    env = dict(os.environ)
    if args.router_src:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.router_src), env.get("PYTHONPATH")) if p)
    return env


def has_backend_flag(env: dict[str, str]) -> bool:
    """Whether this tunelab's ``serve`` takes ``--backend`` (the router row needs it)."""
    cmd = [sys.executable, "-m", "tunelab", "serve", "--help"]
    return "--backend" in subprocess.run(cmd, capture_output=True, text=True, check=False, env=env).stdout


def start_router(upstream: str, args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen | None, str]:
    """``tunelab serve --backend llama=UPSTREAM`` on a free port, or ``(None, "")`` without the flag."""
    env = router_env(args)
    if not has_backend_flag(env):
        print("note: this tunelab serve has no --backend yet; the router row is skipped", file=sys.stderr)
        return None, ""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "tunelab", "serve", "--backend", f"llama={upstream}"]
    proc, _ = start_server([*cmd, "--port", url.rsplit(":", 1)[1]], url, tmp / "router.log", env)
    warm_up(url, "llama", args)
    return proc, url


def router_overhead(direct: str, served: str, routed: str, pairs: int) -> str:
    """The router's own cost, without the generation noise of the load cells: ``pairs`` one-token
    requests sent one at a time, alternating direct and through the router; p50 of each."""
    clients = {
        url: openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0) for url in (direct, routed)
    }
    times: dict[str, list[float]] = {direct: [], routed: []}
    for i in range(pairs):
        for url in (direct, routed) if i % 2 == 0 else (routed, direct):
            started = time.monotonic()
            clients[url].chat.completions.create(
                model=served if url == direct else "llama",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=1,
                temperature=0,
            )
            times[url].append(time.monotonic() - started)
    d, r = (percentile(times[u], 50) * 1000 for u in (direct, routed))
    return (
        f"router overhead ({pairs} one-token requests each way, one at a time): llama.cpp direct p50 "
        f"{d:.1f} ms, through tunelab serve --backend p50 {r:.1f} ms: the router adds {r - d:+.1f} ms"
    )


def llamacpp_cells(gguf: Path, args: argparse.Namespace, tmp: Path) -> tuple[list[Cell], list[Cell], str]:
    """llama.cpp's server direct, and tunelab's router in front of it, back to back per concurrency;
    then the router's overhead alone."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", url.rsplit(":", 1)[1]]
    cmd += ["--n_ctx", "2048", "--n_threads", str(args.threads)]
    server, served = start_server(cmd, url, tmp / "llamacpp.log")
    router = None
    try:
        warm_up(url, served, args)
        router, router_url = start_router(url, args, tmp)
        direct, routed = [], []
        for c in args.concurrency:
            direct.append(run_load(url, served, Cell("llama.cpp server", c), args))
            if router is not None:
                routed.append(run_load(router_url, "llama", Cell("router -> llama.cpp", c), args))
        overhead = router_overhead(url, served, router_url, args.overhead_pairs) if router else ""
        return direct, routed, overhead
    finally:
        for proc in (router, server):
            if proc is not None:
                stop_server(proc)


def resolve_model(spec: str) -> tuple[str, Path | None]:
    """(what tunelab loads, the GGUF file llama.cpp loads or None when the model is not a GGUF)."""
    if spec.startswith("asset:"):
        from tunelab.assets import asset_path  # noqa: PLC0415

        return spec, asset_path(spec.removeprefix("asset:"))
    return spec, (Path(spec) if spec.lower().endswith(".gguf") else None)


def markdown(cells: list[Cell], routed: list[Cell], direct: list[Cell], reference: list[Cell]) -> str:
    """The results as the markdown table RESULTS.md records."""
    lines = [
        "| engine | concurrency | requests | errors | tokens/s | p50 s | p95 s | router adds (p50) | answers = unbatched |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    added = {r.concurrency: (r.p(50) - d.p(50)) * 1000 for r, d in zip(routed, direct, strict=False)}
    routed_ids, reference_ids = {id(c) for c in routed}, {id(c) for c in reference}
    alone = {prompt: text for cell in reference for prompt, text in cell.answers.items()}
    for cell in cells:
        extra = f"{added[cell.concurrency]:+.1f} ms" if id(cell) in routed_ids else ""
        same = ""
        if cell.engine.startswith("built-in") and id(cell) not in reference_ids:
            differ = sum(text != alone.get(prompt, text) for prompt, text in cell.answers.items())
            same = "yes" if not differ else f"no ({differ} differ)"
        lines.append(
            f"| {cell.engine} | {cell.concurrency} | {len(cell.latencies) + cell.errors} | {cell.errors} | "
            f"{cell.tokens_per_s:.1f} | {cell.p(50):.2f} | {cell.p(95):.2f} | {extra} | {same} |"
        )
    return "\n".join(lines)


def speedup_line(batched: list[Cell], unbatched: list[Cell]) -> str:
    """The issue's target: batched at the highest concurrency vs the engine's own concurrency 1."""
    base = next((c for c in unbatched if c.concurrency == 1), unbatched[0])
    top = max(batched, key=lambda c: c.concurrency)
    ratio = top.tokens_per_s / base.tokens_per_s if base.tokens_per_s else float("nan")
    return (
        f"built-in, batched, concurrency {top.concurrency}: {top.tokens_per_s:.1f} tokens/s = {ratio:.1f}x "
        f"the unbatched engine at concurrency {base.concurrency} ({base.tokens_per_s:.1f} tokens/s); target 3x"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="asset:smollm2-135m-instruct", help="GGUF file, asset:NAME or model dir"
    )
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120.0, help="stop issuing requests after this")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="the batched built-in row's max_batch")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads for each engine (torch's intra-op threads; llama.cpp's --n_threads)",
    )
    parser.add_argument("--rows", default="builtin,llamacpp", help="which engines to run")
    parser.add_argument("--overhead-pairs", type=int, default=100, help="one-token requests each way")
    parser.add_argument(
        "--router-src", type=Path, help="a tunelab src/ dir for the router process only (an unmerged branch)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: concurrency 1,4; 1 request each; 8 tokens"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests_per_client, args.max_tokens, args.overhead_pairs = "1,4", 1, 8, 10
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv: list[str]) -> None:
    if argv[:1] == ["_serve-builtin"]:
        serve_builtin(argv[1:])
        return
    args = parse_args(argv)
    out, err = make_console(), make_console(stderr=True)
    model, gguf = resolve_model(args.model)
    unbatched, batched, direct, routed, overhead = [], [], [], [], ""
    with tempfile.TemporaryDirectory() as tmp:
        if "builtin" in args.rows:
            err.print(f"built-in engine, unbatched (max_batch 1) on {model} ...")
            unbatched = builtin_cells(model, 1, "built-in, max_batch 1", args, Path(tmp))
            err.print(f"built-in engine, batched (max_batch {args.max_batch}) ...")
            label = f"built-in, max_batch {args.max_batch}"
            batched = builtin_cells(model, args.max_batch, label, args, Path(tmp))
        if "llamacpp" in args.rows and gguf is None:
            err.print(labelled("note", f"{model} is not a GGUF; the llama.cpp and router rows are skipped"))
        elif "llamacpp" in args.rows:
            err.print("llama.cpp server, and the router in front of it ...")
            direct, routed, overhead = llamacpp_cells(gguf, args, Path(tmp))
    cells = unbatched + batched + direct + routed
    out.print(f"model {args.model}; greedy, max_tokens {args.max_tokens}; {len(PROMPTS)} prompts round robin")
    out.print(markdown(cells, routed, direct, unbatched))
    if batched:
        out.print(speedup_line(batched, unbatched))
    if overhead:
        out.print(overhead)
    if any(c.errors for c in cells):
        err.print(labelled("error", "some requests failed (see above)"))
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
