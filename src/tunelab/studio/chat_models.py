"""The models the Chat page can talk to, and the serve engines it loads them into.

A choice is ``run:NAME`` (the run's ``final/``), ``base:NAME`` (the base model that run names) or a
typed spec (a path, ``tiny:llama``, a hub name). Generation goes through
:class:`tunelab.serve.engine.Engine`, the engine ``tunelab serve`` runs. Engines are loaded on first
use and kept per base, as serve keeps them: an adapter run is loaded as its base plus the adapter
(``Engine.load`` / ``load_adapter``), so "base vs tuned" shares one engine and one copy of the weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.adapters import adapter_info
from tunelab.runs.index import find_run_dirs

Key = tuple[str, int | None]


@dataclass(frozen=True)
class Target:
    """Where one choice is answered: the engine's base key, the adapter (name, path) or None for the
    base itself, and the name the answers are logged under (the feedback log's ``variant``)."""

    key: Key
    adapter: tuple[str, Path] | None
    variant: str
    via: tuple[str, Path] | None = None  # an adapter whose meta says how to load the base (its seed)


def finished_runs(runs_dir: Path) -> list[Path]:
    return sorted((d for d in find_run_dirs(runs_dir) if (d / "final").is_dir()), key=lambda d: d.name)


def choices(runs_dir: Path) -> list[tuple[str, str]]:
    """(form value, label) for every finished run and, once per base, the base model an adapter run names."""
    runs, bases, seen = [], [], set()
    for run in finished_runs(runs_dir):
        runs.append((f"run:{run.name}", f"{run.name} (tuned, {run.name}/final)"))
        try:
            info = adapter_info(run / "final")
        except (OSError, ValueError):  # a full fine-tune: its final/ is the whole model, no base to offer
            continue
        if info.base_key not in seen:
            seen.add(info.base_key)
            bases.append((f"base:{run.name}", f"{info.base_model} (base of {run.name})"))
    return bases + runs


def resolve(runs_dir: Path, choice: str) -> Target:
    """The target of a form value; ValueError/FileNotFoundError with the reason when it names nothing."""
    kind, _, name = choice.partition(":")
    if kind in ("run", "base") and name and "/" not in name and not name.startswith("."):
        final = runs_dir / name / "final"
        if not final.is_dir():
            raise FileNotFoundError(f"{runs_dir / name}: not a finished run (no final/)")
        return _adapter_target(final, name, base_only=kind == "base")
    path = Path(choice).expanduser()
    if path.is_dir() and ((path / "adapter_config.json").is_file() or (path / "final").is_dir()):
        try:
            return _adapter_target(path, path.name, base_only=False)
        except ValueError:
            pass  # a saved full model: loaded as a base below
    return Target((choice, 0 if choice.startswith("tiny:") else None), None, choice)


def _adapter_target(final: Path, name: str, *, base_only: bool) -> Target:
    try:
        info = adapter_info(final)
    except ValueError:  # not an adapter (a full fine-tune): the folder is a model of its own
        if base_only:
            raise ValueError(
                f"{name} is a full fine-tune; its base is not recorded as an adapter's"
            ) from None
        path = final / "final" if (final / "final").is_dir() else final
        return Target((str(path), None), None, name)
    if base_only:
        return Target(info.base_key, None, info.base_model, via=(name, info.path))
    return Target(info.base_key, (name, info.path), name, via=(name, info.path))


class EngineCache:
    """Engines by base key, loaded lazily in this process (chat only: training never runs here)."""

    def __init__(self, **engine_options: Any) -> None:
        self.engines: dict[Key, Any] = {}
        self.adapter_names: dict[tuple[Key, Path], str] = {}
        self.options = engine_options
        self._lock = threading.Lock()  # one load at a time; two columns asking for one base share it

    def get(self, target: Target) -> tuple[Any, str | None]:
        """The started engine for ``target`` and the adapter name to ask it for (None: the base)."""
        from tunelab.serve.engine import Engine  # noqa: PLC0415 - torch loads only when a chat starts

        with self._lock:
            engine = self.engines.get(target.key)
            if engine is None:
                if (
                    target.via is not None
                ):  # the adapter's meta names the base and its seed, as serve reads it
                    engine = Engine.load(None, {target.via[0]: target.via[1]}, **self.options)
                    self.adapter_names[(target.key, Path(target.via[1]))] = target.via[0]
                else:
                    engine = Engine.load(target.key[0], {}, **self.options)
                engine.start()
                self.engines[target.key] = engine
            if target.adapter is None:
                return engine, None
            return engine, self._adapter(engine, target.key, *target.adapter)

    def _adapter(self, engine: Any, key: Key, name: str, path: Path) -> str:
        known = self.adapter_names.get((key, Path(path)))
        if known is not None:
            return known
        unique = name if name not in engine.adapters else f"{name}-{len(engine.adapters) + 1}"
        engine.load_adapter(unique, path)
        self.adapter_names[(key, Path(path))] = unique
        return unique

    def close(self) -> None:
        for engine in self.engines.values():
            engine.stop()
