"""Importing this module registers the built-in objectives in
:data:`~mmalign.registry.OBJECTIVES` (the registry imports it on its first look-up)."""

from mmalign.objectives import anchored, clip, sigmoid, symile  # noqa: F401  (fill OBJECTIVES)
