"""A huge row costs memory linear and small in its size, and `data show` tokenises only its preview.

The long-text paths (MinHash window by window, byte statistics window by window, the normalised
hash in pieces) must give the same answers as the one-block paths; the benchmark
(benchmarks/data_audit.py --only-long) measures the memory itself on a 50 MB line.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from tunelab.data import audit, canonical, neardup, pii


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(3000)}" for _ in range(n))


def test_minhash_of_a_long_text_equals_the_one_block_signature(monkeypatch):
    texts = [_words(40_000, 1), _words(30_000, 2), "two words", "", "a, " * 40_000, _words(5)]
    windowed = neardup.minhash(texts)
    monkeypatch.setattr(neardup, "_BLOCK_BYTES", 1 << 30)  # everything in one block, as before
    assert np.array_equal(windowed, neardup.minhash(texts))


def test_byte_stats_of_long_texts_equal_the_block_path(monkeypatch):
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "é", "Ã©", "\x01", "\ufffd", "â€™", "\x85", "  "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(3000))) for _ in range(200)]
    expected = audit.byte_stats(texts)
    monkeypatch.setattr(audit, "LONG_TEXT", 64)  # every text takes the windowed path
    got = audit.byte_stats(texts)
    for key in ("words", "control", "mojibake", "replacement"):
        assert np.array_equal(expected[key], got[key]), key
    assert np.allclose(expected["non_ascii"], got["non_ascii"])


def test_normalised_hash_in_pieces_equals_the_whole(monkeypatch):
    rng = random.Random(0)
    # NFKC-sensitive pieces: combining marks, Hangul jamo, compatibility spaces, case folding.
    alphabet = [
        "a",
        "B",
        " ",
        "\n",
        "\u00a0",
        "\u0301",
        "e",
        "ß",
        "\u3000",
        "\u00b4",
        "\u1100",
        "\u1161",
        "\t\t",
    ]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(400))) for _ in range(1000)]
    expected = [(audit.normalize_text(t), audit.text_hash(t)) for t in texts]
    monkeypatch.setattr(canonical, "LONG_TEXT", 8)  # normalize_text and text_hash live in canonical
    monkeypatch.setattr(canonical, "_WINDOW", 5)
    assert [(audit.normalize_text(t), audit.text_hash(t)) for t in texts] == expected


def test_token_counts_of_a_long_text_are_estimated_from_its_start(monkeypatch):
    seen: list[int] = []

    def tokenizer(text: str) -> list[str]:
        seen.append(len(text))
        return text.split()

    monkeypatch.setattr(audit, "TOKEN_TEXT", 1000)
    text = "abcd " * 6_000  # 30,000 characters, 6,000 tokens; the first 1,000 characters hold 200
    assert audit.count_tokens(tokenizer, [text, "one two"]).tolist() == [6_000, 2]
    assert max(seen) == 1000


def test_pii_in_a_row_full_of_it_is_linear():
    text = "write to a@example.com or call +44 20 7946 0958. " * 20_000  # 40,000 findings
    found = pii.find_pii(text)
    assert len(found) == 40_000 and pii.redact(text).count("<EMAIL>") == 20_000
    assert len(pii._hints([text, "x"])) == 2


@pytest.mark.slow  # builds the tiny tokenizer (seconds)
def test_show_tokenises_only_what_the_preview_needs(tmp_path, monkeypatch):
    tiny = pytest.importorskip("tunelab.models.tiny")
    from tunelab.data import show
    from tunelab.objectives.sft import SftObjective

    tok = tiny.build_tiny_tokenizer()
    path = tmp_path / "long.jsonl"
    rows = [{"instruction": "say many words", "output": _words(10_000)}, {"instruction": "x", "output": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    seen: list[int] = []
    encode = SftObjective.encode

    def spy(self, row, example):
        seen.append(sum(len(m["content"]) for m in example["messages"]))
        return encode(self, row, example)

    monkeypatch.setattr(SftObjective, "encode", spy)
    data = show.DataShowConfig(max_length=32)
    (cut,), _ = show.preview_examples(str(path), tok, n=1, data=data)
    assert cut.truncated and len(cut.input_ids) == 32
    assert seen == [min(len(rows[0]["output"]), show.char_bound(tok, 32)) + len("say many words")]
    assert seen[0] < len(rows[0]["output"]) // 4
    monkeypatch.setattr(show, "char_bound", lambda tokenizer, max_length: None)  # the uncut example
    (full,), _ = show.preview_examples(str(path), tok, n=1, data=data)
    assert (full.input_ids, full.loss_mask) == (cut.input_ids, cut.loss_mask)


PEAK = """
import sys
from tunelab.data.{module} import {fn}
{call}
with open("/proc/self/status") as fh:
    print(next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) // 1024)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from /proc (Linux)")
@pytest.mark.parametrize(
    "module,fn,call",
    [
        ("audit", "audit", "audit(sys.argv[1])"),
        ("clean", "clean", "clean(sys.argv[1], sys.argv[2] + '/c.jsonl')"),
        ("split", "split", "split(sys.argv[1], sys.argv[2] + '/sp')"),
    ],
)
def test_a_5mb_line_grows_memory_by_a_small_multiple(tmp_path, module, fn, call):
    """Before: about 190x the line (a 50 MB line reached 10.5 GB). Now well under 20x."""
    base_rows = "".join(
        json.dumps({"instruction": f"q {i} " + _words(20, i), "output": f"a {i}"}) + "\n" for i in range(50)
    )
    base, long = tmp_path / "base.jsonl", tmp_path / "long.jsonl"
    base.write_text(base_rows, encoding="utf-8")
    long.write_text(
        json.dumps({"instruction": "q", "output": _words(800_000)}) + "\n" + base_rows, encoding="utf-8"
    )
    line_mb = (long.stat().st_size - base.stat().st_size) / 2**20
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    peaks = []
    for i, path in enumerate((base, long)):
        out = tmp_path / f"out{i}"
        out.mkdir()
        script = PEAK.format(module=module, fn=fn, call=call)
        res = subprocess.run(
            [sys.executable, "-c", script, str(path), str(out)], capture_output=True, text=True, env=env
        )
        assert res.returncode == 0, res.stderr
        peaks.append(int(res.stdout.split()[-1]))
    assert line_mb > 4 and peaks[1] - peaks[0] < 20 * line_mb, (peaks, line_mb)
