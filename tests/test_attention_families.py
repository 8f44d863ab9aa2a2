"""``model.attention`` and ``data.packing`` decided from each model family's config (issue 27, part 1).

Each family is built tiny from its transformers config (2 layers, hidden 64, on CPU). For each the
tests check what ``auto`` picks on a simulated CUDA machine that has PyTorch's varlen kernel, that
an explicit ``varlen`` is refused naming the config field, and, on CPU, that packed loss equals the
unpacked loss on every family that packs (through the attention the run would use there), and that
the families which cannot pack exactly really would mix packed examples.

The window rule (models/attention.py): a query sees a key when ``q - k < sliding_window``; inside an
example of ``L`` tokens ``q - k <= L - 1``, so a window of at least the longest example hides
nothing, and ``data.max_length`` bounds every example. Tests at the boundary: a window equal to the
longest example is exact through varlen, one token less is refused by the kernel.

Tolerances: fp32; packed and unpacked batches run the same maths in another order, so loss sums agree
within ``rel=1e-5`` (as tests/test_packing_kernels.py).
"""

from __future__ import annotations

import json
from io import StringIO

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3NextConfig,
)
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

from tunelab.data.packing import PackingUnsupported, packing_isolates
from tunelab.models import varlen
from tunelab.models.attention import (
    AttentionUnavailable,
    Machine,
    ModelAttention,
    decide_attention,
    packing_refusal,
)
from tunelab.recipe import parse_recipe

MAX_LENGTH = 32
LENGTHS = (5, 12, 3, 9, 7)  # two examples longer than the 8-token windows below, all within MAX_LENGTH
LOSS_REL = 1e-5
VOCAB = 97
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
LINEAR = {
    "head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "layer_types": ["linear_attention", "full_attention"],
}
CUDA = Machine("cuda", flash_attn=False, varlen_kernel=None, flex=True)
"""A CUDA GPU with PyTorch's varlen kernel and no flash-attn: where auto would take varlen."""


