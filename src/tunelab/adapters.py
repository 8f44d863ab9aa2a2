"""Many adapters, one base: list the adapter runs, load several onto one base model, merge them.

An adapter run is any run whose ``final/tunelab.json`` says ``artifact: peft``. Loading puts each
adapter on the base under its run name, so ``model.set_adapter(name)`` switches task without
reloading anything. Merging uses PEFT's ``add_weighted_adapter`` (linear, TIES, DARE) and writes a
new adapter folder with its own ``tunelab.json``, so every later stage (eval, export, serve) treats
it exactly like a trained run.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from tunelab.console import fail, make_console

FINAL_META = "tunelab.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
Combination = Literal["linear", "cat", "ties", "dare_linear", "dare_ties"]
COMBINATIONS: tuple[str, ...] = ("linear", "cat", "ties", "dare_linear", "dare_ties")
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter on disk: where it is, what it adapts and how big it is."""

    name: str
    base_model: str
    method: str
    trainable_params: int
    size_bytes: int
    path: Path
    seed: int = 0

    @property
    def base_key(self) -> tuple[str, int | None]:
        """What identifies the base: its spec, plus the seed for ``tiny:`` models built from it."""
        return self.base_model, self.seed if self.base_model.startswith("tiny:") else None


def _final_dir(spec: str | Path) -> Path | None:
    path = Path(spec)
    for candidate in (path / "final", path):
        if (candidate / FINAL_META).is_file():
            return candidate
    return None


def _meta(final: Path) -> dict[str, Any]:
    return json.loads((final / FINAL_META).read_text(encoding="utf-8"))


def _is_peft(final: Path, meta: dict[str, Any]) -> bool:
    """A PEFT adapter folder: the ``peft`` artifact, or a custom one that saves PEFT's format (QLoRA)."""
    artifact = meta.get("artifact") or ("peft" if meta.get("is_adapter") else "full")
    return artifact == "peft" or (bool(meta.get("is_adapter")) and _has_peft_config(final))


def _has_peft_config(final: Path) -> bool:
    """PEFT's ``adapter_config.json`` names a ``peft_type``; our bottleneck adapters use the same file
    name for their own config, so the file's presence alone is not enough."""
    config = final / "adapter_config.json"
    if not config.is_file():
        return False
    return "peft_type" in json.loads(config.read_text(encoding="utf-8"))


def run_name(final: Path) -> str:
    """The adapter name of a run: its directory name (``runs/<name>/final`` or a merged ``<name>/``).

    PEFT keeps adapters in ``nn.ModuleDict``s, whose keys may not contain dots, so dots become ``_``.
    """
    name = final.parent.name if final.name == "final" else final.name
    return re.sub(r"[^\w-]", "_", name)


def _count_tensor_elements(path: Path) -> int:
    from safetensors import safe_open  # noqa: PLC0415

    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
            n = 1
            for dim in handle.get_slice(key).get_shape():
                n *= dim
            total += n
    return total


def adapter_info(spec: str | Path) -> AdapterInfo:
    """Describe one adapter run (or merged adapter folder); fails if it is not a PEFT adapter."""
    final = _final_dir(spec)
    if final is None:
        raise FileNotFoundError(f"{spec}: no {FINAL_META} in it or in its final/; is it a finished run?")
    meta = _meta(final)
    if not _is_peft(final, meta):
        raise ValueError(
            f"{spec}: method '{meta.get('method')}' saved a {meta.get('artifact', 'full')} model, not a PEFT "
            "adapter; only adapter runs (lora, ia3, prompt tuning, ...) can share a base"
        )
    weights = final / ADAPTER_WEIGHTS
    params = _count_tensor_elements(weights) if weights.is_file() else 0
    size = weights.stat().st_size if weights.is_file() else 0
    return AdapterInfo(
        run_name(final), meta["base_model"], meta.get("method", "?"), params, size, final, meta.get("seed", 0)
    )


