"""Tiny models built from config, so tests and demos never download anything.

The tokenizer is a real byte-level BPE (the GPT-2 / SmolLM2 family), trained in-process on a small
embedded corpus, with a ChatML chat template. The model is a randomly initialised Llama. Both are
deterministic, so a test can build them twice and expect identical tensors.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END, PAD_TOKEN)
TINY_VOCAB_SIZE = 1000

# ChatML, the shape SmolLM2 uses, without its default system prompt. `{% generation %}` marks the
# assistant's tokens (its `<|im_end|>` included, so a model learns to stop) for
# `apply_chat_template(..., return_assistant_tokens_mask=True)`.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn a great deal.
What is the capital of France? The capital of France is Paris.
What is the capital of Germany? The capital of Germany is Berlin.
What is the capital of Italy? The capital of Italy is Rome.
What is the capital of Spain? The capital of Spain is Madrid.
What is the capital of Japan? The capital of Japan is Tokyo.
How many days are there in a week? There are seven days in a week.
How many hours are there in a day? There are twenty-four hours in a day.
What colour is the sky on a clear day? The sky is blue on a clear day.
Which planet is closest to the sun? Mercury is the planet closest to the sun.
Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.
The numbers one, two, three, four, five, six, seven, eight, nine and ten are easy to count.
0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1000 2024 3.14 2.718 1e-5 50% $20 #1 @home
Fine-tuning adapts a pretrained language model to a new task with a small amount of data.
Low-rank adapters train only a few extra parameters while the base weights stay frozen.
A training run reads its configuration, prepares the data, trains the model, and saves it.
The loss should go down during training; if it goes up, the learning rate may be too high.
Evaluation compares the answers of the model with the reference answers on held-out examples.
Export writes the weights in a format that another program can load and serve to users.
A tokenizer turns text into numbers, and the model turns those numbers into predictions.
Every message in a conversation has a role, such as system, user, or assistant, and some content.
The assistant should answer the question of the user politely, clearly and briefly.
Please summarise the following paragraph in one sentence, then list three key points.
Translate the sentence into French: "Good morning, how are you today?" Bonjour, comment allez-vous ?
Write a short poem about the sea. The waves roll in, the gulls cry out, the tide turns slowly.
Once upon a time there was a little robot who wanted to learn how to write stories.
She walked to the market, bought some apples and bread, and came home before the rain started.
They were happy because the weather was warm and the garden was full of flowers.
He said that he would call back later, but the phone never rang again that evening.
Science explains the world through observation, hypothesis, experiment and careful measurement.
History tells us about people, places and events that shaped the world we live in now.
Mathematics studies numbers, shapes, patterns and the relations between them.
Computers follow instructions written by programmers in languages such as Python or C.
def add(a, b):
    return a + b

for i in range(10):
    print(i * i)

if x > 0 and y < 0:
    result = {"key": [1, 2, 3], 'other': None}
import torch; model = Model(); loss = model(batch).loss; loss.backward()
Don't forget: it's the user's choice, and we'll respect it. You're right, they've gone.
Email: someone@example.com  Website: https://example.com/path?query=1&page=2
Dates like 2025-01-31 and times like 12:45 appear often in real text.
Café, naïve, résumé, über, señor, 東京, Москва, αβγ and emoji 🙂 are all just bytes to this tokenizer.
Thank you for your help! You are welcome. Is there anything else I can do for you?
I do not know the answer to that question, but I can try to find out more about it.
The best way to learn is to practise a little every day and to ask questions when you are stuck.
Good data matters more than big models: clean, deduplicated, and representative examples win.
"""


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train once per process; the JSON form lets every caller get its own mutable copy."""
    tokenizer = Tokenizer(models.BPE())
    # Exactly the pipeline transformers' GPT2Tokenizer (and its GGUF loader) rebuilds, so a
    # tokenizer exported to GGUF and read back splits text the same way.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh ChatML byte-level BPE tokenizer (~1000 tokens); any text encodes, nothing downloads."""
    backend = Tokenizer.from_str(_trained_tokenizer_json())
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
        padding_side="right",
        model_max_length=512,
    )


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    """The tiny Llama's config (what ``tiny:llama`` builds), without building the model."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A seeded fp32 Llama sized for CPU tests; the global RNG is left untouched."""
    config = tiny_llama_config(
        tokenizer,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


def save_tiny_model(path: str | Path, *, seed: int = 0, **kw) -> Path:
    """Write a tiny model (safetensors) and tokenizer that `from_pretrained(path)` reloads."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed, **kw)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
