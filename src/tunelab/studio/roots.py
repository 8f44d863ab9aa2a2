"""The folders the studio may read and write: its runs directory and the roots it was started with.

``tunelab studio --data-root DIR`` (repeatable; default: the directory it was started in) names them.
Every path a request names (a data file to audit, a recipe to load or train, an eval's models and data,
an export's folder, the files a recipe names) is resolved, links followed, and refused unless it lies
under one of them. The refusal names the path, never anything read from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


class OutsideRoots(ValueError):
    """A path outside the studio's folders: the message names it and the option that allows it."""


class Roots:
    """The studio's folders, resolved once at start."""

    def __init__(self, runs_dir: Path, extra: Iterable[str | Path] | None = None):
        given = [Path.cwd()] if extra is None else [Path(p) for p in extra]
        self.folders = tuple(dict.fromkeys(p.expanduser().resolve() for p in [runs_dir, *given]))

    def __str__(self) -> str:
        return ", ".join(map(str, self.folders))

    def contains(self, path: str | Path) -> bool:
        resolved = Path(path).expanduser().resolve()  # links followed as far as the path exists
        return any(resolved.is_relative_to(folder) for folder in self.folders)

    def check(self, path: str | Path, label: str = "") -> str:
        """``path`` as given when it lies under a root; :class:`OutsideRoots` when not."""
        if not self.contains(path):
            where = f"{label}: " if label else ""
            raise OutsideRoots(
                f"{where}{path}: outside the studio's folders ({self}); restart it with --data-root "
                f"FOLDER to use files there"
            )
        return str(path)

    def check_local(self, value: str, label: str) -> str:
        """A model or dataset that may be a hub id: checked only when it names a local path."""
        if value and (Path(value).expanduser().exists() or value.startswith(("/", ".", "~"))):
            self.check(value, label)
        return value

    def recipe_problems(self, recipe: Any) -> list[str]:
        """``field: path: outside ...`` for each file a recipe names outside the roots (data, reward
        script, local model), so training never reads or imports a file the studio may not."""
        from tunelab.recipe import data_file_fields

        fields = [*data_file_fields(recipe), ("model.name_or_path", recipe.model.name_or_path)]
        reward = getattr(recipe.objective, "reward", None)
        if isinstance(reward, str) and reward:
            script, sep, _ = reward.rpartition(":")
            fields.append(("objective.reward", script if sep else reward))
        problems = []
        for name, value in fields:
            try:
                self.check_local(value, name)
            except OutsideRoots as e:
                problems.append(str(e))
        return problems
