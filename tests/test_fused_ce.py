"""The fused (chunked) linear cross-entropy: the same loss and gradients as logits + cross-entropy,
without ever holding the [tokens × vocab] logits; refused where it would be wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.templates import IGNORE_INDEX
from tunelab.objectives.fused_ce import fused_ce_problem, fused_linear_cross_entropy_sum
from tunelab.objectives.losses import causal_lm_loss_sum


def _inputs(seed: int = 0, batch: int = 3, length: int = 11, width: int = 16, vocab: int = 50):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, :] = IGNORE_INDEX  # a row with no loss at all
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_loss_and_gradients_equal_logits_then_cross_entropy(chunk: int) -> None:
    hidden, weight, labels = _inputs()
    expected, expected_count = causal_lm_loss_sum(hidden @ weight.t(), labels)
    grads_expected = torch.autograd.grad(expected, (hidden, weight))
    got, count = fused_linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=chunk)
    grads_got = torch.autograd.grad(got * 1.0, (hidden, weight))
    assert int(count) == int(expected_count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=1e-6)
    for g, e in zip(grads_got, grads_expected):  # both take the softmax in float32
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_upstream_gradient_scales_the_result() -> None:
    """The engine backpropagates loss_sum / units: the saved gradients must be scaled, not reused as is."""
    hidden, weight, labels = _inputs(seed=1)
    got, _ = fused_linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=5)
    (g_half,) = torch.autograd.grad(got / 2, hidden)
    expected, _ = causal_lm_loss_sum(hidden @ weight.t(), labels)
    (e_half,) = torch.autograd.grad(expected / 2, hidden)
    torch.testing.assert_close(g_half, e_half, rtol=1e-5, atol=1e-6)


def test_nothing_the_size_of_the_logits_is_kept_for_backward() -> None:
    hidden, weight, labels = _inputs(batch=4, length=64, width=16, vocab=4000)
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=32)
    n_logits = 4 * 63 * 4000
    assert sizes and max(sizes) < n_logits / 10  # the gradients (tokens × width, vocab × width) only
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss_sum(hidden @ weight.t(), labels)
    assert max(sizes) >= n_logits  # the plain path keeps the logits (that is the point)


def _tiny_step(tiny_recipe, method: str, fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward/backward of the real SFT objective on the tiny model; loss and trainable grads."""
    from tunelab.runs.rundir import RunDir
    from tunelab.train.loop import Trainer

    recipe = tiny_recipe(method, objective__name="sft", objective__fused_cross_entropy=str(fused).lower())
    run = RunDir.create(recipe.output.dir, f"{method}-{fused}", overwrite=True)
    trainer = Trainer(recipe, run)
    batch = trainer._batch(list(range(3)))
    out = trainer.objective.loss(trainer.model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return float(out.loss_sum.detach()), grads


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sft_objective_with_fused_loss_equals_the_plain_one(tiny_recipe, method: str) -> None:
    plain_loss, plain_grads = _tiny_step(tiny_recipe, method, fused=False)
    fused_loss, fused_grads = _tiny_step(tiny_recipe, method, fused=True)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    assert set(fused_grads) == set(plain_grads) and plain_grads
    if method == "full":
        assert any("lm_head" in n for n in fused_grads)  # the output layer learns through the fused loss
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_with_the_fused_loss_matches_per_step(tiny_recipe) -> None:
    from tunelab.train.run import train

    plain = train(tiny_recipe("lora", output__name="plain")).losses
    fused = train(
        tiny_recipe(
            "lora", output__name="fused", objective__name="sft", objective__fused_cross_entropy="true"
        )
    ).losses
    assert len(plain) == len(fused) == 6
    assert fused == pytest.approx(plain, rel=1e-4)


def test_refused_where_it_would_be_wrong(tiny_recipe) -> None:
    from tunelab.train.run import train

    with pytest.raises(ValueError, match="fused_cross_entropy.*prompt-learning"):
        train(tiny_recipe("prompt_tuning", objective__name="sft", objective__fused_cross_entropy="true"))
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    assert "DDP" in fused_ce_problem(ddp)


def test_plain_cross_entropy_reference_is_what_torch_computes() -> None:
    """Guards the reference above: causal_lm_loss_sum is torch's summed cross-entropy after the shift."""
    hidden, weight, labels = _inputs(seed=2)
    logits = hidden @ weight.t()
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    torch.testing.assert_close(causal_lm_loss_sum(logits, labels)[0].double(), expected)
