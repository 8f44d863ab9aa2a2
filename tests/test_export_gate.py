"""The export parity gate: `tunelab export` runs the export next to the run on held-out examples in
the engine that serves it, passes a faithful export, and fails a broken one with exit 3 naming the
failing check; QLoRA's merge choice; `tunelab eval --compare` with exported artefacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from llamacpp_gate import usable_llama_cpp
from tunelab.cli import app
from tunelab.evaluate.engines import EngineEval, Generation, token_agreement
from tunelab.export import EXPORT_META
from tunelab.export.gate import (
    GATE_FAILED_EXIT,
    QLORA_MERGES,
    compare_evals,
    export_and_verify,
    held_out_data,
    verify_export,
)
from tunelab.recipe import DEFAULT_EXPORT_GATES, ExportSection, RecipeError, parse_recipe

QA = [
    ("Say hi", "hi there"),
    ("Count to three", "one two three"),
    ("Name a colour", "blue"),
    ("Name an animal", "a cat"),
    ("What is two plus two", "four"),
    ("Say bye", "goodbye"),
]
# A chat template that is not the one the run trained with: other role markers, no end-of-turn token.
WRONG_TEMPLATE = (
    "{%- for message in messages %}{{- '### ' + message['role'] + ': ' + message['content'] + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '### answer: ' }}{%- endif %}"
)
QUIET = Console(quiet=True)


def _qa_file(root: Path) -> Path:
    path = root / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA), encoding="utf-8"
    )
    return path


def _fake_run(root: Path, *, seed: int = 0, with_eval: bool = True) -> Path:
    """A finished full-model run of the tiny model written by hand (no training): seconds, not minutes."""
    from tunelab.models.tiny import save_tiny_model

    run = root / "runs" / "fake"
    final = save_tiny_model(run / "final", seed=seed)
    meta = {"method": "full", "artifact": "full", "base_model": "tiny:llama", "seed": seed}
    meta |= {"objective": "sft", "model_kind": "causal_lm", "step": 0}
    (final / "tunelab.json").write_text(json.dumps(meta), encoding="utf-8")
    data = {"eval": str(_qa_file(root))} if with_eval else {}
    # a short budget keeps these CPU tests quick; untrained, the tiny model never stops by itself
    recipe = {"data": data, "export": {"max_new_tokens": 8}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return run


def _provenance(out: Path) -> dict:
    return json.loads((out / EXPORT_META).read_text(encoding="utf-8"))


# -- thresholds and checks, no model --------------------------------------------------------------


def test_recipe_export_gate_defaults_overrides_and_unknown_precisions():
    section = ExportSection.model_validate({"gate": {"q4_k_m": {"max_drop": 0.05}}})
    assert section.thresholds("q4_k_m") == DEFAULT_EXPORT_GATES["q4_k_m"] | {"max_drop": 0.05}
    assert section.thresholds("f16")["max_drop"] is None  # no significant drop
    assert section.verify_n == 64
    raw = {"model": {"name_or_path": "tiny:llama"}, "data": {"train": "x.jsonl"}, "method": {"name": "lora"}}
    recipe = parse_recipe(raw | {"export": {"verify_n": 8}})
    assert recipe.export.verify_n == 8
    with pytest.raises(RecipeError, match="unknown export precision.*q3"):
        parse_recipe(raw | {"export": {"gate": {"q3": {"max_drop": 0.1}}}})


def _engine_eval(texts: list[str], ids: list[list[int]], stopped: list[bool], logprob: float) -> EngineEval:
    gens = [Generation(t, i, s) for t, i, s in zip(texts, ids, stopped)]
    return EngineEval("x", ["a"] * len(texts), gens, [[logprob, logprob]] * len(texts))


def test_compare_evals_names_each_failing_check():
    n = 20
    run = _engine_eval(["a"] * n, [[1, 2, 3, 9]] * n, [True] * n, -0.5)
    same = compare_evals(
        run, _engine_eval(["a"] * n, [[1, 2, 3, 9]] * n, [True] * n, -0.5), DEFAULT_EXPORT_GATES["f16"]
    )
    assert same["passed"] and same["failed_checks"] == [] and same["export"]["token_agreement"] == 1.0
    broken = _engine_eval(["b"] * n, [[1, 5, 5, 5]] * n, [False] * n, -2.0)
    result = compare_evals(run, broken, DEFAULT_EXPORT_GATES["f16"])
    assert not result["passed"]
    assert result["failed_checks"] == ["exact_match", "token_agreement", "perplexity", "stop_share"]
    assert result["comparison"]["delta"] == -1.0 and result["comparison"]["ci95"][1] < 0
    # q4_k_m allows a drop of 2 points: 1 of 20 wrong (5 points) still fails, none wrong passes
    one_off = _engine_eval(["a"] * (n - 1) + ["b"], [[1, 2, 3, 9]] * n, [True] * n, -0.5)
    assert compare_evals(run, one_off, DEFAULT_EXPORT_GATES["q4_k_m"])["failed_checks"] == ["exact_match"]
    assert token_agreement([1, 2, 3], [1, 2, 4, 5]) == 0.5 and token_agreement([], []) == 1.0


def test_held_out_data_prefers_verify_data_then_eval_then_split_then_train(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    train = _qa_file(tmp_path)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"data": {"train": str(train)}}))
    assert held_out_data(run / "final") == (str(train), "train")
    (run / "data").mkdir()
    (run / "data" / "validation.jsonl").write_text(train.read_text())
    assert held_out_data(run / "final") == (str(run / "data" / "validation.jsonl"), "held-out")
    assert held_out_data(run / "final", train) == (str(train), "given")
    with pytest.raises(FileNotFoundError, match="--verify-data nope.jsonl: no such file"):
        held_out_data(run / "final", "nope.jsonl")


def test_qlora_merge_names_match_the_merge_module():
    from tunelab.export import merge

    assert merge.QLORA_MERGES == QLORA_MERGES
    with pytest.raises(ValueError, match="choose one of base16, dequantized"), merge.qlora_merge_mode("nf4"):
        pass


# -- the gate on real exports of a hand-written run ------------------------------------------------


def test_faithful_merged_export_passes_and_is_recorded(tmp_path):
    run = _fake_run(tmp_path)
    out, verification = export_and_verify(run, tmp_path / "merged", kind="merged", console=QUIET)
    assert verification["passed"] and verification["engine"] == "transformers"
    assert verification["export"]["token_agreement"] == 1.0 and verification["n"] == len(QA)
    assert verification["run"]["perplexity"] == pytest.approx(verification["export"]["perplexity"], rel=1e-4)
    recorded = _provenance(out)["verification"]
    assert (
        recorded["passed"] is True and recorded["failed_checks"] == [] and recorded["data_role"] == "held-out"
    )


def test_wrong_chat_template_in_the_export_fails_the_gate(tmp_path):
    run = _fake_run(tmp_path)
    out, _ = export_and_verify(run, tmp_path / "merged", kind="merged", verify=False)
    assert _provenance(out)["verification"] == {"skipped": "--no-verify"}
    (out / "chat_template.jinja").unlink(missing_ok=True)  # transformers 5 keeps the template here
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": WRONG_TEMPLATE}))
    verification = verify_export(run / "final", out, console=QUIET)
    assert not verification["passed"] and "token_agreement" in verification["failed_checks"]
    assert _provenance(out)["verification"]["passed"] is False


def test_cli_exits_3_naming_the_check_and_keeps_the_files(tmp_path, monkeypatch):
    """Break the export on purpose: other weights than the run's (a wrong base, a lost adapter)."""
    from tunelab.export import merge

    run = _fake_run(tmp_path)
    real = merge.merged_model

    def wrong_weights(final, **kwargs):
        model, tokenizer = real(final, **kwargs)
        other, _ = real(_fake_run(tmp_path / "other", seed=7) / "final")
        return other, tokenizer

    monkeypatch.setattr(merge, "merged_model", wrong_weights)
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(out), "--merge"])
    assert result.exit_code == GATE_FAILED_EXIT, result.output
    text = " ".join(result.output.split())
    assert "export parity gate failed (" in text and "token_agreement" in text and "files kept in" in text
    assert (out / "model.safetensors").is_file()
    recorded = _provenance(out)["verification"]
    assert recorded["passed"] is False and "token_agreement" in recorded["failed_checks"]


