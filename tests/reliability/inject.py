"""Run ``python -m mmalign ...`` with deterministic SIGKILL fault points.

Usage::

    python tests/reliability/inject.py --kill 'mmalign.training.checkpoint:save_model:2:before' \
        -- train run.yaml --resume

A kill spec is ``module:attribute.path:call:mode[:match]``: on the ``call``-th call (1-based)
of that function (with ``match``: the ``call``-th call whose positional arguments, as text,
contain ``match``, as ``os:replace:1:after:.old-best``) the process sends itself SIGKILL,
``before`` the call, ``after`` it returns, or
``truncate``: after it returns, cut the file it wrote (its second positional argument, as in
``save_file(tensors, path)``) to half its size first (a write torn by the kill). Nothing runs
after SIGKILL (no ``finally``, no atexit), exactly as when a scheduler kills the job.
Mode ``pause`` does not kill: before the call it creates ``$MMALIGN_FAULT_DIR/paused`` and
waits until ``$MMALIGN_FAULT_DIR/release`` exists (to hold a run in the middle of its work).

Example:
    >>> parse_spec("mmalign.training.checkpoint:save_file:3:truncate")
    ('mmalign.training.checkpoint', 'save_file', 3, 'truncate', '')
    >>> parse_spec("os:unlink:2:after:safetensors")[-1]
    'safetensors'
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import runpy
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ("before", "after", "truncate", "pause")
POLL_SECONDS = 0.02


def parse_spec(spec: str) -> tuple[str, str, int, str, str]:
    """``module:attr.path:call:mode[:match]`` to its five parts (validated)."""
    module, attribute, call, mode, *match = spec.split(":", 4)
    if mode not in MODES or int(call) < 1:
        raise ValueError(f"bad kill spec {spec!r}: call must be >= 1 and mode one of {MODES}")
    return module, attribute, int(call), mode, match[0] if match else ""


def die() -> None:
    """SIGKILL this process (flush nothing, run no cleanup)."""
    os.kill(os.getpid(), signal.SIGKILL)


def pause() -> None:
    """Signal ``paused`` and wait for ``release`` in ``$MMALIGN_FAULT_DIR``."""
    directory = Path(os.environ["MMALIGN_FAULT_DIR"])
    (directory / "paused").write_text(str(os.getpid()))
    while not (directory / "release").exists():
        time.sleep(POLL_SECONDS)


def _truncate(path: Any) -> None:
    file = Path(path)
    if file.is_file():
        with open(file, "r+b") as handle:
            handle.truncate(file.stat().st_size // 2)


def _wrap(function: Callable[..., Any], call: int, mode: str, match: str) -> Callable[..., Any]:
    calls = 0

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if match and match not in " ".join(map(str, args)):
            return function(*args, **kwargs)
        calls += 1
        if calls == call and mode == "pause":
            pause()
        elif calls == call and mode == "before":
            die()
        result = function(*args, **kwargs)
        if calls == call and mode != "pause":
            if mode == "truncate":
                _truncate(args[1] if len(args) > 1 else kwargs.get("filename"))
            die()
        return result

    return wrapper


def install(spec: str) -> None:
    """Replace the named function by one that kills the process at the given call."""
    module_name, attribute, call, mode, match = parse_spec(spec)
    owner: Any = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    setattr(owner, name, _wrap(getattr(owner, name), call, mode, match))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill", action="append", default=[], help="module:attr:call:mode")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="-- then mmalign's arguments")
    options = parser.parse_args(argv)
    arguments = options.arguments[1:] if options.arguments[:1] == ["--"] else options.arguments
    for spec in options.kill:
        install(spec)
    sys.argv = ["mmalign", *arguments]
    runpy.run_module("mmalign", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
