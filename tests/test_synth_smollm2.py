"""Real-model data making (slow): with the embedded SmolLM2-135M-Instruct, synth 30 instructions from 8
seeds, constitute 10 prompts with the default constitution, judge 10 prompts' candidate pairs, print
the counts kept and dropped by reason, and train on what was made (SFT and DPO on tiny:llama).

A 135M model makes weak data (docs/data.md says so); this test proves the commands run end to end on a
real model and that what they write trains, not that the data is good. Skipped when the model has not
been fetched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.assets import AssetMissingError, asset_path
from tunelab.cli import app
from tunelab.synth.constitute import load_constitution

pytestmark = pytest.mark.slow

SMOLLM2 = "asset:smollm2-135m-instruct"
SEEDS = [
    {"instruction": "Give three tips for staying healthy.", "output": "Eat well, sleep enough, move daily."},
    {"instruction": "Translate the sentence into French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Write a haiku about the sea.", "output": "Waves fold into foam / salt wind on the quiet shore / gulls write on the sky"},
    {"instruction": "Classify the sentiment of the review as positive or negative.", "input": "I loved it",
     "output": "positive", "is_classification": True},
    {"instruction": "Summarise the paragraph in one sentence.", "input": "The meeting moved to Friday because "
     "the room was booked on Thursday.", "output": "The meeting is now on Friday."},
    {"instruction": "Name the capital of the country.", "input": "Japan", "output": "Tokyo"},
    {"instruction": "Explain what a noun is to a child.", "output": "A noun is a word for a thing, a person or a place."},
    {"instruction": "Convert the temperature from Celsius to Fahrenheit.", "input": "20 C", "output": "68 F"},
]  # fmt: skip
PROMPTS = [
    "How do I boil an egg?",
    "Write a short poem about autumn.",
    "What is the capital of France?",
    "Give me one tip for learning a language.",
    "Explain what a computer is in one sentence.",
    "Name three fruits.",
    "How can I sleep better?",
    "What does a bee do?",
    "Describe the colour blue to someone.",
    "Why is exercise good for you?",
]


@pytest.fixture(scope="module", autouse=True)
def _smollm2() -> None:
    try:
        asset_path("smollm2-135m-instruct")
    except AssetMissingError:
        pytest.skip("SmolLM2 not fetched; run `tunelab assets fetch`")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run(*args: str) -> dict:
    """One data-making command with --json; its summary (kept, dropped by stage and reason)."""
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def show(name: str, summary: dict) -> None:
    print(f"\n{name}: kept {summary['kept']}")
    for stage, counts in summary["dropped_by"].items():
        for reason, count in counts.items():
            print(f"  dropped ({stage}): {reason} {count}")


def train_on(tmp_path: Path, name: str, data: Path, objective: dict) -> Path:
    from tunelab.recipe import parse_recipe
    from tunelab.train.run import train

    raw = {
        "seed": 0,
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "max_length": 256},
        "method": {"name": "lora"},
        "objective": objective,
        "training": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0},
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    }
    run_dir = train(parse_recipe(raw)).run_dir
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "completed"
    return run_dir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smollm2-data")


def options(workdir: Path) -> list[str]:
    return [
        "--model",
        SMOLLM2,
        "--cache-dir",
        str(workdir / "cache"),
        "--device",
        "cpu",
        "--max-tokens",
        "96",
    ]


def test_synth_30_from_8_seeds_then_sft(workdir: Path) -> None:
    seeds = write_jsonl(workdir / "seeds.jsonl", SEEDS)
    synth = run(
        "data", "synth", str(seeds), "-o", str(workdir / "synth.jsonl"), "--n", "30", *options(workdir)
    )
    show("synth", synth)
    rows = read_jsonl(workdir / "synth.jsonl")
    assert synth["kept"] == 30 and len(rows) == 30
    assert all(r["provenance"]["model"] == SMOLLM2 for r in rows)
    train_on(workdir, "sft-synth", workdir / "synth.jsonl", {"name": "sft"})


def test_constitute_and_judge_10_prompts_then_sft_and_dpo(workdir: Path) -> None:
    prompts = write_jsonl(workdir / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    made = run("data", "constitute", str(prompts), "-o", str(workdir / "cai.jsonl"), *options(workdir))
    show("constitute (SFT)", made["sft"])
    show("constitute (pairs)", made["pairs"])
    sft_rejects = read_jsonl(workdir / "cai.jsonl.rejects.jsonl")
    assert made["prompts"] == 10 and made["sft"]["kept"] + len(sft_rejects) == 10
    assert made["pairs"]["kept"] >= 1
    assert {r["principle"] for r in read_jsonl(workdir / "cai.jsonl")[0]["provenance"]["rounds"]} <= {
        p.name for p in load_constitution()
    }

    judged = run(
        "data", "judge", str(prompts), "-o", str(workdir / "judged.jsonl"), "--judge", SMOLLM2,
        "--candidates", "2", "--judge-max-tokens", "128", *options(workdir),
    )  # fmt: skip
    show("judge", judged)
    judge_rejects = read_jsonl(workdir / "judged.jsonl.rejects.jsonl")
    assert judged["kept"] + len(judge_rejects) == 10  # every prompt judged: a pair or a reason
    print(f"judge: {judged['kept']} pairs from 10 prompts")

    train_on(workdir, "sft-cai", workdir / "cai.jsonl", {"name": "sft"})
    pairs = read_jsonl(workdir / "cai.pairs.jsonl") + read_jsonl(workdir / "judged.jsonl")
    train_on(workdir, "dpo", write_jsonl(workdir / "pairs.jsonl", pairs), {"name": "dpo"})
