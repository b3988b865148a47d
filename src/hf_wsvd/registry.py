"""A registry of named plug-ins (methods, pipelines): the built-in ones are known by name without
importing their modules, so listing them imports no torch (the command line's choices), and each is
imported the first time it is used; others are added at run time by their ``register_*`` decorator."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import TypeVar

T = TypeVar("T")


class Registry(MutableMapping[str, T]):
    """Name → entry. ``builtins`` maps each built-in name to the module of ``package`` that
    registers it on import; ``kind`` names the entries in errors."""

    def __init__(self, kind: str, package: str, builtins: dict[str, str]) -> None:
        self.kind, self.package, self.builtins = kind, package, builtins
        self._entries: dict[str, T] = {}

    def __getitem__(self, name: str) -> T:
        if name not in self._entries and name in self.builtins:
            importlib.import_module(f"{self.package}.{self.builtins[name]}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        # a list or dict given for a name is simply not one (not a TypeError naming no field)
        return isinstance(name, str) and (name in self.builtins or name in self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter([*self.builtins, *(name for name in self._entries if name not in self.builtins)])

    def __len__(self) -> int:
        return len(set(self.builtins) | set(self._entries))

    def __setitem__(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def lookup(self, name: str) -> T:
        """The entry ``name``, or a ValueError naming it and the registered names."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {sorted(self)}")
        return self[name]
