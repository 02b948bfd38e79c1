"""``mmalign prep``: every tool a real sub-subcommand with its own options, one-line errors."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from mmalign.cli.main import main
from mmalign.cli.prep import TOOLS
from mmalign.errors import UserError


def _help(argv: list[str]) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    return out.getvalue()


def test_prep_help_lists_every_tool() -> None:
    shown = _help(["prep", "--help"])
    assert sorted(TOOLS) == [
        "curate",
        "from-manifest",
        "group-shards",
        "make-demo",
        "mine-negatives",
        "train-tokenizer",
    ]
    for tool, module in TOOLS.items():
        assert tool in shown and module.HELP.split()[0] in shown


@pytest.mark.parametrize(
    ("tool", "options"),
    [
        ("make-demo", ["--out", "--seed", "--variants", "--limit", "--force", "--no-progress"]),
        ("from-manifest", ["manifest", "--fields", "--vector", "--val-fraction", "--key-column"]),
        ("train-tokenizer", ["--shards", "--manifest", "--vocab-size", "--model-type"]),
        ("group-shards", ["--embeddings", "--modality", "--clusters", "--maxcount", "--seed"]),
        ("mine-negatives", ["--embeddings", "--query", "--candidates", "--k", "--max-ratio"]),
        ("curate", ["--data", "--threshold", "--keep-fraction", "--dedup-threshold", "--missing"]),
    ],
)
def test_each_tool_help_shows_its_own_options(tool: str, options: list[str]) -> None:
    shown = _help(["prep", tool, "--help"])
    assert shown.startswith(f"usage: mmalign prep {tool} ")
    assert all(option in shown for option in options), shown


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["prep", "from-manifest", "m.csv", "--out", "o", "--fields", "image"],
            "mmalign: error: entry 'image' must look like column=extension (--fields); "
            "see mmalign prep from-manifest --help",
        ),
        (
            ["prep", "from-manifest", "m.csv", "--out", "o", "--val-fraction", "1.5"],
            "mmalign: error: '1.5' is not a number in [0, 1) (--val-fraction); "
            "see mmalign prep from-manifest --help",
        ),
        (
            ["prep", "make-demo", "--out", "o", "--limit", "3"],
            "mmalign: error: '3' is not a whole number >= 10 (--limit); "
            "see mmalign prep make-demo --help",
        ),
        (
            ["prep", "make-demo", "--out", "o", "--variants", "0"],
            "mmalign: error: '0' is not a whole number in [1, 100] (--variants); "
            "see mmalign prep make-demo --help",
        ),
        (
            ["prep", "make-demo", "--out", "o", "--variants", "999999999"],
            "mmalign: error: '999999999' is not a whole number in [1, 100] (--variants); "
            "see mmalign prep make-demo --help",
        ),
        (
            ["prep", "group-shards", "--modality", "x", "--clusters", "2", "--out", "o"],
            "mmalign: error: missing required argument(s) (--embeddings); "
            "see mmalign prep group-shards --help",
        ),
    ],
)
def test_tool_errors_are_one_line(
    argv: list[str], line: str, capsys: pytest.CaptureFixture
) -> None:
    try:
        status = main(argv)
    except SystemExit as exited:
        status = exited.code
    assert status == 2
    assert capsys.readouterr().err == line + "\n"


def test_debug_after_a_tool_s_arguments_raises(tmp_path: Path) -> None:
    arguments = ["--embeddings", str(tmp_path), "--out", str(tmp_path / "o"), "--modality", "x"]
    with pytest.raises(UserError, match="holds no finished export"):
        main(["prep", "group-shards", *arguments, "--clusters", "2", "--debug"])