def list_adapters(runs_root: str | Path) -> list[AdapterInfo]:
    """Every adapter under ``runs_root`` (finished runs and merged adapters), sorted by name."""
    root = Path(runs_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such runs directory")
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        final = _final_dir(child)
        if final is not None and _is_peft(final, _meta(final)):
            found.append(adapter_info(final))
    return found


def _common_base(infos: list[AdapterInfo], base_spec: str | None) -> tuple[str, int]:
    bases = {i.base_key for i in infos}
    if base_spec is None and len(bases) > 1:
        described = ", ".join(sorted(f"{b} (seed {s})" if s is not None else b for b, s in bases))
        raise ValueError(
            f"these adapters were trained on different base models ({described}); "
            "an adapter only works on the base it was trained on"
        )
    names = [i.name for i in infos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two adapters share the name {duplicates}; rename one run directory")
    return (base_spec, infos[0].seed) if base_spec is not None else (infos[0].base_model, infos[0].seed)


def load_adapters(
    base_spec: str | None, run_dirs: list[str | Path], *, device: str = "auto", dtype: str = "auto"
) -> Any:
    """The base model with every run's adapter loaded under its run name; the first is active.

    ``base_spec=None`` takes the base from the runs' ``tunelab.json`` (they must agree). Switch with
    ``model.set_adapter(name)``; ``model.peft_config`` lists the names.
    """
    from peft import PeftModel  # noqa: PLC0415

    from tunelab.models.load import load_model  # noqa: PLC0415

    if not run_dirs:
        raise ValueError("give at least one adapter run")
    infos = [adapter_info(r) for r in run_dirs]
    spec, seed = _common_base(infos, base_spec)
    base, _ = load_model(spec, device=device, dtype=dtype, seed=seed)
    model = PeftModel.from_pretrained(base, str(infos[0].path), adapter_name=infos[0].name)
    for info in infos[1:]:
        model.load_adapter(str(info.path), adapter_name=info.name)
    model.set_adapter(infos[0].name)
    model.eval()
    return model


def merge_adapters(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    combination: Combination = "linear",
    weights: list[float] | None = None,
    density: float | None = None,
    seed: int = 0,
) -> Path:
    """Combine LoRA adapters into one new adapter folder that ``load_for_eval(out_dir)`` loads.

    ``linear`` sums √w·A and √w·B (same rank required; exact for one non-zero weight); ``cat``
    stacks the adapters so the merged update is exactly Σ w·ΔW (rank adds up); ``ties`` and
    ``dare_*`` prune each adapter to ``density`` before combining (TIES resolves sign conflicts,
    DARE rescales a random keep-mask, seeded by ``seed``). Weights default to 1/n each (1 each
    for ``ties`` and ``dare_ties``, whose disjoint merge averages already).
    """
    import torch  # noqa: PLC0415

    infos = [adapter_info(r) for r in run_dirs]
    weights = _check_merge_args(infos, combination, weights, density)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new output folder")
    model = load_adapters(None, [i.path for i in infos], device="cpu", dtype="float32")
    merged = run_name(out)
    if merged in {i.name for i in infos}:
        merged = "merged"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_weighted_adapter(
            adapters=[i.name for i in infos],
            weights=weights,
            adapter_name=merged,
            combination_type=combination,
            density=density,
        )
    _save_merged(model, merged, infos, out, combination=combination, weights=weights, density=density)
    return out


def _check_merge_args(
    infos: list[AdapterInfo], combination: str, weights: list[float] | None, density: float | None
) -> list[float]:
    if len(infos) < 2:
        raise ValueError("merging needs at least two adapters")
    if combination not in COMBINATIONS:
        raise ValueError(f"combination {combination!r}: choose one of {', '.join(COMBINATIONS)}")
    dora = [
        i.name
        for i in infos
        if i.method == "dora" or (_meta(i.path).get("method_config") or {}).get("use_dora")
    ]
    if dora:
        raise ValueError(
            f"{dora}: DoRA adapters cannot be merged (PEFT combines A and B, not DoRA's magnitudes)"
        )
    not_lora = [i.name for i in infos if i.method not in ("lora", "qlora")]
    if not_lora:
        raise ValueError(
            f"{not_lora}: PEFT merges LoRA adapters only (these were trained with another method)"
        )
    if combination in _NEEDS_DENSITY and density is None:
        raise ValueError(f"combination '{combination}' prunes each adapter: give density (e.g. 0.5)")
    if combination not in _NEEDS_DENSITY and density is not None:
        raise ValueError(f"density only applies to {', '.join(_NEEDS_DENSITY)}; drop it for '{combination}'")
    if weights is None:
        # TIES' disjoint merge already averages the entries that agree in sign; the others sum.
        return [1.0 if combination in ("ties", "dare_ties") else 1.0 / len(infos)] * len(infos)
    if len(weights) != len(infos):
        raise ValueError(f"{len(weights)} weights for {len(infos)} adapters; give one weight per adapter")
    return [float(w) for w in weights]


def _save_merged(model: Any, name: str, infos: list[AdapterInfo], out: Path, **how: Any) -> None:
    """PEFT writes a non-default adapter into ``<dir>/<name>/``; move its files up into ``out``."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    model.set_adapter(name)
    for other in [i.name for i in infos]:
        model.delete_adapter(other)
    first = _meta(infos[0].path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
        written = tmp / name if (tmp / name).is_dir() else tmp
        AutoTokenizer.from_pretrained(str(infos[0].path)).save_pretrained(str(written))
        peft_cfg = model.peft_config[name]
        method_config = dict(first.get("method_config") or {})
        method_config.update(
            {k: v for k, v in (("r", peft_cfg.r), ("alpha", peft_cfg.lora_alpha)) if k in method_config}
        )
        meta = {
            **first,
            "method_config": method_config,
            "merged_from": [str(i.path) for i in infos],
            "merge": {k: v for k, v in how.items() if v is not None},
        }
        (written / FINAL_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        shutil.move(str(written), str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


app = typer.Typer(help="Many task adapters on one base model: list and merge them.", no_args_is_help=True)
_out = make_console()


def adapters_table(infos: list[AdapterInfo]) -> Table:
    table = Table(title="adapters")
    for column in ("name", "method", "base model", "parameters", "size", "path"):
        table.add_column(column, justify="right" if column in ("parameters", "size") else "left")
    for i in infos:
        table.add_row(
            i.name,
            i.method,
            i.base_model,
            f"{i.trainable_params:,}",
            f"{i.size_bytes / 1e6:.2f} MB",
            str(i.path),
        )
    return table


@app.command("list")
def list_cmd(
    runs_root: Annotated[Path, typer.Argument(help="folder of run directories")] = Path("runs"),
) -> None:
    """Every adapter run under RUNS_ROOT, with its base model and size."""
    try:
        infos = list_adapters(runs_root)
    except FileNotFoundError as e:
        _fail(str(e))
    if not infos:
        _out.print(f"no adapter runs under {runs_root}")
        return
    _out.print(adapters_table(infos))


@app.command("merge")
def merge_cmd(
    runs: Annotated[list[Path], typer.Argument(help="adapter runs to merge (two or more)")],
    out: Annotated[Path, typer.Option("--out", help="new adapter folder, e.g. runs/merged")],
    combination: Annotated[str, typer.Option(help=f"one of {', '.join(COMBINATIONS)}")] = "linear",
    weights: Annotated[str | None, typer.Option(help="comma-separated, one per run; default equal")] = None,
    density: Annotated[float | None, typer.Option(help="fraction kept per adapter for ties/dare")] = None,
    seed: Annotated[int, typer.Option(help="seed of DARE's random pruning")] = 0,
) -> None:
    """Merge LoRA adapters of one base into a new adapter (linear, cat, TIES, DARE)."""
    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
        path = merge_adapters(
            list(runs),
            out,
            combination=combination,
            weights=parsed,
            density=density,
            seed=seed,  # type: ignore[arg-type]
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))
    _out.print(
        f"merged {len(runs)} adapters ({combination}) into {path}; evaluate it with `tunelab eval {path}`"
    )


def _fail(message: str) -> None:
    fail(make_console(stderr=True), message)
