"""Kept items: ``mmalign export --keep-items`` copies each exported row's source file (the
exact bytes of the shard's member), leaves out files over the cap, and counts both."""

from __future__ import annotations

import contextlib
import io
import tarfile

import torch

from mmalign.cli.main import main
from mmalign.export.items import keep_items, kept_modalities, load_items
from mmalign.model import AlignmentModel
from tests.serve_support import TOWERS, write_digit_shard


def test_export_keeps_the_source_bytes_under_the_cap(tmp_path) -> None:
    torch.manual_seed(0)
    model_dir = AlignmentModel.from_config({"dim": 16, "towers": TOWERS}).save_pretrained(
        tmp_path / "model"
    )
    shard = write_digit_shard(tmp_path / "digits-000000.tar", count=12)
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    cap = sorted(len(data) for name, data in members.items() if name.endswith(".png"))[6]
    printed = io.StringIO()
    arguments = ["export", str(model_dir), "--data", shard, "--out", str(tmp_path / "emb")]
    arguments += ["--modalities", "image,text", "--keep-items", "image,text", "--no-progress"]
    arguments += ["--field", "image=png", "--field", "text=txt", "--max-item-bytes", str(cap)]
    with contextlib.redirect_stdout(printed):
        assert main(arguments) == 0
    images, texts = load_items(tmp_path / "emb", "image"), load_items(tmp_path / "emb", "text")
    small = {
        n[: -len(".png")]: d for n, d in members.items() if n.endswith(".png") and len(d) <= cap
    }
    assert {key: data for key, (_, data) in images.items()} == small
    assert len(small) < 12 and all(ext == "png" for ext, _ in images.values())
    assert {key: data for key, (_, data) in texts.items()} == {
        n[: -len(".txt")]: d for n, d in members.items() if n.endswith(".txt")
    }
    over = 12 - len(small)
    assert (
        f"items: image (kept {len(small)}, over_cap {over}, missing {over})" in printed.getvalue()
    )
    assert kept_modalities(tmp_path / "emb") == ["image", "text"]
    counts = keep_items(tmp_path / "emb", None, ["text"], max_bytes=1)  # every caption is over
    assert counts == {"text": {"kept": 0, "over_cap": 12, "missing": 12}}