def _families() -> dict[str, object]:
    return {
        "llama": LlamaConfig(**SHAPE),
        "mistral": MistralConfig(**SHAPE, sliding_window=8),
        "mistral-window-at-max-length": MistralConfig(**SHAPE, sliding_window=MAX_LENGTH),
        "qwen2": Qwen2Config(**SHAPE),
        "qwen2-sliding": Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=1),
        "qwen2-sliding-off": Qwen2Config(**SHAPE, use_sliding_window=False, sliding_window=8),
        "phi3": Phi3Config(**SHAPE, sliding_window=8, pad_token_id=0),
        "gemma2": Gemma2Config(**SHAPE, head_dim=16, sliding_window=8),
        "gemma3": Gemma3TextConfig(
            **SHAPE, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
        ),
        "gpt_oss": GptOssConfig(
            **SHAPE,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "qwen3_next": Qwen3NextConfig(
            **SHAPE,
            **LINEAR,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        "qwen3_5": Qwen3_5TextConfig(**SHAPE, **LINEAR),
    }


FAMILIES = _families()
# family: (what auto picks on CUDA when the run may pack, the config text its refusal names or None)
EXPECTED = {
    "llama": (varlen.NAME, None),
    "mistral": (None, "sliding_window=8 in config is below data.max_length 32"),
    "mistral-window-at-max-length": (varlen.NAME, None),
    "qwen2": (varlen.NAME, None),
    "qwen2-sliding": (None, "sliding_window=8 in config"),
    "qwen2-sliding-off": (varlen.NAME, None),  # use_sliding_window: false turns the window off
    "phi3": (None, "sliding_window=8 in config"),
    "gemma2": (None, "attn_logit_softcapping=50 in config"),
    "gemma3": (None, "sliding_window=8 in config"),
    "gpt_oss": (None, "GptOssForCausalLM does not run on SDPA"),
    "qwen3_next": (None, "layer_types has linear_attention"),
    "qwen3_5": (None, "layer_types has linear_attention"),
}
CANNOT_PACK = {"qwen3_next", "qwen3_5"}
"""Refused packing from their config."""
MASK_IGNORES_RESTARTS = {"gpt_oss"}
"""Packing refused at run time by the probe: their mask ignores position restarts (see below)."""


def _facts(name: str) -> ModelAttention:
    return ModelAttention.from_config(FAMILIES[name])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_auto_on_cuda_takes_varlen_only_where_it_computes_the_models_attention(name):
    facts = _facts(name)
    may_pack = packing_refusal(facts, MAX_LENGTH) is None
    assert may_pack is (name not in CANNOT_PACK)
    choice = decide_attention("auto", CUDA, facts, packing=may_pack, max_length=MAX_LENGTH)
    picked, reason = EXPECTED[name]
    assert choice.name == picked
    if reason is None:
        assert choice.why == ""
    elif may_pack:  # auto fell back, and says why
        assert choice.why.startswith("varlen refused: ") and reason in choice.why
    else:  # nothing packs, so nothing to fall back from: packing's refusal carries the reason
        assert reason in (packing_refusal(facts, MAX_LENGTH) or "")


@pytest.mark.parametrize("name", sorted(n for n, (picked, _) in EXPECTED.items() if picked is None))
def test_an_explicit_varlen_is_refused_naming_the_config_field(name):
    with pytest.raises(
        AttentionUnavailable, match="model.attention: varlen would compute another attention"
    ) as err:
        decide_attention("varlen", CUDA, _facts(name), packing=True, max_length=MAX_LENGTH)
    assert EXPECTED[name][1] in str(err.value)


def test_a_window_at_least_data_max_length_is_harmless_and_one_below_is_not():
    at = ModelAttention.from_config(MistralConfig(**SHAPE, sliding_window=4096))
    assert decide_attention("auto", CUDA, at, packing=True, max_length=4096).name == varlen.NAME
    below = decide_attention("auto", CUDA, at, packing=True, max_length=4097)
    assert below.name is None and "sliding_window=4096 in config is below data.max_length 4097" in below.why


def test_the_decision_is_the_models_default_off_cuda_and_without_packing():
    for name in FAMILIES:
        facts = _facts(name)
        assert (
            decide_attention("auto", Machine("cpu"), facts, packing=True, max_length=MAX_LENGTH).name is None
        )
        assert decide_attention("auto", CUDA, facts, packing=False, max_length=MAX_LENGTH).name is None


def test_an_explicit_sdpa_on_a_model_transformers_runs_on_eager_only_is_refused():
    with pytest.raises(AttentionUnavailable, match="sdpa is not supported by GptOssForCausalLM"):
        decide_attention("sdpa", CUDA, _facts("gpt_oss"), packing=False)


# --- packed = unpacked on CPU --------------------------------------------------------------------


def _model(name: str, attention: str | None = None):
    config = FAMILIES[name]
    if attention == varlen.NAME:
        varlen.register()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    return model.float().eval()


def _examples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


@torch.no_grad()
def _unpacked_loss(model, parts: list[torch.Tensor]) -> float:
    width = max(len(p) for p in parts)
    ids = torch.zeros(len(parts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, part in enumerate(parts):
        ids[i, : len(part)], mask[i, : len(part)] = part, 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return float(_loss_sum(logits, ids.masked_fill(mask == 0, -100)))


@torch.no_grad()
def _packed_loss(model, parts: list[torch.Tensor]) -> float:
    """Every example in one row, positions restarting, no mask; an example's first token is not
    predicted from the previous example (as data/packing.py masks it)."""
    ids = torch.cat(parts)[None]
    positions = torch.cat([torch.arange(len(p)) for p in parts])[None]
    labels = ids.clone()
    labels[positions == 0] = -100
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    return float(_loss_sum(logits, labels))


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - CANNOT_PACK - MASK_IGNORES_RESTARTS))
def test_packed_loss_equals_unpacked_through_the_attention_the_run_uses(name):
    """On CPU the run keeps the model's default attention (sdpa, or eager for Gemma 2),
    whose dense mask carries the windows; where auto takes varlen on CUDA, its per-example reference
    (the same function the GPU kernel replaces) gives the unpacked loss too."""
    parts = _examples()
    default = _model(name)
    expected = _unpacked_loss(default, parts)
    assert _packed_loss(default, parts) == pytest.approx(expected, rel=LOSS_REL)
    if EXPECTED[name][0] == varlen.NAME:
        assert _packed_loss(_model(name, varlen.NAME), parts) == pytest.approx(expected, rel=LOSS_REL)


@pytest.mark.parametrize("name", sorted(CANNOT_PACK | MASK_IGNORES_RESTARTS))
def test_families_that_cannot_pack_exactly_would_mix_packed_examples(name):
    """Linear-attention layers ignore position restarts, so the resolver refuses to pack those
    families from their config. gpt-oss's dense mask ignores them too (transformers 5.25 builds its
    masks without the position ids), which no config says: the runtime probe that guards every
    packing run (``packing_isolates``, called before packing) refuses it there."""
    assert not packing_isolates(_model(name), VOCAB)


@pytest.mark.parametrize(("window", "exact"), [(max(LENGTHS), True), (max(LENGTHS) - 1, False)])
def test_varlen_is_exact_up_to_a_window_as_long_as_the_longest_example(window, exact):
    """The boundary of the window rule, in the kernel itself: a window as long as the longest packed
    example hides nothing; one token shorter would, so the kernel refuses rather than ignore it."""
    FAMILIES["window"] = MistralConfig(**SHAPE, sliding_window=window)
    try:
        parts = _examples()
        fast = _model("window", varlen.NAME)
        if exact:
            expected = _unpacked_loss(_model("window"), parts)
            assert _packed_loss(fast, parts) == pytest.approx(expected, rel=LOSS_REL)
        else:
            with pytest.raises(ValueError, match=f"sliding window of {window} tokens"):
                _packed_loss(fast, parts)
    finally:
        del FAMILIES["window"]


# --- the recipe, the plan and the run's settings line ------------------------------------------


def _recipe(**overrides):
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": "x", "max_length": MAX_LENGTH},
        "method": {"name": "lora"},
    }
    return parse_recipe(raw, overrides=[f"{k}={v}" for k, v in overrides.items()])


