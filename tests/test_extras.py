"""Each optional use names its extra when its package is missing: one line, status 2 on the
command line. The packages are hidden from the import system for one test (as if the extra
were not installed), and the mmalign module that imports them is imported afresh."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmalign.cli.main import main
from mmalign.extras import MissingExtraError
from tests.train_support import tiny_config, write_shards


class _Hidden:
    """Wraps a finder of ``sys.meta_path`` so that it does not find ``packages``."""

    def __init__(self, finder: Any, packages: tuple[str, ...]) -> None:
        self.finder, self.packages = finder, packages

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name.split(".")[0] in self.packages:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.finder, name)


@pytest.fixture
def uninstall(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``uninstall("faiss", "mmalign.export.index")``: hide a package and forget the modules
    (the package's and the given mmalign ones) until the test ends."""

    def hide(package: str, *importers: str) -> None:
        for name in importers:  # their packages stay as they are
            importlib.import_module(name.rpartition(".")[0])
        monkeypatch.setattr(sys, "meta_path", [_Hidden(f, (package,)) for f in sys.meta_path])
        for name in list(sys.modules):
            if name.split(".")[0] == package or name in importers:
                monkeypatch.delitem(sys.modules, name)

    return hide


@pytest.mark.parametrize(
    ("package", "module", "message"),
    [
        (
            "torch_geometric",
            "mmalign.towers.graph",
            "the graph tower (type: graph): the torch_geometric package is not installed; "
            "pip install 'mmalign[graph]'",
        ),
        (
            "faiss",
            "mmalign.prep.mine_negatives",
            "mmalign prep mine-negatives: the faiss-cpu package is not installed; "
            "pip install 'mmalign[index]'",
        ),
        (
            "faiss",
            "mmalign.prep.group_shards",
            "mmalign prep group-shards: the faiss-cpu package is not installed; "
            "pip install 'mmalign[index]'",
        ),
        (
            "matplotlib",
            "mmalign.eval.plots",
            "figures (train.plots, mmalign eval): the matplotlib package is not installed; "
            "pip install 'mmalign[plots]'",
        ),
    ],
)
def test_a_module_of_an_extra_names_it(
    uninstall: Callable[..., None], package: str, module: str, message: str
) -> None:
    uninstall(package, module)
    with pytest.raises(MissingExtraError) as caught:
        importlib.import_module(module)
    assert str(caught.value) == message


def test_onnx_conversion_names_the_onnx_extra(
    uninstall: Callable[..., None], tmp_path: Path
) -> None:
    from mmalign.convert.onnx import to_onnx

    uninstall("onnx")
    with pytest.raises(MissingExtraError) as caught:
        to_onnx(None, tmp_path)
    assert str(caught.value) == (
        "mmalign convert --to onnx: the onnx package is not installed; pip install 'mmalign[onnx]'"
    )


@pytest.mark.parametrize(
    ("key", "package"), [("tensorboard", "tensorboard"), ("plots", "matplotlib")]
)
def test_training_logs_name_their_extra_before_the_run_starts(
    uninstall: Callable[..., None],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    package: str,
) -> None:
    shards = write_shards(tmp_path / "data", "train", shards=1, per_shard=8)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", shards, train={key: True})))
    uninstall(package)
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"mmalign: error: train.{key}: the {package} package is not installed; "
        f"pip install 'mmalign[{key}]' or set train.{key}: false\n"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_exporting_embeddings_needs_no_faiss_and_an_index_names_the_extra(
    uninstall: Callable[..., None], tmp_path: Path
) -> None:
    from tests.eval.test_zeroshot import tabular, tiny_model
    from tests.export.test_writer import export_options, make_data

    model = tiny_model("clip", {"x": tabular(3), "y": tabular(3)})
    shards, _ = make_data(tmp_path)
    uninstall("faiss", "mmalign.export.index", "mmalign.export.writer", "mmalign.export.search")
    from mmalign.export import build_index, export_embeddings

    manifest = export_embeddings(model, shards, ["x"], tmp_path / "out", **export_options())
    assert manifest["complete"] and manifest["rows"] == 23
    assert "faiss" not in sys.modules
    with pytest.raises(MissingExtraError) as caught:
        build_index(tmp_path / "out", "x")
    assert str(caught.value) == (
        "FAISS indexes (mmalign export --index, mmalign search): the faiss-cpu package is "
        "not installed; pip install 'mmalign[index]'"
    )
