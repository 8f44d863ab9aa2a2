"""A tiny registry: interchangeable parts (methods, objectives) register here, the engine looks them up.

Why not plain dicts in each package: one shape for every registry gives one error message style
("unknown method 'lroa'; did you mean 'lora'?") and lets the recipe schema be built from whatever
is registered, so adding a method never touches the schema.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


def did_you_mean(word: str, options: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return " Did you mean 'x'?" for the closest option, or "" when nothing is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered part: its recipe config class and the object that does the work."""

    name: str
    config_cls: type[BaseModel]
    impl: T


class Registry(Generic[T]):
    """Name → (config class, implementation), with helpful errors for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config_cls: type[BaseModel]) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("lora", LoraConfig)`` above the implementation."""

        def add(impl: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, config_cls, impl)
            return impl

        return add

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise KeyError(
                f"unknown {self.kind} '{name}'.{did_you_mean(name, self.names())} "
                f"Known: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def config_classes(self) -> list[type[BaseModel]]:
        return [e.config_cls for e in self._entries.values()]

    def __contains__(self, name: Any) -> bool:
        return name in self._entries
