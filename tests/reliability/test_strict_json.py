"""The JSON files mmalign writes are strict JSON (RFC 8259): a non-finite number is written
as ``null``, never as Python's ``NaN`` / ``Infinity`` / ``-Infinity``, which other readers
(``jq``, JavaScript, Go) refuse. ``prep curate`` without a threshold wrote ``"cut":
-Infinity``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tiny_run import trained_run

from mmalign.export.curate import curate
from mmalign.files import write_json


def strict(text: str) -> Any:
    """``text`` parsed as strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` refused."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_write_json_writes_null_for_non_finite_numbers(tmp_path: Path) -> None:
    data = {"cut": -math.inf, "scores": [0.5, math.nan, (math.inf, 1)], "n": 3, "s": "NaN"}
    write_json(tmp_path / "a.json", data)
    assert strict((tmp_path / "a.json").read_text()) == {
        "cut": None,
        "scores": [0.5, None, [None, 1]],
        "n": 3,
        "s": "NaN",
    }


def test_curate_without_a_cut_writes_strict_json(tmp_path: Path) -> None:
    run, shards = trained_run(tmp_path)
    report = curate(run, shards, tmp_path / "curated", dedup=None)
    assert report["cut"] == -math.inf  # no threshold, no fraction: every record is kept
    written = strict((tmp_path / "curated" / "curate.json").read_text())
    assert written["cut"] is None and written["kept"] == report["kept"] == 48