def test_cli_options_verify_data_n_and_no_verify(tmp_path):
    run = _fake_run(tmp_path, with_eval=False)
    runner = CliRunner()
    refused = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "a"), "--merge"])
    assert refused.exit_code == 2 and "--verify-data FILE, or --no-verify" in " ".join(refused.output.split())
    assert not (tmp_path / "a").exists()  # nothing written when there is nothing to verify on
    data = _qa_file(tmp_path)
    ok = runner.invoke(
        app,
        [
            "export",
            str(run),
            "--out",
            str(tmp_path / "b"),
            "--merge",
            "--verify-data",
            str(data),
            "--verify-n",
            "2",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "export parity gate passed" in ok.output
    assert _provenance(tmp_path / "b")["verification"]["n"] == 2
    skipped = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "c"), "--merge", "--no-verify"])
    assert skipped.exit_code == 0 and "--no-verify" in skipped.output


def test_gguf_gate_without_llama_cpp_refuses_before_writing(tmp_path, monkeypatch):
    import importlib.util

    run = _fake_run(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"needs llama.cpp: run `make gguf`.*--no-verify skips the gate"):
        export_and_verify(run, tmp_path / "g", kind="gguf", gguf_type="f16")
    assert not (tmp_path / "g").exists()


# -- llama.cpp ---------------------------------------------------------------------------------------


