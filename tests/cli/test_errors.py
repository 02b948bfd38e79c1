"""Every bad input a user can give the command line ends in one line on stderr,
``mmalign: error: <what> (<flag, config field or file:key>); <what to do>``, with status 2 and
no traceback: driven through ``main()`` as ``python -m mmalign`` runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mmalign.cli.main import main
from tests.train_support import tiny_config, write_shards


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained tiny run (modalities x, y), its export with two indexes, and bad files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    pattern = write_shards(root / "data", "train", shards=1, per_shard=16)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root / "run", pattern, train={"steps": 2})))
    assert main(["train", str(config)]) == 0
    shard = str(root / "data" / "train-000000.tar")
    export = ["export", str(root / "run"), "--data", shard, "--out", str(root / "emb")]
    assert main([*export, "--index", "flat", "--no-progress"]) == 0
    (root / "folder").mkdir()
    (root / "bad.json").write_text("{bad")
    (root / "classes.json").write_text('{"classnames": ["a", "b", "c", "d"], "templates": "{}"}')
    (root / "empty.csv").write_text("")
    (root / "header.csv").write_text("key,image,text\n")
    (root / "notes.txt").write_text("not an image\n")
    return {"root": root, "run": root / "run", "shard": Path(shard), "config": config}


def _cases(made: dict[str, Path]) -> list[tuple[list[str], str]]:
    """(argv, the flag, field or file:key the one-line error must name)."""
    root, run, shard = made["root"], str(made["run"]), str(made["shard"])
    data = ["--data", shard]
    classes = ["--classes", str(root / "classes.json")]
    return [
        (["zeroshot", run, *data, *classes, "--query", "imag"], "--query"),
        (["zeroshot", run, *data, *classes, "--query", "x"], "--text-modality"),
        (["zeroshot", run, *data, "--classes", str(root / "folder"), "--query", "x"], "--classes"),
        (
            ["zeroshot", run, *data, "--classes", str(root / "bad.json"), "--query", "x"],
            "bad.json:1",
        ),
        (["zeroshot", run, *data, *classes, "--query", "x", "--max-samples", "0"], "--max-samples"),
        (["eval", run, *data, "--classes", str(root / "missing.json")], "--classes"),
        (["eval", run, *data, "--modalities", "imgae"], "--modalities"),
        (["eval", str(root / "notes.txt"), *data], "MODEL"),
        (
            ["export", run, *data, "--out", str(root / "e1"), "--modalities", "imgae"],
            "--modalities",
        ),
        (
            ["export", run, *data, "--out", str(root / "e2"), "--modalities", "video"],
            "--modalities",
        ),
        (
            ["search", str(root / "emb"), "--query", "x=[1,2,3,4]", "--target", "x", "--k", "0"],
            "--k",
        ),
        (["search", str(root / "emb"), "--query", "x=[1,2,3,4]"], "--target"),
        (["search", str(root / "emb"), "--query", "x=[1,2,3,4]", "--target", "z"], "--target"),
        (["search", str(root / "emb"), "--query", "imag=a", "--target", "x"], "--query"),
        (["search", str(root / "emb"), "--image", str(root / "missing.png")], "--image"),
        (["search", str(root / "emb"), "--image", str(root / "folder")], "--image"),
        (["search", str(root / "emb"), "--image", str(root / "notes.txt")], "--image"),
        (["search", str(root / "notes.txt"), "--text", "a seven"], "INDEX"),
        (
            ["prep", "from-manifest", str(root / "empty.csv"), "--out", str(root / "s1")],
            "empty.csv",
        ),
        (
            ["prep", "from-manifest", str(root / "header.csv"), "--out", str(root / "s2")],
            "header.csv",
        ),
        (["train", str(root / "folder")], "folder"),
        (["train", str(made["config"]), "--set", "train.stpes=3"], "--set train.stpes=3"),
        (["train", str(made["config"]), "--set", "model.towers.x.hiden=3"], "model.towers.x.hiden"),
    ]


def test_each_bad_input_is_one_line_naming_the_field(
    made: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    for argv, field in _cases(made):
        try:
            status = main(argv)
        except SystemExit as exited:  # usage errors exit from argparse
            status = exited.code
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert status == 2, (argv, status, err)
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith("mmalign: error: "), (argv, err)
        # the field named in parentheses, then what to do after "; "
        where = re.search(r"\(([^()]*)\)(.*)$", lines[0])
        assert where is not None and field in lines[0], (argv, err)
        assert "; " in lines[0][lines[0].index(field) :], (argv, err)
        assert "Traceback" not in err


def test_unknown_modality_lists_the_valid_ones(
    made: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    out = made["root"] / "e3"
    argv = ["export", str(made["run"]), "--data", str(made["shard"]), "--out", str(out)]
    assert main([*argv, "--modalities", "imgae"]) == 2
    assert capsys.readouterr().err == (
        "mmalign: error: unknown modality 'imgae' (--modalities); use one of the model's "
        "modalities: x, y\n"
    )


def test_a_directory_is_called_a_directory(
    made: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    folder = made["root"] / "folder"
    assert main(["train", str(folder)]) == 2
    assert "is a directory" in capsys.readouterr().err
    argv = ["zeroshot", str(made["run"]), "--data", str(made["shard"]), "--query", "x"]
    assert main([*argv, "--classes", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "does not exist" not in err


def test_debug_shows_the_traceback(made: dict[str, Path]) -> None:
    out = str(made["root"] / "unused")  # not the working directory
    argv = ["export", str(made["run"]), "--data", str(made["shard"]), "--out", out]
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        main(["--debug", *argv, "--modalities", "video"])


def test_two_metadata_flags_both_apply(made: dict[str, Path]) -> None:
    import pyarrow.parquet as pq

    out = made["root"] / "meta"
    argv = ["export", str(made["run"]), "--data", str(made["shard"]), "--out", str(out)]
    assert main([*argv, "--metadata", "cls", "--metadata", "x.npy", "--no-progress"]) == 0
    columns = pq.read_table(next((out / "meta").glob("chunk-*.parquet"))).column_names
    assert {"cls", "x.npy"} <= set(columns)


def test_resume_of_a_finished_run_says_it_did_nothing(
    made: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    before = (made["run"] / "metrics.jsonl").read_text()
    assert main(["train", str(made["config"]), "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"nothing to do: {made['run']} already finished its 2 steps")
    assert (made["run"] / "metrics.jsonl").read_text() == before
