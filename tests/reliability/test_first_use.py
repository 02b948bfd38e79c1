"""What a newcomer met on first use: ``from_pretrained`` takes a run directory as every command
does, ``import mmalign`` (and the graph tower's torch_geometric) prints no warning, ``eval
--dim`` evaluates a Matryoshka prefix, a convert output gets the umask's mode as runs do."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env, tiny_config, write_shards

from mmalign import AlignmentModel
from mmalign.cli.main import main
from mmalign.eval.report import run_eval
from mmalign.training import train


@pytest.fixture(scope="module")
def matryoshka_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("first")
    shards = write_shards(root / "shards")
    config = tiny_config(root / "run", shards, train={"steps": 2}, model={"matryoshka": [4, 8]})
    return train(config).output_dir, shards


def test_from_pretrained_takes_a_run_directory(matryoshka_run: tuple[Path, str]) -> None:
    run, _ = matryoshka_run
    from_run = AlignmentModel.from_pretrained(run)
    from_model = AlignmentModel.from_pretrained(run / "model")
    assert from_run.state_dict().keys() == from_model.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(from_run.state_dict().values(), from_model.state_dict().values())
    )


def test_eval_dim_reports_the_prefix_the_full_eval_reports(
    matryoshka_run: tuple[Path, str], tmp_path: Path
) -> None:
    run, shards = matryoshka_run
    full = run_eval(run, shards, tmp_path / "full", plots=False)["metrics"]
    prefix = run_eval(run, shards, tmp_path / "dim4", plots=False, dim=4)
    assert prefix["dim"] == 4
    recalls = {key: value for key, value in prefix["metrics"].items() if "R@" in key}
    assert recalls and all(full[f"dim4/{key}"] == value for key, value in recalls.items())
    assert not [key for key in prefix["metrics"] if key.startswith("dim")]


def test_eval_dim_on_the_command_line(
    matryoshka_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, shards = matryoshka_run
    out = tmp_path / "eval"
    assert (
        main(["eval", str(run), "--data", shards, "--dim", "4", "--no-plots", "--out", str(out)])
        == 0
    )
    assert '"dim": 4' in (out / "eval.json").read_text()
    assert main(["eval", str(run), "--data", shards, "--dim", "9", "--out", str(out)]) == 2
    assert "dim 9 is outside 1..8, the model's dim (--dim)" in capsys.readouterr().err


def test_convert_output_mode_follows_the_umask(
    matryoshka_run: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = matryoshka_run
    out = tmp_path / "onnx"
    old = os.umask(0o022)
    try:
        assert (
            main(["convert", str(run), "--to", "onnx", "--modality", "labs", "--out", str(out)])
            == 0
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE(run.stat().st_mode) == 0o755


@pytest.mark.launches
def test_import_prints_no_warning() -> None:
    code = (
        "import mmalign; from mmalign import AlignmentModel; import mmalign.towers.graph; "
        "from mmalign.config import load_config"
    )
    env = {**subprocess_env(), "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_matryoshka_loss_plot_has_the_total_and_the_prefixes_apart() -> None:
    from mmalign.training.curves import PLOTS, _figure, collect_series

    record = {"step": 1, "train/loss": 2.0, "val/loss": 2.1}
    record |= {f"train/loss/dim{dim}": 2.0 + dim / 100 for dim in (8, 16, 32, 64)}
    record |= {f"train/loss/{pair}": 2.0 for pair in ("a-b", "a-c", "b-c")}
    series = collect_series([record, {**record, "step": 2}], PLOTS["loss.png"][0])
    _, (total, terms) = _figure("loss.png", series)
    assert [line.get_label() for line in total.get_lines()] == ["training", "validation"]
    labels = [line.get_label() for line in terms.get_lines()]
    assert labels == ["first 8 dims", "first 16 dims", "first 32 dims", "first 64 dims"]


def test_one_validation_point_shows_class_and_instance_apart() -> None:
    from mmalign.training.curves import PLOTS, _figure, collect_series

    record = {"step": 5, "val/instance/R@1/mean": 0.4, "val/class/R@1/mean": 0.7}
    series = collect_series([record], PLOTS["validation.png"][0])
    _, (axes,) = _figure("validation.png", series)
    lines = {line.get_label(): line for line in axes.get_lines()}
    instance, level = lines["R@1 instance, mean"], lines["R@1 class, mean"]
    assert instance.get_color() != level.get_color()
    assert instance.get_marker() != level.get_marker() and instance.get_markersize() >= 6