def _gguf_with(tmp_path: Path, run: Path, *, template: str | None = None) -> Path:
    """A GGUF of the run written by tunelab's llama writer (llama.cpp loads it), optionally with a
    different chat template than the run's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.gguf_write import write_llama_gguf

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    if template is not None:
        tokenizer.chat_template = template
    out = tmp_path / "gguf-export"
    out.mkdir(parents=True)
    write_llama_gguf(model, tokenizer, out / "model-f32.gguf", dtype="f32")
    provenance = {"kind": "gguf", "gguf_type": "f32"}
    (out / EXPORT_META).write_text(json.dumps(provenance), encoding="utf-8")
    return out


def test_llama_cpp_engine_reproduces_transformers_on_the_same_weights(tmp_path):
    usable_llama_cpp()
    from tunelab.evaluate.engines import LlamaCppEngine, TransformersEngine

    run = _fake_run(tmp_path)
    gguf = _gguf_with(tmp_path, run) / "model-f32.gguf"
    hf, cpp = TransformersEngine.load(str(run)), LlamaCppEngine(gguf)
    prompt = [{"role": "user", "content": "Name a colour"}]
    assert cpp.render(prompt, generation_prompt=True) == hf.render(prompt, generation_prompt=True)
    assert cpp.stop_ids == hf.stop_ids  # <|im_end|> from the GGUF's own metadata
    assert cpp.generate(prompt, 12).token_ids == hf.generate(prompt, 12).token_ids
    assert cpp.answer_logprobs(prompt, "blue") == pytest.approx(hf.answer_logprobs(prompt, "blue"), abs=1e-3)
    cpp.close()


def test_gguf_export_passes_in_llama_cpp_and_a_wrong_template_fails(tmp_path):
    usable_llama_cpp()
    run = _fake_run(tmp_path)
    good = verify_export(run / "final", _gguf_with(tmp_path / "a", run), n=3, console=QUIET)
    assert good["passed"] and good["engine"] == "llama.cpp" and good["export"]["token_agreement"] == 1.0
    bad_dir = _gguf_with(tmp_path / "b", run, template=WRONG_TEMPLATE)
    bad = verify_export(run / "final", bad_dir, n=3, console=QUIET)
    assert not bad["passed"] and "token_agreement" in bad["failed_checks"]
    assert _provenance(bad_dir)["verification"]["failed_checks"] == bad["failed_checks"]


def test_eval_compare_puts_a_gguf_next_to_base_and_run(tmp_path):
    usable_llama_cpp()
    run = _fake_run(tmp_path)
    gguf = _gguf_with(tmp_path, run) / "model-f32.gguf"
    data = tmp_path / "qa.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--data",
            str(data),
            "--compare",
            "tiny:llama",
            str(run),
            str(gguf),
            "--json",
            "--max-new-tokens",
            "4",
            "--max-examples",
            "3",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [m["role"] for m in payload["models"]] == ["base", "tuned", "export"]
    tuned, shipped = payload["models"][1]["metrics"], payload["models"][2]["metrics"]
    assert shipped["exact_match"] == tuned["exact_match"] and "stop_share" in shipped
    (export,) = payload["exports"]
    assert export["name"] == str(gguf) and export["delta"] == 0.0


# -- trained runs: breaking the export on purpose ---------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA run trained until it answers the QA rows (and stops), so it differs from its base."""
    from tunelab.train.run import train

    root = tmp_path_factory.mktemp("trained")
    data = str(_qa_file(root))
    recipe = parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": data, "eval": data, "max_length": 64},
            "method": {"name": "lora"},
            "training": {"max_steps": 30, "batch_size": 6, "learning_rate": 1e-2, "warmup_steps": 0},
            "output": {"dir": str(root / "runs"), "name": "qa"},
        }
    )
    return train(recipe, console=QUIET).run_dir


