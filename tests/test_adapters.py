"""Many adapters on one base: list, switch, merge — on two tiny LoRA runs trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tunelab.adapters import Combination, app, list_adapters, load_adapters, merge_adapters
from tunelab.evaluate.run import load_for_eval
from tunelab.train.run import train

INPUT = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 8]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two LoRA runs on one tiny:llama base (its weights follow the seed) with different data, and a
    full-FT run and a bottleneck-adapter run beside them."""
    from tunelab.recipe import parse_recipe

    root = tmp_path_factory.mktemp("adapters")
    runs = root / "runs"
    made = []
    for name, answers, seed in (("task-a", "yes", 0), ("task-b", "no", 0)):
        data = root / f"{name}.jsonl"
        rows = [{"instruction": f"question {i}", "output": f"{answers} {i}"} for i in range(6)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        raw = {
            "seed": seed,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "training": {"max_steps": 4, "batch_size": 3, "learning_rate": 1e-2, "warmup_steps": 0},
            "output": {"dir": str(runs), "name": name},
        }
        made.append(train(parse_recipe(raw)).run_dir)
    raw["training"]["max_steps"] = 1
    for method in ("full", "adapter"):  # not PEFT: a bottleneck adapter's config file has PEFT's name
        raw["method"] = {"name": method}
        raw["output"]["name"] = f"{method}-run"
        train(parse_recipe(raw))
    return runs, made[0], made[1]


def test_list_adapters_finds_only_adapter_runs(two_runs: tuple[Path, Path, Path]) -> None:
    runs, _, _ = two_runs
    infos = list_adapters(runs)
    assert [i.name for i in infos] == ["task-a", "task-b"]
    # r=4 on every linear layer of tiny:llama (2 layers × 7 projections): A (r×in) + B (out×r)
    assert all(i.method == "lora" and i.base_model == "tiny:llama" for i in infos)
    assert infos[0].trainable_params == infos[1].trainable_params > 0
    assert infos[0].size_bytes >= 4 * infos[0].trainable_params  # fp32 weights on disk


def test_switching_adapters_gives_each_runs_own_logits(two_runs: tuple[Path, Path, Path]) -> None:
    _, run_a, run_b = two_runs
    model = load_adapters(None, [run_a, run_b], device="cpu")
    assert set(model.peft_config) == {"task-a", "task-b"}
    model.set_adapter("task-a")
    switched_a = logits(model)
    model.set_adapter("task-b")
    switched_b = logits(model)
    assert not torch.allclose(switched_a, switched_b, atol=1e-4)
    own_a = logits(load_for_eval(str(run_a), device="cpu")[0])
    own_b = logits(load_for_eval(str(run_b), device="cpu")[0])
    torch.testing.assert_close(switched_a, own_a)
    torch.testing.assert_close(switched_b, own_b)


def test_linear_merge_with_one_hot_weights_is_that_adapter(
    two_runs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    runs, run_a, run_b = two_runs
    out = merge_adapters([run_a, run_b], tmp_path / "a-only", combination="linear", weights=[1.0, 0.0])
    merged, _ = load_for_eval(str(out), device="cpu")
    torch.testing.assert_close(
        logits(merged), logits(load_for_eval(str(run_a), device="cpu")[0]), atol=1e-5, rtol=1e-5
    )
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["artifact"] == "peft" and meta["merge"]["combination"] == "linear"


def test_cat_merge_is_the_weighted_sum_of_updates(two_runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """`cat` stacks the low-rank factors, so every merged ΔW equals 0.3·ΔW_a + 0.7·ΔW_b exactly."""
    _, run_a, run_b = two_runs
    out = merge_adapters([run_a, run_b], tmp_path / "blend", combination="cat", weights=[0.3, 0.7])
    both = load_adapters(None, [run_a, run_b, out], device="cpu")
    layer = both.base_model.model.model.layers[0].self_attn.q_proj
    delta = {name: layer.get_delta_weight(name) for name in ("task-a", "task-b", "blend")}
    torch.testing.assert_close(delta["blend"], 0.3 * delta["task-a"] + 0.7 * delta["task-b"])
    assert not torch.allclose(delta["task-a"], delta["task-b"])


def factors(out: Path) -> dict[str, torch.Tensor]:
    """The merged adapter's saved LoRA A and B matrices, by tensor name."""
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def deltas(out: Path) -> dict[str, torch.Tensor]:
    """ΔW = B·A of every adapted module (the scaling is the same in every merge compared here)."""
    tensors = factors(out)
    return {
        name.removesuffix(".lora_A.weight"): tensors[name.replace("lora_A", "lora_B")] @ a
        for name, a in tensors.items()
        if name.endswith(".lora_A.weight")
    }


def nonzero_fraction(out: Path) -> float:
    tensors = list(factors(out).values())
    return sum(int((t != 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


@pytest.mark.parametrize("combination", ["ties", "dare_linear", "dare_ties"])
def test_pruning_merges_honour_density_and_weights(
    two_runs: tuple[Path, Path, Path], tmp_path: Path, combination: Combination
) -> None:
    """Each adapter is pruned to `density` before combining (TIES: top magnitudes, DARE: a seeded
    random keep-mask), so the merged factors keep at most that share per adapter; the weights scale
    the merged update (×4 on both weights → ×4 on every ΔW, the masks being the same)."""
    _, run_a, run_b = two_runs

    def merge(name: str, density: float, weights: list[float]) -> Path:
        return merge_adapters(
            [run_a, run_b], tmp_path / name, combination=combination, density=density, weights=weights
        )

    sparse, dense = merge("sparse", 0.2, [0.3, 0.7]), merge("dense", 0.9, [0.3, 0.7])
    assert nonzero_fraction(run_a / "final") > 0.99  # the inputs are dense
    # Two adapters each keep ≤ 20% of entries: the merge has at most their union, 1 - 0.8² = 36%
    # for DARE's independent masks and ≤ 40% for TIES' top-k (a little slack for the random masks).
    assert nonzero_fraction(sparse) <= 0.42
    assert nonzero_fraction(dense) > nonzero_fraction(sparse) + 0.3
    scaled = deltas(merge("scaled", 0.2, [1.2, 2.8]))
    for name, delta in deltas(sparse).items():
        torch.testing.assert_close(scaled[name], 4 * delta, rtol=1e-4, atol=1e-7)
    swapped = deltas(merge("swapped", 0.2, [0.7, 0.3]))
    assert not all(torch.allclose(swapped[n], d, atol=1e-6) for n, d in deltas(sparse).items())
    merged, _ = load_for_eval(str(sparse), device="cpu")
    base, _ = load_for_eval("tiny:llama", device="cpu")
    assert torch.isfinite(logits(merged)).all()
    assert not torch.allclose(logits(merged), logits(base), atol=1e-5)


def test_dare_at_full_density_is_the_linear_merge(two_runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A keep-mask of density 1 drops nothing and rescales by 1: DARE reduces to the weighted sum."""
    _, run_a, run_b = two_runs
    dare = merge_adapters(
        [run_a, run_b], tmp_path / "dare", combination="dare_linear", density=1.0, weights=[0.3, 0.7]
    )
    linear = merge_adapters([run_a, run_b], tmp_path / "linear", combination="linear", weights=[0.3, 0.7])
    expected = factors(linear)
    for name, tensor in factors(dare).items():
        torch.testing.assert_close(tensor, expected[name])


def test_merge_refuses_bad_arguments(two_runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    runs, run_a, run_b = two_runs
    with pytest.raises(ValueError, match="density"):
        merge_adapters([run_a, run_b], tmp_path / "x", combination="ties")
    with pytest.raises(ValueError, match="one weight per adapter"):
        merge_adapters([run_a, run_b], tmp_path / "x", weights=[1.0])
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        merge_adapters([run_a, runs / "full-run"], tmp_path / "x")


def test_adapters_on_different_bases_do_not_load_together(tmp_path: Path, tiny_recipe) -> None:
    """tiny:llama's weights follow the recipe seed: seed 1 is another base than seed 0."""
    other = train(tiny_recipe("lora", seed=1, output__name="other-base")).run_dir
    first = train(tiny_recipe("lora", output__name="first-base")).run_dir
    with pytest.raises(ValueError, match="different base models"):
        load_adapters(None, [first, other], device="cpu")


def test_cli_list_and_merge(two_runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    runs, run_a, run_b = two_runs
    listed = CliRunner().invoke(app, ["list", str(runs)])
    assert listed.exit_code == 0, listed.output
    assert "task-a" in listed.output and "task-b" in listed.output and "full-run" not in listed.output
    merged = CliRunner().invoke(
        app, ["merge", str(run_a), str(run_b), "--out", str(tmp_path / "m"), "--weights", "0.5,0.5"]
    )
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()
    assert [(i.name, i.base_model) for i in list_adapters(tmp_path)] == [("m", "tiny:llama")]
