"""Benchmark `tunelab data audit` on synthetic instruction data, against peers in the same run.

    python benchmarks/data_audit.py [--sizes 10000,100000] [--peer-rows 10000]

Rows are ~200 words (Zipf-distributed vocabulary), with 1% planted near duplicates, 0.5% exact
duplicates and a few PII strings. Each size runs in a fresh subprocess, so peak RSS is that
audit's own. Peers, on the same data in this run:
  * near duplicates: `datasketch` MinHash + MinHashLSH (128 permutations, same threshold) — it
    hashes per document in Python, so it runs on the first ``--peer-rows`` rows only;
  * exact duplicates: pandas ``drop_duplicates`` on the same normalised text.
1M rows is extrapolated linearly from the largest measured size (the pipeline is linear apart
from LSH bucketing), and labelled so.

Hostile input: ``--long-mb 50`` (default; 0 skips it) also writes a file whose first row is one
line of that many MB (plus 100 ordinary rows) and measures `audit`, `clean`, `split` and `show` on it,
each in a fresh process, with the peak RSS of the same command on the ordinary rows alone as the
baseline: memory must grow by a small multiple of the line, not hundreds of times it.
``--only-long`` runs just that case.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = [
        f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "pu", "ra", "so", "ti", "vu", "ze") for b in range(3000)
    ]
    ranks = np.arange(1, len(vocab) + 1)
    p = 1 / ranks**1.05
    p /= p.sum()
    words = rng.choice(len(vocab), size=(n, 200), p=p)
    rows: list[dict] = []
    for i in range(n):
        w = [vocab[k] for k in words[i]]
        r = rng.random()
        if i > 10 and r < 0.005:
            rows.append(dict(rows[int(rng.integers(0, i))]))  # exact duplicate
            continue
        if i > 10 and r < 0.015:
            src = rows[int(rng.integers(0, i))]
            out = src["output"].split()
            for k in rng.integers(0, len(out), size=3):
                out[k] = "edited"
            rows.append({**src, "output": " ".join(out)})  # near duplicate
            continue
        out = " ".join(w[50:])
        if r > 0.999:
            out += " contact me at someone@example.com or 4111 1111 1111 1111"
        rows.append({"instruction": " ".join(w[:30]), "input": " ".join(w[30:50]), "output": out})
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, because ru_maxrss survives exec on Linux and
    would report the (large) parent that generated the data."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_audit(path: str) -> dict:
    from tunelab.data.audit import audit

    t = time.perf_counter()
    report = audit(path)
    secs = time.perf_counter() - t
    return {
        "seconds": secs,
        "exact_rows": report["exact_duplicates"]["rows"],
        "near_rows": report["near_duplicates"]["rows"],
        "near_pairs": report["near_duplicates"]["pairs"],
    }


def run_peer_near(path: str, n: int, threshold: float) -> dict:
    from datasketch import MinHash, MinHashLSH

    from tunelab.data.loaders import iter_records

    texts = []
    for _, rec in iter_records(path):
        texts.append(" ".join((rec["instruction"], rec["input"], rec["output"])).lower().split())
        if len(texts) >= n:
            break
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    pairs = 0
    for i, words in enumerate(texts):
        m = MinHash(num_perm=128)
        m.update_batch([" ".join(words[k : k + 3]).encode() for k in range(max(1, len(words) - 2))])
        pairs += len(lsh.query(m))
        lsh.insert(i, m)
    return {"seconds": time.perf_counter() - t, "rows": len(texts), "pairs": pairs}


def run_ours_near(path: str, n: int, threshold: float) -> dict:
    from tunelab.data.loaders import iter_records
    from tunelab.data.neardup import near_duplicates

    texts = []
    for _, rec in iter_records(path):
        texts.append(" ".join((rec["instruction"], rec["input"], rec["output"])))
        if len(texts) >= n:
            break
    t = time.perf_counter()
    res = near_duplicates(texts, threshold)
    return {"seconds": time.perf_counter() - t, "rows": len(texts), "pairs": int(len(res.pair_i))}


def run_pandas_exact(path: str) -> dict:
    import pandas as pd

    from tunelab.data.canonical import normalize_text
    from tunelab.data.loaders import iter_records

    t = time.perf_counter()
    texts = [
        normalize_text("\n".join((r["instruction"], r["input"], r["output"]))) for _, r in iter_records(path)
    ]
    df = pd.DataFrame({"text": texts})
    kept = len(df.drop_duplicates("text"))
    return {"seconds": time.perf_counter() - t, "exact_rows": len(texts) - kept}


def generate_long(path: Path, megabytes: int, with_long: bool = True) -> None:
    """One row of ``megabytes`` MB of words (if ``with_long``), then 100 ordinary rows."""
    rng = np.random.default_rng(1)
    vocab = np.array([f"w{k}" for k in range(5000)])
    with open(path, "w", encoding="utf-8") as fh:
        if with_long:
            words = rng.choice(vocab, size=megabytes * 1_000_000 // 6)
            fh.write(json.dumps({"instruction": "a short question", "output": " ".join(words)}) + "\n")
        for i in range(100):
            row = {"instruction": f"question {i} " + " ".join(rng.choice(vocab, 20)), "output": f"answer {i}"}
            fh.write(json.dumps(row) + "\n")


def run_command(mode: str, path: str) -> dict:
    """One `tunelab data` function on ``path`` (outputs to a temporary directory)."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if mode == "clean":
            from tunelab.data.clean import clean

            clean(path, Path(out) / "clean.jsonl")
        elif mode == "split":
            from tunelab.data.split import split

            split(path, Path(out) / "split")
        elif mode == "show":  # `data show` on the first row (the long one), tiny:llama's tokenizer
            from tunelab.data.show import preview_examples
            from tunelab.models.load import tokenizer_for

            preview_examples(path, tokenizer_for("tiny:llama"), n=1)
        else:
            from tunelab.data.audit import audit

            audit(path)
    return {"seconds": time.perf_counter() - t}


