"""Open registries: a config names a class (``type: audio``, ``name: symile``) by its key.

Towers and objectives each have one :class:`Registry`. A class registers itself with a
decorator; code outside the package registers its own classes the same way and names them in
YAML like the built-in ones. The built-ins are found by importing one module, named as a
string here (the way packaging entry points name plugins), so this ground-floor module never
imports the floors above it.

Example:
    >>> shapes = Registry("shape", "model.shape")
    >>> @shapes.register("square")
    ... class Square: ...
    >>> shapes.get("square").__name__
    'Square'
    >>> shapes.get("circle")
    Traceback (most recent call last):
    ...
    mmalign.errors.ConfigError: model.shape: unknown shape 'circle'; known: square
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mmalign.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to classes, filled by ``@registry.register(name)``.

    ``builtins`` is the module whose import registers the built-in entries; it is imported
    the first time a name is looked up or listed.
    """

    def __init__(self, kind: str, field: str, builtins: str | None = None) -> None:
        self.kind = kind
        self.field = field
        self.builtins = builtins
        self._entries: dict[str, T] = {}
        self._deferred: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator that makes the class available under ``name``."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")

        def decorate(entry: T) -> T:
            self._entries[name] = entry
            return entry

        return decorate

    def register_deferred(self, name: str, module: str) -> None:
        """Make ``name`` known now and registered by importing ``module`` (which registers it
        with :meth:`register`) when it is first looked up: for an entry whose module is slow
        to import (``graph`` needs torch_geometric), so processes that never use it skip it.
        """
        self._deferred[name] = module

    def _load_builtins(self) -> None:
        if self.builtins is not None:
            module, self.builtins = self.builtins, None
            importlib.import_module(module)

    def get(self, name: str, field: str | None = None) -> T:
        """The class registered as ``name``; a :class:`ConfigError` naming ``field`` if none."""
        if name not in self._entries:
            self._load_builtins()
        if name not in self._entries and name in self._deferred:
            importlib.import_module(self._deferred.pop(name))
        if name not in self._entries:
            raise ConfigError(
                f"{field or self.field}: unknown {self.kind} {name!r}; known: "
                f"{', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load_builtins()
        return sorted({*self._entries, *self._deferred})

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


TOWERS: Registry = Registry("tower type", "model.towers.<modality>.type", "mmalign.towers.builtins")
"""Tower classes by ``type:`` (see :mod:`mmalign.towers`)."""

TOWER_OPTIONS: Registry = Registry(
    "tower type", "model.towers.<modality>.type", "mmalign.towers.options"
)
"""Each tower type's options (its ``TowerConfig`` subclass) by ``type:``, in modules that
import no torch (:mod:`mmalign.towers.options`), so a config is checked before the towers load;
:func:`~mmalign.towers.register_tower` registers a tower's options with the tower."""

OBJECTIVES: Registry = Registry("objective", "model.objective.name", "mmalign.objectives.builtins")
"""Objective classes by ``name:`` (see :mod:`mmalign.objectives`)."""

OBJECTIVE_OPTIONS: Registry = Registry(
    "objective", "model.objective.name", "mmalign.objectives.options"
)
"""Each objective's options (its ``ObjectiveConfig`` subclass) by ``name:``, in modules that
import no torch (:mod:`mmalign.objectives.options`), so a config is checked before the
objectives load; :func:`~mmalign.objectives.register_objective` registers an objective's
options with the objective."""
