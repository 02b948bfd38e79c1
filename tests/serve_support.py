"""A small served export for tests/serve: digit records (a PNG, a caption, a DTMF tone in
FLAC, a label), a random tiny image/text/audio model (Matryoshka prefixes 8 and 16 of 32),
an export of the three modalities with their items kept and flat indexes, and the same
export copied with its image index built at the prefix 16 (what ``mmalign search`` answers
a prefix search from). No test here."""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mmalign.demo.digits import DIGIT_WORDS, dtmf_clip, flac_bytes
from mmalign.export import build_index, run_export
from mmalign.model import AlignmentModel

ROWS = 40
TOWERS = {
    "image": {
        "type": "image",
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
    },
    "text": {"type": "text", "width": 32, "heads": 2, "layers": 1, "context_length": 16},
    "audio": {
        "type": "audio",
        "encoder": "cnn",
        "sample_rate": 16000,
        "clip_seconds": 0.5,
        "n_mels": 16,
        "f_max": 2000.0,
        "width": 32,
        "cnn_channels": [8, 16],
    },
}
FIELDS = {"image": "png", "text": "txt", "audio": "flac"}


def digit_png(digit: int, rng: np.random.Generator) -> bytes:
    """A 32 px noisy image with a bright bar whose position is the digit."""
    array = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
    array[:, 3 * digit : 3 * digit + 3] += 180
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_digit_shard(path: Path, count: int = ROWS, seed: int = 0) -> str:
    """One shard of ``count`` digit records (png, txt, flac, cls)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as writer:
        for index in range(count):
            digit = index % 10
            writer.write(
                {
                    "__key__": f"row{index:03d}",
                    "png": digit_png(digit, rng),
                    "txt": f"the digit {DIGIT_WORDS['en'][digit]}",
                    "flac": flac_bytes(dtmf_clip(digit, rng)),
                    "cls": digit,
                }
            )
    return str(path)


@dataclass
class ServedFixture:
    """The paths of the fixture: the model, the full export, its prefix-16 copy, a shard."""

    model_dir: Path
    export: Path
    export16: Path
    shard: str


def make_served_export(root: Path, objective: str = "clip") -> ServedFixture:
    """Write the model, the shard, the export (items kept, flat index per modality) and the
    prefix-16 copy under ``root``."""
    torch.manual_seed(0)
    config = {"dim": 32, "matryoshka": [8, 16, 32], "objective": {"name": objective}}
    model = AlignmentModel.from_config({**config, "towers": TOWERS}).eval()
    model_dir = model.save_pretrained(root / "model")
    shard = write_digit_shard(root / "data" / "digits-000000.tar")
    export = root / "emb"
    run_export(
        str(model_dir),
        shard,
        list(FIELDS),
        export,
        index="flat",
        items=list(FIELDS),
        fields=FIELDS,
        metadata_fields=["cls"],
        dtype="float32",
        progress=False,
    )
    export16 = root / "emb16"
    shutil.copytree(export, export16)
    build_index(export16, "image", "flat", dim=16)
    return ServedFixture(Path(model_dir), export, export16, shard)