def test_the_recipe_falls_back_and_says_why_in_the_settings_line():
    fast = _recipe().fast_path("cuda", FAMILIES["gemma2"], CUDA)
    assert (fast.attention, fast.packing) == (None, False)
    line = fast.describe("auto", "auto", "eager")
    assert line == (
        "attention: eager (model.attention: auto: varlen refused: attn_logit_softcapping=50 in config: the "
        "varlen kernel does not cap attention logits); packing: off (data.packing: auto)"
    )
    llama = _recipe().fast_path("cuda", FAMILIES["llama"], CUDA)
    assert (llama.attention, llama.packing, llama.attention_why) == (varlen.NAME, True, "")


def test_packing_a_linear_attention_model_is_off_under_auto_and_refused_when_asked():
    fast = _recipe().fast_path("cuda", FAMILIES["qwen3_next"], CUDA)
    assert (fast.attention, fast.packing) == (None, False)
    assert fast.packing_why.startswith("refused: layer_types has linear_attention")
    assert "packing: off (data.packing: auto: refused: layer_types has linear_attention" in fast.describe(
        "auto", "auto", "sdpa"
    )
    with pytest.raises(
        PackingUnsupported, match="data.packing: layer_types has linear_attention.*data.packing: false"
    ):
        _recipe(**{"data.packing": "true"}).fast_path("cuda", FAMILIES["qwen3_5"], CUDA)
    with pytest.raises(AttentionUnavailable, match="varlen .*layer_types has linear_attention"):
        _recipe(**{"model.attention": "varlen", "data.packing": "false"}).fast_path(
            "cuda", FAMILIES["qwen3_5"], CUDA
        )
    unpacked = _recipe(**{"data.packing": "false"}).fast_path("cuda", FAMILIES["qwen3_5"], CUDA)
    assert (unpacked.attention, unpacked.packing, unpacked.packing_why) == (None, False, "")