@pytest.mark.slow
def test_dropping_the_adapter_before_merge_fails_with_exit_3(trained_run, tmp_path, monkeypatch):
    from tunelab.export import merge
    from tunelab.models.load import load_model

    def base_only(final, **kwargs):  # the bug: the adapter never makes it into the export
        return load_model("tiny:llama", device="cpu", dtype="float32")

    monkeypatch.setattr(merge, "merged_model", base_only)
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["export", str(trained_run), "--out", str(out), "--merge"])
    assert result.exit_code == GATE_FAILED_EXIT, result.output
    recorded = _provenance(out)["verification"]
    assert recorded["run"]["exact_match"] >= 0.8 and recorded["export"]["exact_match"] == 0.0
    assert {"exact_match", "token_agreement", "stop_share"} <= set(recorded["failed_checks"])
    line = " ".join(result.output.split())
    assert (
        "export parity gate failed (exact_match, token_agreement" in line and "dropped significantly" in line
    )


@pytest.mark.slow
def test_trained_run_adapter_and_merged_exports_pass(trained_run, tmp_path):
    for kind in ("merged", "adapter"):
        _, verification = export_and_verify(trained_run, tmp_path / kind, kind=kind, console=QUIET)
        assert verification["passed"], verification["failures"]
        assert verification["run"]["stop_share"] == 1.0 and verification["export"]["token_agreement"] == 1.0
        assert verification["engine"] == ("peft" if kind == "adapter" else "transformers")


@pytest.mark.slow
def test_trained_run_gguf_with_the_wrong_template_fails(trained_run, tmp_path):
    usable_llama_cpp()
    from tunelab.export.merge import merged_model
    from tunelab.models.gguf_write import write_llama_gguf

    model, tokenizer = merged_model(trained_run / "final")
    tokenizer.chat_template = WRONG_TEMPLATE
    out = tmp_path / "gguf"
    out.mkdir()
    write_llama_gguf(model, tokenizer, out / "qa-f16.gguf", dtype="f16")
    (out / EXPORT_META).write_text(json.dumps({"kind": "gguf", "gguf_type": "f16"}))
    verification = verify_export(trained_run / "final", out, console=QUIET)
    assert not verification["passed"]
    assert {"exact_match", "token_agreement"} <= set(verification["failed_checks"])


