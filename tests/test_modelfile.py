"""The Ollama Modelfile renders what the run trained on: its TEMPLATE and SYSTEM, executed by Go's own
``text/template`` (the engine Ollama uses) the way Ollama calls it, equal byte for byte to the run's
Jinja template (the renderer training used) on conversations other than the probes the export checks;
a template no Go template states exactly is refused with the reason, and no Modelfile is written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tunelab.data.templates import BUILTIN_TEMPLATES, render
from tunelab.export import modelfile
from tunelab.export.modelfile import NoFaithfulTemplate, modelfile_text, ollama_template, write_modelfile
from tunelab.models.tiny import build_tiny_tokenizer

# SmolLM2-Instruct's own chat template (the demo's base): ChatML with a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Not the probes the export checks with: other text, unicode, braces Go must not read, blank lines.
CONVERSATIONS = [
    [{"role": "user", "content": "Great film!"}],
    [{"role": "user", "content": "Résumé {{ .System }} ünïcode ✓\n\nsecond paragraph"}],
    [
        {"role": "user", "content": "Is this review positive? 'A slow, dull mess.'"},
        {"role": "assistant", "content": "negative"},
        {"role": "user", "content": "And 'a joy from start to finish'?"},
    ],
    [{"role": "system", "content": "Reply with one label."}, {"role": "user", "content": "Loved it"}],
    [
        {"role": "system", "content": "Be terse.\nNo emoji."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ],
]

# Ollama's chat handler (server/routes.go) sends the Modelfile's SYSTEM as a first system message when
# the request has none; template.Execute hands a template that reads .Messages the collated messages
# (consecutive turns of one role merged), the joined system text and an empty .Response.
HARNESS = r"""package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template      string      `json:"template"`
	System        string      `json:"system"`
	Conversations [][]Message `json:"conversations"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(in.Template))
	out := []string{}
	for _, conv := range in.Conversations {
		msgs := conv
		if conv[0].Role != "system" && in.System != "" {
			msgs = append([]Message{{Role: "system", Content: in.System}}, conv...)
		}
		system, collated := collate(msgs)
		var b strings.Builder
		err := tmpl.Execute(&b, map[string]any{"System": system, "Messages": collated, "Response": ""})
		if err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """A function (template, system, conversations) -> texts, run by a Go program built once."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (`make golang` installs Debian's golang-go as root)")
    root = tmp_path_factory.mktemp("go")
    (root / "main.go").write_text(HARNESS, encoding="utf-8")
    env = os.environ | {
        "GO111MODULE": "off",
        "GOCACHE": str(root / "cache"),
        "GOPATH": str(root / "gopath"),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
    }
    subprocess.run([go, "build", "-o", str(root / "render"), "main.go"], cwd=root, env=env, check=True)

    def run(template: str, system: str, conversations: list) -> list[str]:
        payload = json.dumps({"template": template, "system": system, "conversations": conversations})
        done = subprocess.run(
            [str(root / "render")], input=payload, capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout)

    return run


def _modelfile(tokenizer, monkeypatch, *, add_bos: bool) -> str:
    monkeypatch.setattr(modelfile, "gguf_metadata", lambda path: {"add_bos_token": add_bos})
    return modelfile_text(Path("demo-q4_k_m.gguf"), tokenizer, None)[0]


def _field(text: str, name: str) -> str:
    """A Modelfile's triple-quoted TEMPLATE or SYSTEM ("" when absent)."""
    found = re.search(rf'^{name} """(.*?)"""$', text, flags=re.DOTALL | re.MULTILINE)
    return found.group(1) if found else ""


def _jinja(tokenizer, conversations, *, add_bos: bool) -> list[str]:
    texts = [render(tokenizer, conv, generation_prompt=True) for conv in conversations]
    bos = tokenizer.bos_token or ""
    return [t[len(bos) :] if add_bos and bos and t.startswith(bos) else t for t in texts]


@pytest.mark.parametrize(
    ("template", "add_bos", "family"),
    [
        (SMOLLM2_TEMPLATE, False, "chatml"),
        (None, False, "chatml"),  # the tiny tokenizer's ChatML, no default system prompt
        (BUILTIN_TEMPLATES["llama-3"], True, "llama-3"),  # llama.cpp adds the BOS the template writes
        (BUILTIN_TEMPLATES["phi"], False, "phi"),
        (BUILTIN_TEMPLATES["alpaca"], False, "alpaca"),
    ],
)
def test_go_renders_the_modelfile_exactly_like_the_runs_template(
    go_render, monkeypatch, template, add_bos, family
):
    tokenizer = build_tiny_tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    text = _modelfile(tokenizer, monkeypatch, add_bos=add_bos)
    assert f"# {family} layout" in text
    rendered = go_render(_field(text, "TEMPLATE"), _field(text, "SYSTEM"), CONVERSATIONS)
    assert rendered == _jinja(tokenizer, CONVERSATIONS, add_bos=add_bos)


def test_smollm2s_default_system_prompt_becomes_the_modelfiles_system(go_render, monkeypatch):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    text = _modelfile(tokenizer, monkeypatch, add_bos=False)
    assert f'SYSTEM """{SMOLLM2_SYSTEM}"""\n' in text
    # without SYSTEM, Ollama would render the first conversation with no system turn: not what was trained
    bare = go_render(_field(text, "TEMPLATE"), "", CONVERSATIONS[:1])
    assert bare != _jinja(tokenizer, CONVERSATIONS[:1], add_bos=False)
    assert SMOLLM2_SYSTEM in _jinja(tokenizer, CONVERSATIONS[:1], add_bos=False)[0]


def test_a_template_without_a_default_system_prompt_gets_no_system_line(monkeypatch):
    text = _modelfile(build_tiny_tokenizer(), monkeypatch, add_bos=False)
    assert "SYSTEM" not in text and 'TEMPLATE """{{- range .Messages }}' in text


@pytest.mark.parametrize(
    ("template", "add_bos", "reason"),
    [
        (BUILTIN_TEMPLATES["gemma"], True, "none of the layouts a Go template can state exactly"),
        (BUILTIN_TEMPLATES["llama-3"], False, "it writes BOS itself and the GGUF does not add one"),
        (
            "{{ raise_exception('no') }}",
            False,
            "refuses a plain conversation",
        ),
    ],
)
def test_no_faithful_go_template_is_refused_with_the_reason_and_writes_nothing(
    tmp_path, monkeypatch, template, add_bos, reason
):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    with pytest.raises(NoFaithfulTemplate, match=re.escape(reason)):
        ollama_template(tokenizer, add_bos=add_bos)
    monkeypatch.setattr(modelfile, "gguf_metadata", lambda path: {"add_bos_token": add_bos})
    with pytest.raises(ValueError, match="^--ollama: .*Export without --ollama") as err:
        write_modelfile(tmp_path, tmp_path / "x.gguf", tokenizer, None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "Modelfile").exists()
