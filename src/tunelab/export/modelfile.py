"""An Ollama ``Modelfile`` for an exported GGUF: the run's template, its stop tokens, its sampling.

Ollama renders prompts with Go templates, not Jinja. For the chat families whose layout a Go template
can state exactly (ChatML, Llama 3, Phi-3, Alpaca) the Modelfile carries one, and only after
checking that it renders a set of probe conversations to exactly the text the run's own Jinja template
renders. Any other template is left to the GGUF's ``tokenizer.chat_template``, which recent Ollama
versions read themselves; a comment line says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.export.gguf import end_of_turn_tokens
from tunelab.models.llamacpp import gguf_metadata

Message = dict[str, str]


@dataclass(frozen=True)
class GoTemplate:
    """An Ollama template and a Python mirror of what it renders, to compare with the run's template."""

    name: str
    go: str
    render: Callable[[list[Message], str], str]  # (messages, eos_token) -> prompt with generation prompt


def _chatml(messages: list[Message], eos: str) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _llama3(messages: list[Message], eos: str) -> str:
    turns = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
    )
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _phi(messages: list[Message], eos: str) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n"


def _alpaca(messages: list[Message], eos: str) -> str:
    parts = {
        "system": "{}\n\n",
        "user": "### Instruction:\n{}\n\n",
        "assistant": "### Response:\n{}" + eos + "\n\n",
    }
    return "".join(parts[m["role"]].format(m["content"]) for m in messages) + "### Response:\n"


GO_TEMPLATES = (
    GoTemplate(
        "chatml",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        _chatml,
    ),
    GoTemplate(
        "llama-3",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        _llama3,
    ),
    GoTemplate(
        "phi", "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n", _phi
    ),
    GoTemplate(
        "alpaca",
        '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}EOS_TOKEN\n\n'
        "{{ end }}{{ end }}### Response:\n",
        _alpaca,
    ),
)

_PROBES: tuple[list[Message], ...] = (
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
)


def matching_go_template(tokenizer: Any, add_bos: bool) -> tuple[str, str] | None:
    """(family, Go template) that renders every probe exactly like the run's template, or None.
    A leading BOS in the Jinja render is dropped when the GGUF tells llama.cpp to add BOS itself."""
    eos = tokenizer.eos_token or ""
    rendered = []
    for probe in _PROBES:
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that refuses a probe cannot be the family it mirrors
            return None
        if add_bos and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token) :]
        rendered.append(text)
    for family in GO_TEMPLATES:
        if all(family.render(probe, eos) == text for probe, text in zip(_PROBES, rendered)):
            return family.name, family.go.replace("EOS_TOKEN", eos)
    return None


def sampling_lines(generation_config: Any) -> list[str]:
    """Sampling from the run's generation_config.json when it samples; else greedy, as tunelab eval decodes."""
    if generation_config is None or not getattr(generation_config, "do_sample", False):
        return [
            "# greedy decoding, as `tunelab eval` scores the run (no sampling in its generation_config)",
            "PARAMETER temperature 0",
        ]
    lines = ["# sampling from the run's generation_config.json"]
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("repetition_penalty", "repeat_penalty"),
        ("min_p", "min_p"),
    ):
        value = getattr(generation_config, ours, None)
        if value is not None:
            lines.append(f"PARAMETER {theirs} {value}")
    return lines


def modelfile_text(gguf_file: Path, tokenizer: Any, generation_config: Any) -> tuple[str, str | None]:
    """The Modelfile and the template family written into it (None: the GGUF's own template is used)."""
    meta = gguf_metadata(gguf_file)
    found = matching_go_template(tokenizer, add_bos=bool(meta.get("add_bos_token")))
    lines = [
        "# Ollama Modelfile written by tunelab export; `ollama create NAME -f Modelfile`",
        f"FROM ./{gguf_file.name}",
    ]
    if found:
        family, go = found
        lines += [
            f"# {family} layout, checked to render like the run's chat template",
            f'TEMPLATE """{go}"""',
        ]
    else:
        lines.append(
            "# no Go template: the run's chat template is not a layout tunelab mirrors; Ollama uses the "
            "template in the GGUF (tokenizer.chat_template)"
        )
    stops = list(
        dict.fromkeys(
            [*end_of_turn_tokens(tokenizer), *([tokenizer.eos_token] if tokenizer.eos_token else [])]
        )
    )
    lines += [f'PARAMETER stop "{token}"' for token in stops]
    lines += sampling_lines(generation_config)
    return "\n".join(lines) + "\n", found[0] if found else None


def write_modelfile(out: Path, gguf_file: Path, tokenizer: Any, generation_config: Any) -> dict[str, Any]:
    text, family = modelfile_text(gguf_file, tokenizer, generation_config)
    (out / "Modelfile").write_text(text, encoding="utf-8")
    return {"file": "Modelfile", "template": family or "from the GGUF"}
