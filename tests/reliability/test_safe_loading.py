"""Loading reads safetensors and JSON only: planted pickles are refused and never executed
(each payload would create a marker file; a positive control shows it really would), tower
checkpoints are read with ``weights_only=True``, and configs cannot name Python objects."""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import REPO, plant_pickle, plant_raw_pickle, tiny_config, write_config

from mmalign.config import ConfigError, load_config
from mmalign.config.strict_yaml import StrictLoader
from mmalign.model import AlignmentModel
from mmalign.training import train
from mmalign.training.checkpoint import latest_checkpoint

VISION = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
EVIL_YAML = "model: !!python/object/apply:builtins.open [{marker}, w]\n"  # creates marker


def tiny_model() -> AlignmentModel:
    return AlignmentModel.from_config(
        {"dim": 4, "towers": {"labs": {"type": "tabular", "in_features": 3, "hidden": 8}}}
    )


def test_the_payloads_would_run_code_if_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    pickle.loads(plant_raw_pickle(tmp_path / "raw.pkl", marker).read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(plant_pickle(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    yaml.unsafe_load(EVIL_YAML.format(marker=marker))
    assert marker.exists()


def test_from_pretrained_refuses_pickles(tmp_path: Path) -> None:
    saved = tiny_model().save_pretrained(tmp_path / "model")
    marker = tmp_path / "marker"
    (saved / "model.safetensors").rename(tmp_path / "good.safetensors")
    plant_pickle(saved / "pytorch_model.bin", marker)
    with pytest.raises(
        FileNotFoundError, match=r"found pytorch_model\.bin, which mmalign does not"
    ):
        AlignmentModel.from_pretrained(saved)
    plant_pickle(saved / "model.safetensors", marker)  # a pickle under the safetensors name
    with pytest.raises(ValueError, match="must be a safetensors file"):
        AlignmentModel.from_pretrained(saved)
    assert not marker.exists()


def test_resume_refuses_pickled_checkpoint_files(tmp_path: Path, shards: str) -> None:
    run, marker = tmp_path / "run", tmp_path / "marker"
    config_path = write_config(
        tmp_path / "run.yaml", tiny_config(run, shards, train={"steps": 3, "save_every": 3})
    )
    train(config_path)
    latest = latest_checkpoint(run / "checkpoints")
    plant_pickle(latest / "pytorch_model.bin", marker)  # extra pickles are never opened
    plant_pickle(latest / "optimizer.pt", marker)
    assert train(config_path, ["train.steps=4"], resume=True).steps == 4
    newest = latest_checkpoint(run / "checkpoints")
    for name in ("model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"):
        backup = tmp_path / name
        shutil.copy(newest / name, backup)
        plant_pickle(newest / name, marker)
        with pytest.raises(Exception, match=name.replace(".", r"\.")) as caught:
            train(config_path, ["train.steps=5"], resume=True)
        assert "safetensors" in str(caught.value)
        shutil.copy(backup, newest / name)
    plant_raw_pickle(newest / "trainer.json", marker)
    with pytest.raises(Exception, match=r"trainer\.json"):
        train(config_path, ["train.steps=5"], resume=True)
    assert not marker.exists()


def test_tower_checkpoints_are_read_with_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    tower = {"type": "image", "embed_dim": 8, "vision_cfg": VISION}
    source = AlignmentModel.from_config({"dim": 4, "towers": {"image": tower}})
    trusted = tmp_path / "visual.pt"
    torch.save(source.towers["image"].visual.state_dict(), trusted)  # plain tensors: accepted
    loaded = AlignmentModel.from_config(
        {"dim": 4, "towers": {"image": {**tower, "checkpoint": str(trusted)}}}
    )
    for name, value in source.towers["image"].state_dict().items():
        assert torch.equal(loaded.towers["image"].state_dict()[name], value), name
    evil = plant_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(ConfigError) as refused:
        AlignmentModel.from_config(
            {"dim": 4, "towers": {"image": {**tower, "checkpoint": str(evil)}}}
        )
    assert not marker.exists()
    message = str(refused.value)  # torch's 600-character paragraph: only what it refused
    assert message.startswith(f"cannot read the checkpoint {evil}: torch refuses to unpickle")
    assert message.endswith(
        "(model.towers.image.checkpoint); pass a .safetensors file or a "
        "torch file of tensors only (a state dict)"
    )
    assert "\n" not in message and len(message) < len(str(evil)) + 300
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as refused:
        AlignmentModel.from_config(
            {"dim": 4, "towers": {"image": {**tower, "checkpoint": str(garbage)}}}
        )
    assert f"{garbage}: torch refuses to unpickle it with weights_only=True (Unsupported " in str(
        refused.value
    ) and "https://" not in str(refused.value)


@pytest.mark.timeout(60)  # a FIFO that were opened would block until then
@pytest.mark.parametrize("kind", ["directory", "FIFO", "device"])
def test_a_tower_checkpoint_that_is_no_file_is_named_so(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory was reported as a missing file."""
    path, problem = {
        "directory": (tmp_path / "ckdir", "is a directory, not a file"),
        "FIFO": (tmp_path / "fifo.pt", "is not a regular file (a device, FIFO or socket)"),
        "device": (Path("/dev/zero"), "is not a regular file (a device, FIFO or socket)"),
    }[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "FIFO":
        os.mkfifo(path)
    tower = {"type": "image", "embed_dim": 8, "vision_cfg": VISION, "checkpoint": str(path)}
    with pytest.raises(ConfigError) as refused:
        AlignmentModel.from_config({"dim": 4, "towers": {"image": tower}})
    assert str(refused.value).startswith(
        f"the checkpoint {path} {problem} (model.towers.image.checkpoint); give the path of a "
        "local checkpoint file"
    )


def test_hf_text_tower_never_unpickles(tmp_path: Path) -> None:
    directory, marker = tmp_path / "bert", tmp_path / "marker"
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.BertModel(config).save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    plant_pickle(directory / "pytorch_model.bin", marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        AlignmentModel.from_config(
            {
                "dim": 4,
                "towers": {"text": {"type": "text", "backend": "hf", "path": str(directory)}},
            }
        )
    assert not marker.exists()


def test_yaml_python_tags_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(EVIL_YAML.format(marker=marker))
    with pytest.raises(ConfigError, match="is not valid YAML") as refused:
        load_config(path)
    assert "\n" not in str(refused.value)  # one line, naming the line of the tag
    assert "could not determine a constructor" in str(refused.value)
    good = {"model": {"towers": {"labs": {"type": "tabular", "in_features": 2}}}}
    with pytest.raises(
        ConfigError, match=r"the value is not valid YAML: could .* \(--set train\.lr\)"
    ):
        load_config(good, [f"train.lr=!!python/object/apply:builtins.open [{marker}, w]"])
    assert not marker.exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"towers": {"labs": {"type": "os.system"}}}, "unknown tower type 'os.system'"),
        (
            {
                "towers": {"labs": {"type": "tabular", "in_features": 2}},
                "objective": {"name": "builtins.eval"},
            },
            "objective.name",
        ),
        ({"towers": {"image": {"type": "image", "model": "os:system"}}}, "model.towers.image"),
    ],
)
def test_config_cannot_name_python_objects(section: dict, message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        AlignmentModel.from_config({"dim": 4, **section})


UNSAFE_MODULES = {"pickle", "dill", "cloudpickle", "marshal", "shelve"}
METADATA_UNPICKLER = "mmalign/training/parallel/checkpoint_metadata.py"
"""The one module that may import pickle: its Unpickler subclass admits only torch's
checkpoint-metadata classes (tests/training/test_fsdp.py plants a code-executing pickle)."""


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found.append((ast.unparse(node.func), node))
    return found


def test_no_code_path_unpickles_or_imports_by_name() -> None:
    """A static guard over the package: every torch.load passes weights_only=True; no pickle,
    no yaml.load / unsafe_load, no allow_pickle=True, no trust_remote_code=True, no
    eval/exec; modules are imported by name only from fixed tables (the lazy public API and
    the ``prep`` tools)."""
    problems = []
    for path in sorted((REPO / "mmalign").rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(REPO)
        unsafe = _imported(tree) & UNSAFE_MODULES - (
            {"pickle"} if str(where) == METADATA_UNPICKLER else set()
        )
        problems += [f"{where}: imports {module}" for module in unsafe]
        for name, call in _calls(tree):
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name == "torch.load" and keywords.get("weights_only") != "True":
                problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
            if name == "yaml.load" and keywords.get("Loader") == "StrictLoader":
                continue  # config/strict_yaml.py: a SafeLoader subclass (asserted below)
            if name in (
                "yaml.load",
                "yaml.unsafe_load",
                "eval",
                "exec",
                "__import__",
                "pickle.load",
                "pickle.loads",
                "pydoc.locate",
            ):
                problems.append(f"{where}:{call.lineno}: {name}")
            if (
                keywords.get("allow_pickle") == "True"
                or keywords.get("trust_remote_code") == "True"
            ):
                problems.append(f"{where}:{call.lineno}: {ast.unparse(call)}")
            if name.endswith("import_module") and str(where) not in (
                "mmalign/__init__.py",  # lazy exports: a fixed table of module names
                "mmalign/training/__init__.py",  # the same
                "mmalign/objectives/__init__.py",  # the same (its options load no torch)
                "mmalign/cli/convert.py",  # the converters: a fixed table of module names
                "mmalign/registry.py",
            ):
                problems.append(f"{where}:{call.lineno}: imports a module by name")
    assert not problems, problems
    assert issubclass(StrictLoader, yaml.SafeLoader)
