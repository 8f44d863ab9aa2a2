"""Recommended settings for a model size and method, each with the rule it comes from.

Every value is a published setting (anchored at the model size it was published for) or a stated
scaling rule; nothing here is a bare guess. The anchors:

- full fine-tuning: LR 2e-5, cosine, 3% warmup, 3 epochs, no weight decay (Stanford Alpaca,
  LLaMA 7B/13B); batch 64 (Llama 2 SFT, Touvron et al. 2023 §3.1).
- LoRA / QLoRA: LR 2e-4 at 7B and 1e-4 at 65B, batch 16, constant schedule, 3% warmup, max grad
  norm 0.3, no weight decay, all linear layers adapted (QLoRA, Dettmers et al. 2023, and its
  ``scripts/finetune_guanaco_*.sh``).
- Size scaling: LR ∝ N^(-1/3), the slope of GPT-3's learning rate against size (Brown et al. 2020,
  Table 2.1: 6e-4 at 125M down to 0.6e-4 at 175B). From the 7B anchors it gives 1.0e-4 for LoRA at
  65B (QLoRA used 1e-4) and 9.3e-6 for full fine-tuning at 70B (Tulu 2 used 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import typer

ANCHOR_PARAMS = 7e9
LR_SIZE_EXPONENT = 1 / 3
LORA_LR_CAP = 5e-4

_SCALE_RULE = "× (7B / N)^(1/3), GPT-3 Table 2.1's LR-vs-size slope"
_LORA_FAMILY = ("lora", "dora", "qlora", "adalora")
_FULL_FAMILY = ("full", "freeze")
# Methods whose published learning rate does not depend on model size in any source we know:
# the value is used as is, and the rule says so.
_FIXED_LR = {
    "ia3": (
        3e-3,
        "IA3 LR 3e-3: T-Few (Liu et al. 2022) setting; no published size scaling, used at every size",
    ),
    "prompt_tuning": (
        3e-2,
        "prompt tuning LR 3e-2: PEFT's causal-LM prompt-tuning guide (AdamW); no size scaling known",
    ),
    "prefix_tuning": (1e-2, "prefix tuning LR 1e-2: PEFT's prefix-tuning guide; no size scaling known"),
    "p_tuning": (1e-3, "p-tuning LR 1e-3: PEFT's p-tuning guide; no size scaling known"),
    "adapter": (
        1e-4,
        "bottleneck adapter LR 1e-4: AdapterHub's recommended default (Houlsby et al. swept 3e-5..1e-3)",
    ),
}
METHODS = (*_FULL_FAMILY, *_LORA_FAMILY, *_FIXED_LR)


@dataclass(frozen=True)
class Recommendation:
    """One setting: the recipe field (dotted path), its value, and where the value comes from."""

    field: str
    value: Any
    rule: str


def _scaled(anchor: float, params: int) -> float:
    return anchor * (ANCHOR_PARAMS / params) ** LR_SIZE_EXPONENT


def _round_lr(lr: float) -> float:
    """Two significant digits: LRs are not known more precisely than that."""
    return float(f"{lr:.2g}")


def _learning_rate(params: int, method: str) -> Recommendation:
    size = human_params(params)
    if method in _FULL_FAMILY:
        lr = _round_lr(_scaled(2e-5, params))
        return Recommendation(
            "training.learning_rate",
            lr,
            f"full FT LR: 2e-5 at 7B (Alpaca, Llama 2 SFT) {_SCALE_RULE} → {lr:.2g} at {size}",
        )
    if method in _LORA_FAMILY:
        raw = _scaled(2e-4, params)
        lr = _round_lr(min(raw, LORA_LR_CAP))
        capped = (
            f", capped at {LORA_LR_CAP:g} (highest LoRA LR in the LoRA paper, RoBERTa-base)"
            if raw > LORA_LR_CAP
            else ""
        )
        return Recommendation(
            "training.learning_rate",
            lr,
            f"LoRA-family LR: 2e-4 at 7B (QLoRA; DoRA and AdaLoRA reuse LoRA's settings) {_SCALE_RULE}"
            f"{capped} → {lr:.2g} at {size}",
        )
    lr, rule = _FIXED_LR[method]
    return Recommendation("training.learning_rate", lr, rule)


def _batch(params: int, method: str, dataset_rows: int | None) -> list[Recommendation]:
    if method in _FULL_FAMILY:
        effective, source = 64, "effective batch 64: Llama 2 SFT"
    else:
        effective, source = 16, "effective batch 16: QLoRA (every size, 7B–65B)"
    if dataset_rows is not None and effective > max(1, dataset_rows // 10):
        effective = 2 ** int(math.log2(max(1, dataset_rows // 10)))
        source += f"; lowered to {effective} so {dataset_rows} rows give ≥10 optimizer steps per epoch"
    micro = min(effective, 16 if params < 1e9 else 4)
    return [
        Recommendation(
            "training.batch_size",
            micro,
            f"micro-batch {micro}: a memory setting, not a quality one "
            "(16 below 1B, 4 above as in QLoRA's 65B run); "
            "raise it while memory allows",
        ),
        Recommendation(
            "training.grad_accum", effective // micro, f"{source}; grad_accum = {effective} / {micro}"
        ),
    ]


def _epochs(dataset_rows: int | None) -> Recommendation:
    if dataset_rows is not None and dataset_rows > 100_000:
        return Recommendation(
            "training.epochs", 2, "2 epochs above 100k rows: Tulu 2 (326k rows) and Llama 2 SFT"
        )
    return Recommendation(
        "training.epochs", 3, "3 epochs: Stanford Alpaca (52k rows); small sets need the repeats"
    )


def _schedule(method: str) -> list[Recommendation]:
    if method in _FULL_FAMILY:
        return [
            Recommendation(
                "training.lr_scheduler", "cosine", "cosine decay: Stanford Alpaca and Llama 2 SFT"
            ),
            Recommendation("training.warmup_ratio", 0.03, "3% warmup: Stanford Alpaca"),
            Recommendation("training.weight_decay", 0.0, "no weight decay: Stanford Alpaca"),
        ]
    rows = [
        Recommendation("training.lr_scheduler", "constant", "constant LR after warmup: QLoRA"),
        Recommendation("training.warmup_ratio", 0.03, "3% warmup: QLoRA and Stanford Alpaca"),
        Recommendation("training.weight_decay", 0.0, "no weight decay: QLoRA"),
    ]
    if method in _LORA_FAMILY:
        rows.append(Recommendation("training.max_grad_norm", 0.3, "gradient clipping at 0.3: QLoRA"))
    return rows


def _method_fields(method: str) -> list[Recommendation]:
    if method in ("lora", "dora", "qlora"):
        return [
            Recommendation(
                "method.r",
                16,
                "rank 16: QLoRA found rank matters little once every linear layer is adapted; "
                "16 keeps the adapter small",
            ),
            Recommendation(
                "method.alpha",
                32,
                "alpha = 2·r: scale alpha/r = 2, the tunelab LoRA default, independent of r",
            ),
            Recommendation(
                "method.target_modules",
                "all-linear",
                "all linear layers: QLoRA showed adapting all of them is what matches full fine-tuning",
            ),
        ]
    if method == "prompt_tuning":
        return [
            Recommendation(
                "method.num_virtual_tokens",
                20,
                "20 virtual tokens: Lester et al. 2021 saw little gain beyond 20",
            )
        ]
    return []


def recommend(model_params: int, method: str, *, dataset_rows: int | None = None) -> list[Recommendation]:
    """Learning rate, method settings, batch, epochs and schedule for a model of ``model_params``."""
    if model_params < 1:
        raise ValueError(f"model_params must be positive, got {model_params}")
    if method not in METHODS:
        raise ValueError(f"no recommendation rules for method {method!r}; known: {', '.join(METHODS)}")
    if dataset_rows is not None and dataset_rows < 1:
        raise ValueError(f"dataset_rows must be positive, got {dataset_rows}")
    return [
        _learning_rate(model_params, method),
        *_method_fields(method),
        *_batch(model_params, method, dataset_rows),
        _epochs(dataset_rows),
        *_schedule(method),
    ]


def apply_recommendations(
    raw: dict[str, Any], recommendations: list[Recommendation], *, method_fields: set[str] | None = None
) -> dict[str, Any]:
    """Fill every recommended field the raw recipe leaves out; what the user wrote always wins.

    ``method_fields`` (the method's config field names) drops ``method.*`` settings the registered
    method does not have; by default they are taken from the method registry.
    """
    out = _deep_copy(raw)
    method_name = (out.get("method") or {}).get("name")
    if method_fields is None:
        method_fields = _registered_fields(method_name)
    for rec in recommendations:
        section, key = rec.field.split(".", 1)
        if section == "method" and key not in method_fields:
            continue
        node = out.setdefault(section, {})
        if section == "training" and _warmup_given(node, key):
            continue
        node.setdefault(key, rec.value)
    return out


def _warmup_given(training: dict[str, Any], key: str) -> bool:
    """warmup_steps and warmup_ratio exclude each other; do not add a ratio to a recipe with steps."""
    return key == "warmup_ratio" and training.get("warmup_steps") is not None


def _registered_fields(method: str | None) -> set[str]:
    from tunelab.methods import METHODS as REGISTRY  # noqa: PLC0415

    if method is None or method not in REGISTRY:
        return set()
    return set(REGISTRY.get(method).config_cls.model_fields)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def human_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def count_params(spec: str, *, trust_remote_code: bool = False) -> int:
    """Parameter count of a model spec without loading its weights.

    ``tiny:llama`` is built (it is tiny); a ``.gguf`` is counted from its tensor shapes
    (``gguf.GGUFReader``, memory-mapped); a local dir, ``asset:NAME`` or hub id from its config, by
    instantiating the architecture on the ``meta`` device (shapes only, no memory, no download of
    weights).
    """
    from tunelab.models.load import ASSET_PREFIX, TINY_PREFIX  # noqa: PLC0415

    if spec.startswith(TINY_PREFIX):
        from tunelab.models.load import load_model  # noqa: PLC0415

        model, _ = load_model(spec, device="cpu")
        return sum(p.numel() for p in model.parameters())
    if spec.startswith(ASSET_PREFIX):
        from tunelab.assets import asset_path  # noqa: PLC0415

        spec = str(asset_path(spec[len(ASSET_PREFIX) :]))
    if spec.lower().endswith(".gguf"):
        from gguf import GGUFReader  # noqa: PLC0415

        return int(sum(int(t.n_elements) for t in GGUFReader(spec, "r").tensors))
    return _count_from_config(spec, trust_remote_code)


def _count_from_config(spec: str, trust_remote_code: bool) -> int:
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def recommendations_table(model: str, params: int, method: str, recs: list[Recommendation]) -> Any:
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"recommended settings: {method} on {model} ({human_params(params)} parameters)")
    table.add_column("field")
    table.add_column("value", justify="right")
    table.add_column("rule")
    for rec in recs:
        table.add_row(
            rec.field, f"{rec.value:g}" if isinstance(rec.value, float) else str(rec.value), rec.rule
        )
    return table


def recommend_cmd(
    model: Annotated[str, typer.Option("--model", help="hub id, local dir, .gguf, tiny:llama or asset:NAME")],
    method: Annotated[str, typer.Option("--method", help=f"one of {', '.join(METHODS)}")] = "lora",
    rows: Annotated[
        int | None, typer.Option("--rows", help="training rows, to size batch and epochs")
    ] = None,
    as_set: Annotated[
        bool, typer.Option("--set-args", help="print as --set overrides for `tunelab train`")
    ] = False,
) -> None:
    """Learning rate, rank/alpha, batch and schedule for a model size and method, with each rule's source."""
    from tunelab.console import fail, make_console  # noqa: PLC0415

    console = make_console()
    try:
        params = count_params(model)
        recs = recommend(params, method, dataset_rows=rows)
    except (OSError, ValueError) as e:
        fail(make_console(stderr=True), str(e))
    if as_set:
        console.print(" ".join(f"--set {r.field}={r.value}" for r in recs))
        return
    console.print(recommendations_table(model, params, method, recs))
