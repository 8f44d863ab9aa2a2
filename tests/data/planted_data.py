"""Planted-problem data: small data sets where every problem is put in on purpose and counted."""

from __future__ import annotations

import json
import random

WORDS = [f"w{i}" for i in range(5000)]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def clean_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"instruction": sentence(rng, 12), "input": sentence(rng, 6), "output": sentence(rng, 20)}
        for _ in range(n)
    ]


def planted_train() -> list[dict]:
    """40 clean rows, then planted problems. Expected counts are in PLANTED."""
    rows = clean_rows(40, seed=1)
    # 3 exact duplicates (one differs only in case and spacing) of rows 0, 1, 2.
    rows.append(dict(rows[0]))
    rows.append(dict(rows[1]))
    rows.append({k: "  " + v.upper().replace(" ", "   ") for k, v in rows[2].items()})
    # 2 near duplicates of rows 3 and 4: one word of the output changed.
    for i in (3, 4):
        r = dict(rows[i])
        r["output"] = r["output"].rsplit(" ", 1)[0] + " changed"
        rows.append(r)
    rng = random.Random(99)

    def row(**kw):
        r = {"instruction": sentence(rng, 12), "input": sentence(rng, 6), "output": sentence(rng, 20)}
        r.update(kw)
        return r

    rows += [
        row(output=sentence(rng, 10) + " write to ana.lopez@example.org please"),
        row(input="cc bob_smith+news@mail.example.co.uk " + sentence(rng, 4)),
        row(output="card 4111 1111 1111 1111 " + sentence(rng, 10)),  # valid Luhn
        row(output="card 4111 1111 1111 1112 " + sentence(rng, 10)),  # Luhn-invalid: not PII
        row(output="call +44 20 7946 0958 " + sentence(rng, 10)),
        row(output="server 192.168.10.20 " + sentence(rng, 10)),
        row(output="iban GB82 WEST 1234 5698 7654 32 " + sentence(rng, 10)),  # valid
        row(output="iban GB00 WEST 1234 5698 7654 32 " + sentence(rng, 10)),  # bad checksum
        row(output=""),  # empty assistant turn: a format error since issue 15 (row 54)
        row(input="   "),  # whitespace-only field
        {"instruction": sentence(rng, 12), "output": sentence(rng, 20)},  # missing key "input"
        row(output=sentence(rng, 5) + " bell\x07 " + sentence(rng, 5)),  # control character
        row(output="the cafÃ© was nice " + sentence(rng, 5)),  # mojibake
        row(output=sentence(rng, 100)),  # over max_length=60 words
        row(instruction=sentence(rng, 70)),  # prompt alone over 60: response cut entirely
        {"instruction": "Hi", "input": "", "output": "Yo"},  # too short (2 words)
    ]
    return rows


PLANTED = {
    "rows": 61,
    "exact_rows": 3,
    "exact_clusters": 3,
    "near_pairs": 2,
    "email": 2,
    "credit_card": 1,
    "phone": 1,
    "ip": 1,
    "iban": 1,
    "empty_targets": 0,  # the planted empty output is rejected as a format error instead
    "format_errors": 1,
    "input_whitespace": 1,
    "input_missing": 1,
    "input_empty": 1,
    "control": 1,
    "mojibake": 1,
    "over": 2,
    "cut": 1,
    "short": 1,
}


def planted_eval(train: list[dict]) -> list[dict]:
    """10 fresh rows, 1 exact copy of train row 6 and 1 near copy of train row 7."""
    rows = clean_rows(10, seed=2)
    rows.append(dict(train[6]))
    near = dict(train[7])
    near["output"] = "changed " + near["output"].split(" ", 1)[1]
    rows.append(near)
    return rows
