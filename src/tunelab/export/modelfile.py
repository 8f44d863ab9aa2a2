"""An Ollama ``Modelfile`` for an exported GGUF: the run's template, its stop tokens, its sampling.

Ollama renders prompts with Go templates (``text/template``), not Jinja, and when a Modelfile has no
``TEMPLATE`` it guesses one. So the Modelfile carries a ``TEMPLATE`` (and, when the run's template
adds a default system prompt, as SmolLM2's does, a ``SYSTEM``) only for the chat families whose layout
a Go template states exactly (ChatML, Llama 3, Phi-3, Alpaca), and only after checking that it renders
a set of probe conversations to exactly the text the run's own Jinja template renders (the one
training used). Ollama sends ``SYSTEM`` as a first system message when a request has none
(``server/routes.go``) and hands the template ``.Messages``; the Go templates here range over them.
Any other template is refused with the reason: no Modelfile is better than one whose prompt differs
from the trained one. ``tests/test_modelfile.py`` renders the written Modelfile with Go itself.
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

# Without a system turn (where a template may add its default one) and with one; several turns.
PROBES: tuple[list[Message], ...] = (
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?\nJust one word."},
    ],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Say hi."}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
)
_MARK = "\x00system\x00"


class NoFaithfulTemplate(ValueError):
    """No Go template renders the run's chat template exactly; the message says why."""


@dataclass(frozen=True)
class OllamaTemplate:
    """A Go template checked against the run's template, and the default system prompt (``SYSTEM``)
    the run's template adds to a conversation that has none ("" when it adds none)."""

    family: str
    go: str
    system: str


def run_renders(tokenizer: Any, add_bos: bool, probes: tuple[list[Message], ...] = PROBES) -> list[str]:
    """Each probe as the run's template renders it for generation (the renderer training used). A
    leading BOS is dropped when the GGUF tells llama.cpp (and so Ollama) to add BOS itself."""
    from tunelab.data.templates import render  # noqa: PLC0415

    texts = []
    for probe in probes:
        text = render(tokenizer, probe, generation_prompt=True)
        if add_bos and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token) :]
        texts.append(text)
    return texts


def _default_system(family: GoTemplate, rendered: list[str], eos: str) -> str | None:
    """The system prompt under which ``family`` renders every probe as the run does ("" for none),
    or None when no single one does."""
    found: set[str | None] = set()
    for probe, text in zip(PROBES, rendered):
        if probe[0]["role"] == "system":
            if family.render(probe, eos) != text:
                return None
        elif family.render(probe, eos) == text:
            found.add("")
        else:
            found.add(_system_in(family, probe, text, eos))
    return found.pop() if len(found) == 1 and None not in found else None


def _system_in(family: GoTemplate, probe: list[Message], text: str, eos: str) -> str | None:
    """The system turn's content that makes ``family`` render ``probe`` as ``text``, if any."""
    head, _, tail = family.render([{"role": "system", "content": _MARK}, *probe], eos).partition(_MARK)
    if len(text) <= len(head) + len(tail) or not (text.startswith(head) and text.endswith(tail)):
        return None
    return text[len(head) : len(text) - len(tail)]


def ollama_template(tokenizer: Any, add_bos: bool) -> OllamaTemplate:
    """The Go template (and default system prompt) that renders every probe exactly like the run's
    template; :class:`NoFaithfulTemplate` with the reason when none does."""
    try:
        rendered = run_renders(tokenizer, add_bos)
    except Exception as err:  # a template that refuses a probe conversation is none of these layouts
        raise NoFaithfulTemplate(f"the run's chat template refuses a plain conversation ({err})") from err
    eos = tokenizer.eos_token or ""
    for family in GO_TEMPLATES:
        system = _default_system(family, rendered, eos)
        if system is not None:
            go = family.go.replace("EOS_TOKEN", eos)
            if '"""' in go + system:
                raise NoFaithfulTemplate(
                    'the template or its system prompt contains """, which a Modelfile cannot quote'
                )
            return OllamaTemplate(family.name, go, system)
    bos = (
        " (it writes BOS itself and the GGUF does not add one)"
        if tokenizer.bos_token and rendered[0].startswith(tokenizer.bos_token)
        else ""
    )
    raise NoFaithfulTemplate(
        f"the run's chat template is none of the layouts a Go template can state exactly "
        f"({', '.join(f.name for f in GO_TEMPLATES)}){bos}"
    )


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


_INSTEAD = "Export without --ollama and serve the GGUF with llama.cpp (llama-server renders the template the GGUF carries)"


def modelfile_text(gguf_file: Path, tokenizer: Any, generation_config: Any) -> tuple[str, OllamaTemplate]:
    """The Modelfile and the checked template in it; :class:`NoFaithfulTemplate` when there is none."""
    meta = gguf_metadata(gguf_file)
    try:
        found = ollama_template(tokenizer, add_bos=bool(meta.get("add_bos_token")))
    except NoFaithfulTemplate as err:
        raise NoFaithfulTemplate(
            f"--ollama: {err}, and Ollama renders Go templates, not Jinja, so its prompt would not be the "
            f"one the run trained on. {_INSTEAD}"
        ) from err
    lines = [
        "# Ollama Modelfile written by tunelab export; `ollama create NAME -f Modelfile`",
        f"FROM ./{gguf_file.name}",
        f"# {found.family} layout, checked to render like the run's chat template",
        f'TEMPLATE """{found.go}"""',
    ]
    if found.system:
        lines += [
            "# the run's chat template adds this system prompt when a conversation has none; so does Ollama",
            f'SYSTEM """{found.system}"""',
        ]
    stops = list(
        dict.fromkeys(
            [*end_of_turn_tokens(tokenizer), *([tokenizer.eos_token] if tokenizer.eos_token else [])]
        )
    )
    lines += [f'PARAMETER stop "{token}"' for token in stops]
    lines += sampling_lines(generation_config)
    return "\n".join(lines) + "\n", found


def write_modelfile(out: Path, gguf_file: Path, tokenizer: Any, generation_config: Any) -> dict[str, Any]:
    """``out/Modelfile``, or :class:`NoFaithfulTemplate` (a ValueError: one line, exit 2) with the reason."""
    text, found = modelfile_text(gguf_file, tokenizer, generation_config)
    (out / "Modelfile").write_text(text, encoding="utf-8")
    return {"file": "Modelfile", "template": found.family, "system": found.system or None}