def long_line_table(console, megabytes: int) -> None:
    from rich.table import Table

    table = Table(title=f"one {megabytes} MB line + 100 ordinary rows (each command in a fresh process)")
    cols = (
        "command",
        "seconds",
        "baseline s",
        "peak RSS MB",
        "baseline RSS MB",
        "growth MB",
        "growth / line size",
    )
    for col in cols:
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        long_path, base_path = Path(tmp) / "long.jsonl", Path(tmp) / "base.jsonl"
        generate_long(long_path, megabytes)
        generate_long(base_path, megabytes, with_long=False)
        size_mb = (long_path.stat().st_size - base_path.stat().st_size) / 2**20
        for mode in ("audit", "clean", "split", "show"):
            base = measure(f"cmd_{mode}", base_path)
            r = measure(f"cmd_{mode}", long_path)
            growth = r["peak_rss_mb"] - base["peak_rss_mb"]
            table.add_row(
                mode,
                f"{r['seconds']:.1f}",
                f"{base['seconds']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{base['peak_rss_mb']:.0f}",
                f"{growth:.0f}",
                f"{growth / size_mb:.1f}x",
            )
    console.print(table)


def child(mode: str, path: str, n: int) -> None:
    fn = {
        "cmd_audit": lambda: run_command("audit", path),
        "cmd_clean": lambda: run_command("clean", path),
        "cmd_split": lambda: run_command("split", path),
        "cmd_show": lambda: run_command("show", path),
        "audit": lambda: run_audit(path),
        "peer_near": lambda: run_peer_near(path, n, 0.8),
        "ours_near": lambda: run_ours_near(path, n, 0.8),
        "pandas_exact": lambda: run_pandas_exact(path),
    }[mode]
    result = fn()
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def measure(mode: str, path: Path, n: int = 0) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path), str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--peer-rows", type=int, default=10000)
    ap.add_argument("--long-mb", type=int, default=50, help="size of the one long line (0: skip)")
    ap.add_argument("--only-long", action="store_true", help="run only the long-line case")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.long_mb:
        long_line_table(console, args.long_mb)
    if args.only_long:
        return
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for n in sizes:
            files[n] = Path(tmp) / f"rows{n}.jsonl"
            t = time.perf_counter()
            generate(files[n], n)
            console.print(
                f"generated {n:,} rows ({files[n].stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f}s"
            )
        audit_t = Table(title="tunelab data audit (full audit incl. JSONL parsing, 1 process)")
        for col in ("rows", "seconds", "rows/s", "peak RSS MB", "exact dup rows", "near dup rows"):
            audit_t.add_column(col, justify="right")
        measured = []
        for n in sizes:
            r = measure("audit", files[n])
            measured.append((n, r))
            audit_t.add_row(
                f"{n:,}",
                f"{r['seconds']:.1f}",
                f"{n / r['seconds']:,.0f}",
                f"{r['peak_rss_mb']:.0f}",
                str(r["exact_rows"]),
                str(r["near_rows"]),
            )
        n, r = measured[-1]
        rss = "-"
        if len(measured) > 1:  # memory grows linearly with rows (signatures, hashes): fit the last two
            (n0, r0), (n1, r1) = measured[-2:]
            rss = (
                f"{r1['peak_rss_mb'] + (r1['peak_rss_mb'] - r0['peak_rss_mb']) * (1e6 - n1) / (n1 - n0):.0f}"
            )
        audit_t.add_row(
            "1,000,000 (extrapolated)",
            f"{r['seconds'] * 1e6 / n:.0f}",
            f"{n / r['seconds']:,.0f}",
            rss,
            "-",
            "-",
        )
        console.print(audit_t)

        peer_t = Table(title="near-duplicate step vs peer (same rows, threshold 0.8, 128 permutations)")
        for col in ("implementation", "rows", "seconds", "rows/s", "pairs found", "peak RSS MB"):
            peer_t.add_column(col, justify="right")
        small = files[sizes[0]]
        for name, mode in (
            ("tunelab numpy MinHash+LSH", "ours_near"),
            ("datasketch MinHashLSH", "peer_near"),
        ):
            try:
                r = measure(mode, small, args.peer_rows)
            except subprocess.CalledProcessError as e:
                peer_t.add_row(name, "-", "failed", e.stderr.strip().splitlines()[-1][:60], "-", "-")
                continue
            peer_t.add_row(
                name,
                f"{r['rows']:,}",
                f"{r['seconds']:.2f}",
                f"{r['rows'] / r['seconds']:,.0f}",
                str(r["pairs"]),
                f"{r['peak_rss_mb']:.0f}",
            )
        for n in sizes:
            r = measure("pandas_exact", files[n])
            peer_t.add_row(
                "pandas drop_duplicates (exact only)",
                f"{n:,}",
                f"{r['seconds']:.2f}",
                f"{n / r['seconds']:,.0f}",
                f"{r['exact_rows']} dup rows",
                f"{r['peak_rss_mb']:.0f}",
            )
        console.print(peer_t)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