@pytest.mark.slow
def test_qlora_merge_into_16bit_base_by_default_or_the_dequantised_one(tmp_path):
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.evaluate.run import load_for_eval
    from tunelab.models.load import load_model
    from tunelab.train.run import train

    data = str(_qa_file(tmp_path))
    recipe = parse_recipe(
        {
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": data, "eval": data, "max_length": 64},
            "method": {"name": "qlora"},
            "training": {"max_steps": 2, "batch_size": 6, "learning_rate": 1e-2, "warmup_steps": 0},
            "output": {"dir": str(tmp_path / "runs"), "name": "q"},
        }
    )
    run = train(recipe, console=QUIET).run_dir
    ids = torch.arange(2, 26).reshape(2, 12)

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    default, verification = export_and_verify(run, tmp_path / "b16", kind="merged", console=QUIET)
    dense_base, _ = load_model("tiny:llama", device="cpu", dtype="float32")
    on_dense = PeftModel.from_pretrained(dense_base, str(run / "final")).merge_and_unload()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(default)), logits(on_dense))
    assert _provenance(default)["qlora_merge"] == "base16"
    alt = verification["qlora_merge"]
    assert alt["used"] == "base16" and alt["alternative"] == "dequantized" and len(alt["ci95"]) == 2
    deq, _ = export_and_verify(run, tmp_path / "deq", kind="merged", qlora_merge="dequantized", verify=False)
    four_bit, _ = load_for_eval(str(run), device="cpu", dtype="float32")
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(deq)), logits(four_bit), atol=1e-5, rtol=0
    )


@pytest.mark.slow
def test_classifier_head_export_is_verified_on_accuracy_and_predictions(tmp_path):
    from tunelab.train.run import train

    data = str(Path(__file__).resolve().parents[1] / "recipes/data/tiny_cls_train.jsonl")
    recipe = parse_recipe(
        {
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": data, "max_length": 32},
            "method": {"name": "lora"},
            "objective": {"name": "classify"},
            "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 0},
            "output": {"dir": str(tmp_path / "runs"), "name": "cls"},
        }
    )
    run = train(recipe, console=QUIET).run_dir
    out, verification = export_and_verify(run, tmp_path / "merged", kind="merged", console=QUIET)
    assert verification["passed"] and verification["main_metric"] == "accuracy"
    assert verification["export"]["prediction_agreement"] == 1.0 and verification["data_role"] == "train"
    assert _provenance(out)["verification"]["failed_checks"] == []


# -- batches, the run side's cache, messages that read like the verdict (issue 30) ------------------

LABELLED = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [("Loved it", "positive"), ("Dull", "negative"), ("A joy", "positive"), ("Meh", "negative")]
]


def test_batched_transformers_side_equals_one_example_at_a_time(tmp_path):
    from tunelab.evaluate.engines import Engine, TransformersEngine, evaluate_engine

    engine = TransformersEngine.load(str(_fake_run(tmp_path)), name="run")
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    batched = evaluate_engine(engine, conversations + LABELLED, max_new_tokens=8)
    labelled = evaluate_engine(engine, LABELLED, labels=["negative", "positive"], max_new_tokens=8)
    for result, convs, labels in (
        (batched, conversations + LABELLED, None),
        (labelled, LABELLED, ["negative", "positive"]),
    ):
        for i, conv in enumerate(convs):
            prompt, gold = conv[:-1], conv[-1]["content"]
            alone = Engine.generate(engine, prompt, 8)  # the unbatched path, one prompt, no padding
            assert result.generations[i] == alone
            assert result.answer_logprobs[i] == pytest.approx(engine.answer_logprobs(prompt, gold), abs=1e-4)
            if labels:
                sums = [sum(engine.answer_logprobs(prompt, lab, with_stop=False)) for lab in labels]
                assert result.label_predictions[i] == labels[sums.index(max(sums))]