def test_a_sliding_window_model_may_still_pack_through_its_dense_mask():
    """data.packing: true on Mistral: sdpa's mask carries the window and the document boundaries
    (packed = unpacked, tested above), so the run packs through it instead of through varlen."""
    fast = _recipe(**{"data.packing": "true"}).fast_path("cuda", FAMILIES["mistral"], CUDA)
    assert (fast.attention, fast.packing) == (None, True)
    assert "sliding_window=8" in fast.attention_why


def test_the_plan_says_why_auto_fell_back():
    from tunelab.plan.gpus import GPUS
    from tunelab.plan.memory import plan_inputs

    inputs = plan_inputs(_recipe(), GPUS["h100-80gb"], config=FAMILIES["qwen3_next"])
    note = next(n for n in inputs.notes if n.startswith("attention: "))
    assert "packing: off" in note and "layer_types has linear_attention" in note


def test_a_run_prints_autos_fallback_and_records_it(tmp_path, tiny_recipe, monkeypatch):
    """A tiny Mistral saved as a local model, trained on CPU with the machine probe saying CUDA with
    the varlen kernel: the settings line and the manifest say varlen was refused and why."""
    from tunelab.console import make_console
    from tunelab.models import attention
    from tunelab.train.run import train

    model_dir = _saved(tmp_path, "mistral", MistralConfig, sliding_window=16)
    monkeypatch.setattr(attention.Machine, "probe", classmethod(lambda cls, device_type: CUDA))
    log = StringIO()
    result = train(
        tiny_recipe("lora", model__name_or_path=str(model_dir), training__max_steps=1),
        console=make_console(file=log),
    )
    expected = "varlen refused: sliding_window=16 in config is below data.max_length 64"
    assert f"attention: sdpa (model.attention: auto: {expected}" in log.getvalue()
    assert "packing: off (data.packing: auto)" in log.getvalue()
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["attention"] == "sdpa" and manifest["packing"] is False
    assert expected in manifest["fast_path_reasons"]["attention"]


def _saved(tmp_path, name: str, config_cls, **fields):
    """A tiny model of ``config_cls`` saved as a local model directory tunelab can load."""
    from tunelab.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = config_cls(**{**SHAPE, "vocab_size": len(tok)}, pad_token_id=tok.pad_token_id, **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    ("config_cls", "fields", "setting", "error"),
    [
        (
            MistralConfig,
            {"sliding_window": 16},
            "model.attention=varlen",
            "error: model.attention: varlen would compute another attention than mistral's: sliding_window=16",
        ),
        (
            Qwen3_5TextConfig,
            dict(LINEAR),
            "data.packing=true",
            "error: data.packing: layer_types has linear_attention",
        ),
    ],
    ids=["varlen-on-a-window", "packing-linear-attention"],
)
def test_the_cli_refuses_in_one_line_before_the_model_loads(
    tmp_path, qa_rows, config_cls, fields, setting, error
):
    import yaml
    from typer.testing import CliRunner

    from tunelab.cli import app

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    recipe = {
        "model": {"name_or_path": str(_saved(tmp_path, "m", config_cls, **fields))},
        "data": {"train": str(data), "max_length": 64},
        "method": {"name": "lora"},
        "training": {"max_steps": 1, "batch_size": 2},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path), "--set", setting])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(error), result.output
    assert "Traceback" not in result.output
