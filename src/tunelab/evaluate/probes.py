"""Safety and bias probes, measured with the user's own instruments.

Safety: a sequence-classification model the user names (a toxicity or safety classifier) scores
the generations of each model; the report is the share whose unsafe-class probability exceeds a
threshold, before and after. There is deliberately no built-in word list or invented toxicity score:
a number is only as good as the classifier behind it, so the user picks and names that classifier.

Bias: one prompt template with a ``{group}`` slot, filled with each group in turn; the same
expected answer for every group. The main metric per group and its spread (max − min) show whether
swapping only the group changes the model's answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

UNSAFE_NAME = re.compile(r"toxic|unsafe", re.IGNORECASE)
NEGATED = re.compile(r"^(non|not|no)[-_ ]?", re.IGNORECASE)
GROUP_SLOT = "{group}"


def pick_unsafe_label(id2label: dict[int, str], requested: str | None = None) -> int:
    """The class index that means "unsafe": ``requested`` (a name or an index), else the one label whose
    name says toxic/unsafe (not "non-toxic"), else index 1 (index 0 for a one-output classifier)."""
    names = {int(i): str(n) for i, n in id2label.items()}
    if requested is not None:
        if requested.isdigit() and int(requested) in names:
            return int(requested)
        matches = [i for i, n in names.items() if n.lower() == requested.lower()]
        if not matches:
            raise ValueError(
                f"--safety-label {requested!r} is not a label of the classifier; its labels: "
                + ", ".join(f"{i}={n}" for i, n in sorted(names.items()))
            )
        return matches[0]
    unsafe = [i for i, n in names.items() if UNSAFE_NAME.search(n) and not NEGATED.match(n)]
    if len(unsafe) == 1:
        return unsafe[0]
    return 1 if len(names) > 1 else 0


class SafetyClassifier:
    """Any sequence-classification model (dir, hub id, run) → probability of its unsafe class per text."""

    def __init__(self, spec: str, *, label: str | None = None, batch_size: int = 16, device: str = "auto"):
        from tunelab.evaluate.run import final_dir_of, load_for_eval  # noqa: PLC0415
        from tunelab.models.load import MODEL_CLASSES, load_model  # noqa: PLC0415

        if final_dir_of(spec) is not None:
            model, tokenizer = load_for_eval(spec, device=device)
        else:
            model, tokenizer = load_model(
                spec, device=device, model_cls=MODEL_CLASSES["sequence_classification"]
            )
        self.model = model.eval()
        self.spec = spec
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.label_index = pick_unsafe_label(model.config.id2label, label)
        self.label_name = model.config.id2label.get(self.label_index, str(self.label_index))
        self.batch_size = batch_size

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, or a sigmoid per class for one-output or multi-label classifiers."""
        if logits.size(-1) == 1 or self.model.config.problem_type == "multi_label_classification":
            return logits.sigmoid()
        return logits.softmax(-1)

    @torch.no_grad()
    def unsafe_probabilities(self, texts: list[str]) -> list[float]:
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                [t or " " for t in texts[start : start + self.batch_size]],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=512,
            ).to(device)
            logits = self.model(**enc).logits.float()
            out += self._probabilities(logits)[:, self.label_index].tolist()
        return out


def unsafe_share(probabilities: list[float], threshold: float) -> float:
    return sum(p > threshold for p in probabilities) / max(len(probabilities), 1)


def safety_report(
    classifier: SafetyClassifier, generations: dict[str, list[str]], threshold: float
) -> dict[str, Any]:
    """Share of each model's generations scored above ``threshold`` for the unsafe class."""
    by_model = {}
    for name, texts in generations.items():
        probs = classifier.unsafe_probabilities(texts)
        by_model[name] = {
            "unsafe_share": unsafe_share(probs, threshold),
            "mean_unsafe_probability": sum(probs) / max(len(probs), 1),
            "n": len(probs),
        }
    return {
        "classifier": classifier.spec,
        "label": classifier.label_name,
        "threshold": threshold,
        "models": by_model,
    }


@dataclass
class BiasProbe:
    """Templates with a ``{group}`` slot, each with its expected answer; the groups to swap in."""

    templates: list[dict[str, str]]
    groups: list[str]
    labels: list[str] | None = None

    def conversations(self, group: str) -> list[list[dict[str, str]]]:
        return [
            [
                {"role": "user", "content": t["prompt"].replace(GROUP_SLOT, group)},
                {"role": "assistant", "content": t["answer"]},
            ]
            for t in self.templates
        ]


def load_bias_probe(path: str | Path) -> BiasProbe:
    """Read a YAML/JSON probe: ``templates: [{prompt: '... {group} ...', answer: ...}]``,
    ``groups: [...]`` and optionally ``labels: [...]`` (the answer set for label accuracy)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--bias-probe {path}: no such file")
    text = path.read_text(encoding="utf-8")
    raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    problems = _probe_problems(raw)
    if problems:
        raise ValueError(f"--bias-probe {path}: " + "; ".join(problems))
    return BiasProbe(
        templates=[{"prompt": str(t["prompt"]), "answer": str(t["answer"])} for t in raw["templates"]],
        groups=[str(g) for g in raw["groups"]],
        labels=[str(x) for x in raw["labels"]] if raw.get("labels") else None,
    )


def _probe_problems(raw: Any) -> list[str]:
    if not isinstance(raw, dict):
        return ["expected a mapping with 'templates' and 'groups'"]
    problems = [
        f"unknown key {k!r} (expected templates, groups, labels)"
        for k in raw
        if k not in {"templates", "groups", "labels"}
    ]
    groups, templates = raw.get("groups"), raw.get("templates")
    if not isinstance(groups, list) or len(groups) < 2:
        problems.append("'groups' must list at least two groups to compare")
    if not isinstance(templates, list) or not templates:
        problems.append("'templates' must be a non-empty list of {prompt, answer}")
        return problems
    for i, t in enumerate(templates):
        if not isinstance(t, dict) or "prompt" not in t or "answer" not in t:
            problems.append(f"templates[{i}] needs 'prompt' and 'answer'")
        elif GROUP_SLOT not in str(t["prompt"]):
            problems.append(f"templates[{i}].prompt has no {GROUP_SLOT} slot")
    return problems


def bias_report(per_group: dict[str, dict[str, float]], metric: str) -> dict[str, Any]:
    """``per_group``: model → group → metric. Spread = max − min over groups, per model."""
    return {
        "metric": metric,
        "models": {
            model: {"per_group": groups, "spread": max(groups.values()) - min(groups.values())}
            for model, groups in per_group.items()
        },
    }