def test_llama_cpp_reuses_the_prompt_and_scores_as_a_fresh_context(tmp_path):
    pytest.importorskip("llama_cpp")
    from tunelab.evaluate.engines import LlamaCppEngine

    run = _fake_run(tmp_path)
    cpp = LlamaCppEngine(_gguf_with(tmp_path, run) / "model-f32.gguf")
    prompt = [{"role": "user", "content": "Name a colour"}]
    fresh = []
    for answer in ("blue", "a cat", "blue"):
        cpp.llm.reset()
        fresh.append(cpp.answer_logprobs(prompt, answer))
    cpp.generate(prompt, 8)
    evaluated = cpp.llm.n_tokens
    reused = [cpp.answer_logprobs(prompt, answer) for answer in ("blue", "a cat", "blue")]
    for got, want in zip(reused, fresh):
        assert got == pytest.approx(want, abs=1e-4)
    assert evaluated > len(cpp.prompt_ids(prompt))  # the greedy answer was in the context before scoring
    cpp.close()


def test_the_run_side_is_reused_across_exports_and_measured_again_when_its_inputs_change(
    tmp_path, monkeypatch
):
    from tunelab.evaluate import engines

    run = _fake_run(tmp_path)
    first = verify_export(run / "final", _merged(run, tmp_path / "a"), n=3, console=QUIET)
    assert first["run_side"]["reused"] is False
    assert Path(first["run_side"]["cache"]).parent == run / "export_gate_cache"
    loads = []
    real = engines.TransformersEngine.load
    monkeypatch.setattr(
        engines.TransformersEngine, "load", lambda spec, **kw: loads.append(spec) or real(spec, **kw)
    )
    second = verify_export(run / "final", _merged(run, tmp_path / "b"), n=3, console=QUIET)
    assert second["run_side"] == first["run_side"] | {"reused": True}
    assert second["run"] == first["run"] and loads == [str(tmp_path / "b")]  # only the export was run
    # other examples, another budget, other final weights: the run is measured again
    assert verify_export(run / "final", tmp_path / "b", n=2, console=QUIET)["run_side"]["reused"] is False
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) | {"export": {"max_new_tokens": 6}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert verify_export(run / "final", tmp_path / "b", n=3, console=QUIET)["run_side"]["reused"] is False
    meta = json.loads((run / "final" / "tunelab.json").read_text()) | {"step": 1}
    (run / "final" / "tunelab.json").write_text(json.dumps(meta))
    assert verify_export(run / "final", tmp_path / "b", n=3, console=QUIET)["run_side"]["reused"] is False
    # a damaged entry is measured again, not trusted
    Path(first["run_side"]["cache"]).write_text("{not json")
    for path in (run / "export_gate_cache").iterdir():
        path.write_text("{not json")
    assert verify_export(run / "final", tmp_path / "b", n=3, console=QUIET)["run_side"]["reused"] is False


def _merged(run: Path, out: Path) -> Path:
    path, _ = export_and_verify(run, out, kind="merged", verify=False)
    return path


def test_passed_checks_read_like_a_pass():
    n = 20
    run = _engine_eval(["a"] * (n - 1) + ["b"], [[1, 2, 3, 9]] * n, [True] * n, -0.5)
    better = _engine_eval(["a"] * n, [[1, 2, 3, 9]] * n, [True] * n, -0.5)
    for limits in (DEFAULT_EXPORT_GATES["q4_k_m"], DEFAULT_EXPORT_GATES["f16"]):
        result = compare_evals(run, better, limits)
        assert result["passed"] and result["failures"] == []
        for check in result["checks"]:
            assert not any(
                w in check["message"]
                for w in ("more than", ", below the minimum", ", above the maximum", "excludes")
            )
        main = result["checks"][0]["message"]
        assert "rose by 0.0500" in main or "no significant drop" in main
    failed = compare_evals(better, run, {**DEFAULT_EXPORT_GATES["q4_k_m"], "max_drop": 0.02})
    assert (
        failed["failures"][0].startswith("exact_match dropped by 0.0500")
        and "more than the 0.0200" in failed["failures"][0]
    )
