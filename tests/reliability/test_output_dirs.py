"""Output folders (``convert``, ``eval``, the ``prep`` tools, ``export``, ``train.output``): a
new or empty folder, or a previous output of the same command holding nothing else, is
written; anything else there (a folder of the user's files, a copied record, the source being
read, a file, another command's output) is refused with one line and left as it was
(:mod:`mmalign.output_owner`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env, tiny_config
from tiny_run import exported, trained_run

from mmalign.cli.main import main
from mmalign.errors import UserError
from mmalign.output_owner import RECORD
from mmalign.training import train


@pytest.fixture(scope="module")
def run_and_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return trained_run(tmp_path_factory.mktemp("convert"))


@pytest.fixture(scope="module")
def run(run_and_shards: tuple[Path, str]) -> Path:
    return run_and_shards[0]


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (what must survive a refusal)."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def convert(run: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        status = main(
            ["convert", str(run), "--to", "onnx", "--modality", "labs", "--out", str(out)]
        )
    except SystemExit as exit:  # refused by the --out argument type, before convert runs
        status = int(exit.code or 0)
    return status, capsys.readouterr().err.strip()


def test_convert_refuses_what_it_did_not_write(
    tmp_path: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "papers"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    (tmp_path / "folders" / "x").mkdir(parents=True)  # an empty folder of the user's
    before = {path: tree(path) for path in (users, run)}
    for out, says in (
        (users, "holds files that convert --to onnx did not write (thesis.tex) (--out)"),
        (tmp_path / "folders", "holds files that convert --to onnx did not write (x) (--out)"),
        (run, f"{run} is the input {run} of convert --to onnx (--out)"),  # the source itself
        (run / "model", "lies inside the input"),
        (run / "onnx", "lies inside the input"),
        (run.parent, "holds the input"),
        (a_file, "is a file, not a directory"),
    ):
        status, error = convert(run, out, capsys)
        assert status == 2, out
        assert error.startswith("mmalign: error: ") and says in error, error
        assert len(error.splitlines()) == 1
    assert {path: tree(path) for path in (users, run)} == before
    assert a_file.read_text() == "keep me" and not list(tmp_path.glob(".old-*"))
    assert (tmp_path / "folders" / "x").is_dir()


def test_convert_writes_new_or_empty_folders_and_replaces_its_own_output(
    tmp_path: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(run, empty, capsys)[0] == 0
    assert (empty / "labs.onnx").is_file()
    first = (empty / "labs.onnx").stat().st_ino
    assert convert(run, empty, capsys)[0] == 0  # a previous onnx output: replaced
    assert (empty / "labs.onnx").stat().st_ino != first
    written = (empty / "labs.onnx").read_bytes()
    (empty / "labs.onnx").write_bytes(b"edited")  # changed since: the user's now
    status, error = convert(run, empty, capsys)
    assert status == 2 and "holds labs.onnx, changed since convert --to onnx wrote it" in error
    (empty / "labs.onnx").write_bytes(written)
    status = main(["convert", str(run), "--to", "hf", "--out", str(empty)])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "holds the output of convert --to onnx, not of convert --to hf" in error
    assert (empty / "labs.onnx").is_file()
    (empty / "notes.txt").write_text("mine")  # a file the user added to the output
    before = tree(empty)
    status, error = convert(run, empty, capsys)
    assert status == 2 and error.endswith(
        f"{empty} holds notes.txt, which convert --to onnx did not write (--out); move it out "
        "of the folder, or pick a new or empty folder"
    )
    assert tree(empty) == before  # nothing deleted
    (empty / "notes.txt").unlink()
    assert convert(run, empty, capsys)[0] == 0


def test_a_copied_record_is_no_provenance(
    tmp_path: Path, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The outside re-run copied convert's marker into the run (then ``convert run --out run``
    deleted the run, exit 0) and into a folder of the user's files (replaced, exit 0). A
    record describes the files it lists: any other file there, or one of another size, is
    refused; the source is refused whatever it holds."""
    out = tmp_path / "onnx"
    assert convert(run, out, capsys)[0] == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    users = tmp_path / "papers"
    users.mkdir()
    (users / "onnx.json").write_text("my own notes, named as convert names its file")
    for folder in (copy, users):
        shutil.copy(out / RECORD, folder / RECORD)
    shutil.copy(out / RECORD, copy / ".mmalign-convert.json")  # the old marker's name too
    before = {path: tree(path) for path in (copy, users)}
    status, error = convert(copy, copy, capsys)
    assert status == 2 and f"{copy} is the input {copy} of convert" in error, error
    status, error = convert(run, copy, capsys)
    assert status == 2 and ", which convert --to onnx did not write (--out)" in error, error
    status, error = convert(run, users, capsys)
    assert status == 2 and f"{users} holds onnx.json, changed since convert" in error, error
    assert {path: tree(path) for path in (copy, users)} == before


