"""Padding-free packed attention (tunelab.models.varlen): exact against unpacked examples on CPU
through its per-example reference path, and against that reference on a GPU through PyTorch's
varlen FlashAttention kernel."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.models import varlen

LENGTHS = (5, 9, 3, 7)


def tiny(attention: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LlamaForCausalLM:
    if attention == varlen.NAME:
        varlen.register()
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=128,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def examples(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g) for n in LENGTHS]


def packed(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat(parts).unsqueeze(0)
    positions = torch.cat([torch.arange(len(p)) for p in parts]).unsqueeze(0)
    return ids, positions


def test_cu_seqlens_starts_each_example_and_each_row() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])  # row 2 starts mid-count
    cu, longest = varlen.cu_seqlens(positions)
    assert cu.tolist() == [0, 3, 5, 6, 8, 12]
    assert longest == 4
    assert cu.dtype == torch.int32
    assert varlen.cu_seqlens(positions)[0] is cu  # cached on the tensor: one sync per forward


def test_packed_logits_equal_each_example_alone() -> None:
    model = tiny(varlen.NAME).eval()
    parts = examples()
    ids, positions = packed(parts)
    with torch.no_grad():
        together = model(input_ids=ids, position_ids=positions).logits[0]
        start = 0
        for part in parts:
            alone = model(input_ids=part[None], position_ids=torch.arange(len(part))[None]).logits[0]
            torch.testing.assert_close(together[start : start + len(part)], alone, atol=1e-5, rtol=1e-5)
            start += len(part)


def test_changing_one_example_leaves_its_neighbours_untouched() -> None:
    model = tiny(varlen.NAME).eval()
    parts = examples()
    changed = [*parts[:2], torch.randint(0, 97, (LENGTHS[2],)), parts[3]]
    with torch.no_grad():
        before = model(input_ids=packed(parts)[0], position_ids=packed(parts)[1]).logits[0]
        after = model(input_ids=packed(changed)[0], position_ids=packed(changed)[1]).logits[0]
    third = slice(sum(LENGTHS[:2]), sum(LENGTHS[:3]))
    assert not torch.allclose(before[third], after[third])  # the probe really changed something
    keep = torch.ones(sum(LENGTHS), dtype=torch.bool)
    keep[third] = False
    assert torch.equal(before[keep], after[keep])


def test_packed_loss_and_gradients_equal_the_padded_batch_through_sdpa() -> None:
    parts = examples(1)
    fast, plain = tiny(varlen.NAME), tiny("sdpa")
    ids, positions = packed(parts)
    labels = ids.clone()
    starts = torch.cumsum(torch.tensor([0, *LENGTHS[:-1]]), 0)
    labels[0, starts] = -100  # a packed row never predicts an example's first token from the previous one
    packed_loss = (
        fast(input_ids=ids, position_ids=positions, labels=labels).loss * (labels[0, 1:] != -100).sum()
    )
    packed_loss.backward()

    width = max(LENGTHS)
    padded = torch.zeros(len(parts), width, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, part in enumerate(parts):
        padded[i, : len(part)], mask[i, : len(part)] = part, 1
    targets = padded.masked_fill(mask == 0, -100)
    plain_loss = (
        plain(input_ids=padded, attention_mask=mask, labels=targets).loss * (targets[:, 1:] != -100).sum()
    )
    plain_loss.backward()

    torch.testing.assert_close(packed_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(fast.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padded_batches_and_generation_go_through_sdpa_unchanged() -> None:
    fast, plain = tiny(varlen.NAME).eval(), tiny("sdpa").eval()
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding, as generate uses
    with torch.no_grad():
        torch.testing.assert_close(
            fast(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits
        )
    a = fast.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    b = plain.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_the_kernel_refuses_attention_it_does_not_compute() -> None:
    """A model whose config hid a window, softcapping or sinks still cannot get other maths: the
    attention function raises with what was asked instead of silently ignoring it."""
    model = tiny(varlen.NAME).eval()
    ids, positions = packed(examples())
    layer = model.model.layers[0].self_attn
    for asked, words in (
        ({"softcap": 50.0}, "softcapping"),
        ({"s_aux": torch.zeros(4)}, "sinks"),
        ({"sliding_window": 6}, "sliding window of 6 tokens over a packed example of 9"),
    ):
        q = torch.zeros(1, 4, ids.shape[1], 16)
        with pytest.raises(ValueError, match=words):
            varlen.varlen_attention(layer, q, q[:, :2], q[:, :2], None, position_ids=positions, **asked)
    q = torch.zeros(1, 4, ids.shape[1], 16)  # a window as wide as the longest example hides nothing
    out, _ = varlen.varlen_attention(
        layer, q, q[:, :2], q[:, :2], None, position_ids=positions, sliding_window=9
    )
    assert out.shape == (1, ids.shape[1], 4, 16)


@pytest.mark.gpu
def test_flash_kernel_matches_the_per_example_reference_on_cuda() -> None:
    assert varlen.kernel_available() is None
    model = tiny(varlen.NAME, torch.bfloat16, "cuda")
    ids, positions = (t.cuda() for t in packed(examples(2)))
    out = model(input_ids=ids, position_ids=positions).logits.float()
    out.sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # the reference path: the same function with the kernel switched off
    real = varlen.kernel_available
    varlen.kernel_available = lambda: "off for the reference"
    try:
        ref = model(input_ids=ids, position_ids=positions).logits.float()
        ref.sum().backward()
    finally:
        varlen.kernel_available = real
    assert (out - ref).norm() / ref.norm() < 2e-2
    for name, p in model.named_parameters():
        assert (grads[name] - p.grad.float()).norm() <= 3e-2 * p.grad.float().norm() + 1e-6, name


# --- model.attention: varlen in the recipe, the resolver and the trainer -------------------------


def test_auto_picks_varlen_on_cuda_for_packing_runs_and_an_explicit_varlen_is_refused_on_cpu():
    from tunelab.models.attention import AttentionUnavailable, Machine, ModelAttention, decide_attention

    llama, cuda = ModelAttention.from_config(tiny("sdpa").config), Machine("cuda", varlen_kernel=None)
    assert decide_attention("auto", cuda, llama, packing=True, max_length=64).name == varlen.NAME
    assert decide_attention("auto", cuda, llama, packing=False).name is None  # the model's default
    assert decide_attention("auto", cuda, llama, packing=True, fp32=True).name == "flex_attention"
    with pytest.raises(AttentionUnavailable, match="bfloat16"):
        decide_attention("varlen", cuda, llama, packing=True, fp32=True)
    with pytest.raises(AttentionUnavailable, match="model.attention: varlen cannot run: no CUDA"):
        decide_attention("varlen", Machine("cpu", varlen_kernel="no CUDA device"), llama, packing=True)
    if not torch.cuda.is_available():
        assert "no CUDA device" in (Machine.probe("cpu").varlen_kernel or "")


def test_a_run_on_varlen_trains_flat_packs_with_the_unpacked_loss(tiny_recipe, monkeypatch) -> None:
    """The whole path on CPU: the recipe's varlen resolves (kernel check patched, since the kernel is
    CUDA-only), the loader registers it, the trainer packs flat rows and the attention runs its
    per-example reference; the step's loss equals the unpacked one (same tokens, same weights)."""
    import json
    from io import StringIO

    from tunelab.console import make_console
    from tunelab.train.run import train

    calls = []
    monkeypatch.setattr(varlen, "kernel_available", lambda: None)
    monkeypatch.setattr(varlen, "_reference", lambda *a: calls.append(1) or REFERENCE(*a))
    log = StringIO()
    packed = train(
        tiny_recipe("lora", model__attention="varlen", training__max_steps="null", training__epochs=1),
        console=make_console(file=log),
    )
    assert (
        "attention: tunelab_varlen (model.attention: varlen); packing: on (data.packing: auto)"
        in log.getvalue()
    )
    assert json.loads((packed.run_dir / "manifest.json").read_text())["packing"] is True
    assert calls  # the packed forward really went through varlen attention
    monkeypatch.undo()
    unpacked = train(
        tiny_recipe(
            "lora", training__max_steps="null", training__epochs=1, training__batch_size=6, output__name="u"
        )
    )
    assert packed.steps == unpacked.steps == 1
    assert packed.losses[0] == pytest.approx(unpacked.losses[0], rel=1e-4)


REFERENCE = varlen._reference