@pytest.mark.launches
def test_convert_refuses_out_before_it_loads_torch(run: Path, tmp_path: Path) -> None:
    """A bad ``--out`` was refused after about 5 s (torch and the model loaded first)."""
    users = tmp_path / "papers"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    code = (
        "import sys\n"
        "from mmalign.cli.main import main\n"
        f"status = main(['convert', {str(run)!r}, '--to', 'onnx', '--out', {str(users)!r}])\n"
        "print(status, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "did not write (thesis.tex) (--out)" in done.stderr


def test_train_tokenizer_replaces_only_an_earlier_tokenizer(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``prep train-tokenizer --out RUN/config.yaml`` replaced the run's config with a
    SentencePiece model (exit 0), and a failed training left an empty file. A file that is not
    a tokenizer, or a folder, is refused and left as it was; a failure keeps the old model."""
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("".join(f'{{"t": "a digit {i} seven three"}}\n' for i in range(200)))
    arguments = ["prep", "train-tokenizer", "--manifest", str(manifest), "--field", "t"]
    before = tree(run)
    for out in (run / "config.yaml", run):
        assert main([*arguments, "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "is not a SentencePiece model (--out)" in error
    assert tree(run) == before
    model = tmp_path / "spm.model"
    assert main([*arguments, "--out", str(model), "--vocab-size", "40"]) == 0
    first = model.read_bytes()
    assert main([*arguments, "--out", str(model), "--vocab-size", "30"]) == 0  # replaced
    second = model.read_bytes()
    assert second != first
    manifest.write_text('{"t": ""}\n')  # no sentence: SentencePiece fails
    assert main([*arguments, "--out", str(model)]) == 2  # the one-line error (--field)
    assert model.read_bytes() == second and sorted(tmp_path.iterdir()) == [model, manifest]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (
            {"manifest.json": '{"mine": 1}'},
            "manifest.json is not the manifest of an mmalign export",
        ),
        ({"manifest.json": "[1, 2]"}, "manifest.json is not the manifest of an mmalign export"),
        ({"notes.txt": "mine"}, "holds files an export did not write (notes.txt) (--out)"),
        ({}, "holds files an export did not write (checkpoints, config.yaml"),  # the run
    ],
    ids=["foreign manifest", "manifest list", "user folder", "run directory"],
)
def test_export_refuses_a_folder_it_did_not_write(
    run_and_shards: tuple[Path, str],
    tmp_path: Path,
    content: dict[str, str],
    named: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``export --out`` at a folder with someone else's ``manifest.json`` ended in a
    KeyError/TypeError traceback; at a folder of the user's files or at the run itself it
    wrote the export among them (replacing any file of the same name)."""
    run, shards = run_and_shards
    out = tmp_path / "out" if content else run
    for name, text in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = tree(out)
    assert main(["export", str(run), "--data", shards, "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and named in error and "(--out)" in error, error
    assert tree(out) == before


def test_eval_refuses_report_folders_it_did_not_write(
    tmp_path: Path, run_and_shards: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``eval --out`` over a user's ``eval.md``, the run, the shards' folder or the model wrote
    its report among them (exit 0), and through a ``RUN/eval`` linked out of the run. Refused
    and left as they were; its own report folder (``RUN/eval`` by default) is rewritten, and
    the run stays a run (it resumes)."""
    run, shards = run_and_shards
    users = tmp_path / "notes"
    users.mkdir()
    (users / "eval.md").write_text("my evaluation")
    shard_folder = Path(shards.split("{")[0]).parent
    folders = (users, run, run / "model", shard_folder)
    before = {path: tree(path) for path in folders}
    for out, says in (
        (users, f"{users} holds files that eval did not write (eval.md) (--out)"),
        (run, f"{run} is the input {run} of eval (--out)"),
        (run / "model", "holds files that eval did not write (config.json, model.safetensors"),
        (shard_folder, "holds files that eval did not write (train-000000.tar"),
    ):
        assert main(["eval", str(run), "--data", shards, "--out", str(out), "--no-plots"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and says in error, error
    assert {path: tree(path) for path in folders} == before
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "eval").symlink_to(users)  # the default report folder, linked out of the run
    assert main(["eval", str(copy), "--data", shards, "--no-plots"]) == 2
    error = capsys.readouterr().err
    assert f"{copy / 'eval'} is a symbolic link (to {users}) inside the input" in error, error
    assert tree(users) == before[users]
    (copy / "eval").unlink()
    for _ in range(2):  # the default report folder, then the same again
        assert main(["eval", str(copy), "--data", shards, "--no-plots"]) == 0
    assert sorted(tree(copy / "eval")) == [RECORD, "eval.json", "eval.md"]
    other = ["eval", str(copy), "--data", shards, "--no-plots", "--out", str(copy / "again")]
    assert main(other) == 0  # a report of its own kept in the run (as the demo's conversion)
    capsys.readouterr()
    (copy / ".config.yaml.tmp").write_text("torn")  # what a killed write leaves
    (copy / ".tmp-model").mkdir()
    (copy / ".tmp-model" / "model.safetensors").write_bytes(b"torn")
    resumed = train(copy / "config.yaml", [f"train.output={copy}"], resume=True)
    assert resumed.already_finished and resumed.steps == 2


def test_prep_refuses_foreign_summaries_and_the_working_directory(
    tmp_path: Path,
    run_and_shards: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``group-shards`` overwrote a folder holding a user's ``summary.json`` (and a copied
    record) and ``mine-negatives`` replaced a ``from-manifest`` output (both exit 0); ``prep
    curate --out .`` wrote among the files of the working directory. All refused, nothing
    changed, as is ``from-manifest --out`` at its manifest's folder; a prep tool replaces only
    its own output."""
    run, shards = run_and_shards
    export = exported(run, shards, tmp_path / "emb")
    grouped = tmp_path / "grouped"
    group = ["prep", "group-shards", "--embeddings", str(export), "--modality", "labs"]
    group += ["--clusters", "2", "--out"]
    mine = ["prep", "mine-negatives", "--embeddings", str(export), "--query", "labs"]
    mine += ["--candidates", "graph", "--k", "2", "--out"]
    assert main([*group, str(grouped)]) == 0
    assert main([*group, str(grouped)]) == 0  # its own output: replaced
    users = tmp_path / "notes"
    users.mkdir()
    (users / "summary.json").write_text('{"mine": true}')
    (users / RECORD).write_bytes((grouped / RECORD).read_bytes())  # a copied record
    manifest = users / "texts.jsonl"
    manifest.write_text("".join(f'{{"t": "text {i}"}}\n' for i in range(4)))
    texts = tmp_path / "texts"
    assert main(["prep", "from-manifest", str(manifest), "--out", str(texts)]) == 0
    capsys.readouterr()
    before = {path: tree(path) for path in (users, grouped, texts)}
    for command, says in (
        ([*group, str(users)], f"{users} holds summary.json, changed since prep group-shards"),
        ([*mine, str(grouped)], "holds the output of prep group-shards, not of prep mine-"),
        ([*mine, str(texts)], "holds the output of prep from-manifest, not of prep mine-"),
        (["prep", "from-manifest", str(manifest), "--out", str(users)], "holds the input"),
    ):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and says in error and "(--out)" in error, error
    monkeypatch.chdir(users)
    curate = ["prep", "curate", str(run), "--data", shards, "--keep-fraction", "0.5"]
    with pytest.raises(SystemExit) as exit:
        main([*curate, "--out", "."])
    assert exit.value.code == 2 and "'.' is the working directory" in capsys.readouterr().err
    assert {path: tree(path) for path in (users, grouped, texts)} == before


def train_refusal(config: dict, resume: bool = False) -> str:
    with pytest.raises(UserError) as refused:
        train(config, resume=resume)
    return str(refused.value)


def test_train_output_must_be_new_empty_or_a_run(
    tmp_path: Path, run_and_shards: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.output`` at a folder of the user's files, the shards' folder, an export or
    ``.`` trained there (exit 0); with ``--resume`` a folder shaped like a run (the user's
    ``model/``, ``checkpoints/``, a ``config.yaml`` of another run) lost its config.yaml, then
    the run died of ``KeyError: 'step'``. Refused before anything is written."""
    run, shards = run_and_shards
    users = tmp_path / "users"
    shutil.copytree(run, users, ignore=shutil.ignore_patterns(RECORD, "run.json"))  # its shape
    (users / "model" / "my.txt").write_text("mine")
    (users / "metrics.jsonl").write_text('{"note": "mine"}\n')
    export = exported(run, shards, tmp_path / "emb")
    shard_folder = Path(shards.split("{")[0]).parent
    folders = (users, export, shard_folder)
    before = {path: tree(path) for path in folders}
    for output, resume in ((users, True), (users, False), (export, False), (shard_folder, False)):
        error = train_refusal(tiny_config(output, shards, train={"steps": 1}), resume)
        assert error.startswith(f"{output} holds files that train did not write ("), error
        assert error.endswith("(train.output); pick a new or empty folder"), error
    monkeypatch.chdir(users)
    error = train_refusal(tiny_config(Path("."), shards, train={"steps": 1}))
    assert error.startswith(". holds files that train did not write"), error
    assert {path: tree(path) for path in folders} == before


def test_a_run_of_an_earlier_mmalign_resumes_once_recorded(
    tmp_path: Path, run_and_shards: tuple[Path, str]
) -> None:
    """A run written before runs carried a record (its ``run.json``, ``config.yaml`` and a
    complete checkpoint, nothing a run does not write) resumes as it did, and is recorded;
    with one file of the user's beside it, it is refused and left as it was."""
    run, shards = run_and_shards
    earlier = tmp_path / "earlier"
    shutil.copytree(run, earlier, ignore=shutil.ignore_patterns(RECORD))
    config = tiny_config(earlier, shards, train={"steps": 3, "save_every": 2})
    (earlier / "notes.txt").write_text("mine")
    before = tree(earlier)
    error = train_refusal(config, resume=True)
    assert error.startswith(f"{earlier} holds files that train did not write ("), error
    assert tree(earlier) == before and not (earlier / RECORD).exists()
    (earlier / "notes.txt").unlink()
    with pytest.warns(UserWarning, match="a run of an earlier mmalign, now recorded"):
        result = train(config, resume=True)
    assert result.steps == 3 and (earlier / RECORD).is_file()


def test_a_run_that_fails_before_training_leaves_no_folder(
    tmp_path: Path, run_and_shards: tuple[Path, str]
) -> None:
    """A tower checkpoint that does not exist ended the run before training, and left an
    empty ``train.output`` behind."""
    config = tiny_config(tmp_path / "new", run_and_shards[1], train={"steps": 1})
    config["model"]["towers"]["labs"] = {
        "type": "image",
        "embed_dim": 8,
        "vision_cfg": {
            "image_size": 16,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "checkpoint": str(tmp_path / "nope.pt"),
    }
    assert "model.towers.labs.checkpoint" in train_refusal(config)
    assert not (tmp_path / "new").exists()
