"""Every guide in docs/ is a tested recipe: this test writes the files a user starts from
(images and a CSV of captions, a folder of WAV clips, graphs as JSON, a table with missing
values), then runs the commands of the guide's ```sh test blocks, taken from the guide itself,
in that folder (with ``configs/`` of this checkout), and checks what they produced.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import shlex
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image, ImageDraw

from mmalign.cli.main import main
from mmalign.config import load_config
from mmalign.data import iterate_records
from mmalign.data.exports import read_manifest as read_export
from mmalign.model import AlignmentModel

ROOT = Path(__file__).parents[1]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 30),
}
TONES = {
    "a low hum": 150.0,
    "a steady beep": 600.0,
    "a high whistle": 2400.0,
    "a shrill squeal": 5000.0,
}
SHAPES = ["ring", "chain", "star", "clique"]
# condition -> mean (heart_rate, systolic, diastolic), mean (glucose, sodium, potassium, creatinine)
CONDITIONS = {
    0: ((70, 120, 80), (90, 140, 4.2, 0.9)),
    1: ((105, 150, 95), (180, 136, 4.0, 1.0)),
    2: ((60, 100, 65), (95, 132, 5.6, 2.4)),
}


def guide_commands(path: Path) -> list[str]:
    """The commands of the ```sh test blocks of a markdown file, continuation lines joined."""
    blocks = re.findall(r"^```sh test\n(.*?)^```", path.read_text(), flags=re.S | re.M)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append(" ".join(command.split()))
    return commands


def guide_python(path: Path) -> list[str]:
    """The code of the ```python test blocks of a markdown file."""
    return re.findall(r"^```python test\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def run_guide(path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Run the guide's commands in ``workdir`` (beside a link to ``configs/``) through the
    ``mmalign`` entry point, in this process (one torch import for all of them), then its
    ```python test blocks (their asserts check what they compute); each command's standard
    output."""
    (workdir / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(workdir)
    outputs = {}
    for command in guide_commands(path):
        program, *argv = shlex.split(command)
        assert program == "mmalign", command
        started, printed = time.perf_counter(), io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = main(argv)
        assert status == 0, f"{command}\n{printed.getvalue()}"
        print(f"{time.perf_counter() - started:5.1f} s  {command}")
        outputs[command] = printed.getvalue()
    assert outputs, f"{path} has no ```sh test block"
    for code in guide_python(path):
        exec(compile(code, str(path), "exec"), {"__name__": "__guide__"})
    return outputs


def output_of(outputs: dict[str, str], prefix: str) -> str:
    """The output of the one command starting with ``prefix``."""
    (found,) = [text for command, text in outputs.items() if command.startswith(prefix)]
    return found


# -- the files a user starts from ------------------------------------------------------------
def shape_image(index: int, rng: np.random.Generator) -> tuple[Image.Image, str, int]:
    """A 48 px square (even ``index``) or circle (odd) of colour ``index % 4``, its caption
    and the colour's label."""
    label = index % len(COLOURS)
    colour = list(COLOURS)[label]
    image = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(0, 60, 3)))
    x, y = rng.integers(4, 24, 2)
    size = int(rng.integers(14, 22))
    draw = ImageDraw.Draw(image)
    shape = draw.ellipse if index % 2 else draw.rectangle
    shape([int(x), int(y), int(x) + size, int(y) + size], fill=COLOURS[colour])
    template = ["a {} square", "a {} circle"][index % 2]
    return image, template.format(colour), label


def write_photos(folder: Path, count: int = 160) -> None:
    """``photos/images/*.jpg`` of coloured shapes and ``photos/captions.csv``, plus a row
    whose image is missing and one whose image is corrupt."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(count):
        image, caption, label = shape_image(index, rng)
        name = f"images/{index:04d}.jpg"
        image.save(folder / name, quality=90)
        rows.append([f"{index:04d}", name, caption, label])
    (folder / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rows += [["9998", "images/missing.jpg", "a red square", 0]]
    rows += [["9999", "images/broken.jpg", "a red square", 0]]
    with (folder / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "image", "caption", "label"])
        writer.writerows(rows)


def write_clips(folder: Path, count: int = 160) -> None:
    """``clips/*.wav`` sine tones of four pitches and ``clips/captions.jsonl``."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    lines = []
    for index in range(count):
        label = index % len(TONES)
        caption, frequency = list(TONES.items())[label]
        rate = 16000
        seconds = rng.uniform(0.3, 0.5)
        t = np.arange(int(rate * seconds)) / rate
        wave = 0.5 * np.sin(2 * np.pi * frequency * rng.uniform(0.95, 1.05) * t)
        wave += 0.02 * rng.normal(size=t.shape)
        soundfile.write(folder / f"{index:04d}.wav", wave.astype(np.float32), rate)
        lines.append(
            {"key": f"{index:04d}", "audio": f"{index:04d}.wav", "caption": caption, "label": label}
        )
    lines.append({"key": "9999", "audio": "gone.wav", "caption": "a low hum", "label": 0})
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


SQUARES = {  # label -> (caption, colour, direction (rows, columns) per frame)
    0: ("a red square moving right", (220, 30, 30), (0, 3)),
    1: ("a blue square moving down", (40, 60, 220), (3, 0)),
    2: ("a green square moving left", (30, 180, 40), (0, -3)),
    3: ("a yellow square moving up", (230, 210, 30), (-3, 0)),
}
RHYTHMS = {  # label -> (caption, beats per second, beat-to-beat jitter)
    0: ("a normal heart rhythm", 1.1, 0.02),
    1: ("a fast heart rhythm", 2.6, 0.02),
    2: ("an irregular heart rhythm", 1.3, 0.35),
    3: ("a slow heart rhythm", 0.6, 0.02),
}


def write_videos(folder: Path, count: int = 96) -> None:
    """``videos/*.mp4``: 8 frames 32x32 of a coloured square moving one way, and
    ``videos/captions.jsonl`` (plus a row whose file is not a video)."""
    from mmalign.data.video import encode_video

    rng = np.random.default_rng(5)
    folder.mkdir(parents=True)
    lines = []
    for index in range(count):
        label = index % len(SQUARES)
        caption, colour, (down, right) = SQUARES[label]
        start = rng.integers(8, 16, size=2)
        frames = np.full((8, 32, 32, 3), 20, np.uint8)
        for t, frame in enumerate(frames):
            top, left = (start + t * np.array([down, right])) % 24
            frame[top : top + 8, left : left + 8] = colour
        (folder / f"{index:04d}.mp4").write_bytes(encode_video(frames, 8.0))
        lines.append({"key": f"{index:04d}", "video": f"{index:04d}.mp4", "caption": caption,
                      "label": label})  # fmt: skip
    (folder / "broken.mp4").write_bytes(b"not a video")
    lines.append({"key": "9999", "video": "broken.mp4", "caption": "a red square", "label": 0})
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def ecg_like(beats_per_second: float, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """Two leads ``[2, 400]`` at 100 Hz: a narrow spike per beat, a T wave, baseline wander."""
    time = np.arange(400) / 100
    beats = np.cumsum(rng.normal(1 / beats_per_second, jitter / beats_per_second, size=20))
    beats = beats - rng.uniform(0, 1 / beats_per_second)
    lead = np.zeros_like(time)
    for beat in beats:
        lead += np.exp(-(((time - beat) / 0.015) ** 2)) + 0.3 * np.exp(
            -(((time - beat - 0.25) / 0.06) ** 2)
        )
    lead += 0.1 * np.sin(2 * np.pi * 0.2 * time + rng.uniform(0, 6)) + rng.normal(0, 0.03, 400)
    return np.stack([lead, 0.6 * lead + rng.normal(0, 0.03, 400)])


def write_recordings(folder: Path, count: int = 160) -> None:
    """``ecg/*.csv`` (columns lead_i, lead_ii; some recordings lack lead_ii) and
    ``recordings.csv`` (key, signal, rhythm, label), plus a row whose file is missing."""
    rng = np.random.default_rng(6)
    (folder / "ecg").mkdir(parents=True)
    rows = []
    for index in range(count):
        label = index % len(RHYTHMS)
        caption, rate, jitter = RHYTHMS[label]
        leads = ecg_like(rate, jitter, rng)
        names = ["lead_i", "lead_ii"] if rng.random() > 0.1 else ["lead_i"]
        with (folder / f"ecg/{index:04d}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(names)
            writer.writerows(np.round(leads[: len(names)].T, 4).tolist())
        rows.append([f"r{index:04d}", f"ecg/{index:04d}.csv", caption, label])
    rows.append(["r9999", "ecg/gone.csv", "a normal heart rhythm", 0])
    with (folder / "recordings.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "signal", "rhythm", "label"])
        writer.writerows(rows)


def graph_of(kind: str, nodes: int, rng: np.random.Generator) -> dict[str, Any]:
    """A small graph as JSON: ``x`` [nodes, 2] and ``edge_index`` (both directions)."""
    if kind == "ring":
        edges = [(i, (i + 1) % nodes) for i in range(nodes)]
    elif kind == "chain":
        edges = [(i, i + 1) for i in range(nodes - 1)]
    elif kind == "star":
        edges = [(0, i) for i in range(1, nodes)]
    else:
        edges = [(i, j) for i in range(nodes) for j in range(i + 1, nodes)]
    both = edges + [(j, i) for i, j in edges]
    x = [[1.0, float(rng.uniform(-0.1, 0.1))] for _ in range(nodes)]
    return {"x": x, "edge_index": [[i for i, _ in both], [j for _, j in both]]}


def write_graphs(folder: Path, count: int = 160) -> None:
    """``graphs/*.json`` and ``graphs.csv`` (key, graph file, caption, label)."""
    rng = np.random.default_rng(2)
    (folder / "graphs").mkdir(parents=True)
    rows = []
    for index in range(count):
        label = index % len(SHAPES)
        nodes = int(rng.integers(4, 8))
        graph = graph_of(SHAPES[label], nodes, rng)
        (folder / "graphs" / f"{index:04d}.json").write_text(json.dumps(graph))
        rows.append(
            [
                f"{index:04d}",
                f"graphs/{index:04d}.json",
                f"a {SHAPES[label]} of {nodes} atoms",
                label,
            ]
        )
    (folder / "graphs" / "bad.json").write_text('{"x": [[1.0, 0.0]], "edge_index": [[0], [5]]}')
    rows.append(["9999", "graphs/bad.json", "a ring of 1 atoms", 0])
    with (folder / "graphs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "graph", "caption", "label"])
        writer.writerows(rows)


def write_patients(folder: Path, count: int = 240) -> np.ndarray:
    """``patients.csv`` (x-ray path, vitals and labs with blanks, condition) and ``xrays/``;
    returns the labs table (NaN where blank) in row order."""
    rng = np.random.default_rng(3)
    (folder / "xrays").mkdir(parents=True)
    header = ["key", "xray", "heart_rate", "systolic", "diastolic"]
    header += ["glucose", "sodium", "potassium", "creatinine", "condition"]
    rows, labs = [], []
    for index in range(count):
        condition = index % len(CONDITIONS)
        vitals_mean, labs_mean = CONDITIONS[condition]
        vitals = rng.normal(vitals_mean, [5, 8, 5])
        values = rng.normal(labs_mean, [10, 2, 0.3, 0.2])
        vitals[rng.random(3) < 0.15] = np.nan
        values[rng.random(4) < 0.15] = np.nan
        xray = ""
        if rng.random() > 0.2:  # a fifth of the patients have no x-ray
            pixels = rng.normal(60 + 60 * condition, 20, (40, 40)).clip(0, 255).astype(np.uint8)
            xray = f"xrays/{index:04d}.png"
            Image.fromarray(pixels, "L").save(folder / xray)
        cells = [f"{v:.1f}" if not math.isnan(v) else "" for v in [*vitals, *values]]
        rows.append([f"p{index:04d}", xray, *cells, condition])
        labs.append(np.round(values, 1))
    with (folder / "patients.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return np.array(labs)


def write_img2dataset(folder: Path, shards: int = 4, per_shard: int = 48) -> dict[str, int]:
    """What ``img2dataset --output_format webdataset`` writes: ``00000.tar`` ... with
    ``<key>.jpg``, ``<key>.txt`` and ``<key>.json`` per record, and beside each tar a
    ``.parquet`` and a ``_stats.json``; returns each key's colour label."""
    rng = np.random.default_rng(4)
    folder.mkdir(parents=True)
    labels = {}
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for row in range(per_shard):
                index = shard * per_shard + row
                image, caption, labels[f"{index:09d}"] = shape_image(index, rng)
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=90)
                meta = {"url": f"https://example.org/{index}.jpg", "caption": caption}
                for extension, data in [
                    ("jpg", jpeg.getvalue()),
                    ("txt", caption.encode()),
                    ("json", json.dumps({**meta, "key": f"{index:09d}"}).encode()),
                ]:
                    info = tarfile.TarInfo(f"{index:09d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by mmalign PAR1")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": per_shard}))
    return labels


# -- the guides ---------------------------------------------------------------------------------
def read_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def training_losses(run: Path) -> list[float]:
    """The logged training losses of a run (every ``train.log_every`` steps)."""
    losses = [record["train/loss"] for record in read_metrics(run) if "train/loss" in record]
    assert len(losses) >= 2
    return losses


def search_rows(text: str) -> list[dict[str, str]]:
    header, *lines = text.strip().splitlines()
    names = header.split()
    return [dict(zip(names, line.split(), strict=True)) for line in lines]


def test_image_text_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_photos(tmp_path / "photos")
    outputs = run_guide(ROOT / "docs" / "image_text.md", tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "data/pairs/summary.json").read_text())
    assert summary["fields"] == {"image": "jpg", "caption": "txt", "label": "cls"}
    assert summary["records"] == 160 and summary["skipped"]["reasons"] == {
        "missing_file": 1,
        "unreadable_file/bad_image": 1,
    }
    losses = training_losses(tmp_path / "runs/guides/image_text")
    assert losses[-1] < math.log(32) - 1.0 and losses[-1] < losses[0]  # chance: log(batch)
    exported = read_export(tmp_path / "emb/image_text")
    assert exported["rows"] == summary["splits"]["val"]
    rows = search_rows(output_of(outputs, "mmalign search"))
    assert len(rows) == 5 and sum(row["cls"] == "0" for row in rows) >= 4  # red


def test_audio_text_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_clips(tmp_path / "clips")
    outputs = run_guide(ROOT / "docs" / "audio_text.md", tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "data/clips/summary.json").read_text())
    assert summary["fields"] == {"audio": "wav", "caption": "txt", "label": "cls"}
    assert summary["records"] == 160 and summary["skipped"]["reasons"] == {"missing_file": 1}
    losses = training_losses(tmp_path / "runs/guides/audio_text")
    assert losses[-1] < math.log(32) - 1.0 and losses[-1] < losses[0]  # chance: log(batch)
    rows = search_rows(output_of(outputs, "mmalign search"))
    assert len(rows) == 5 and sum(row["cls"] == "1" for row in rows) >= 4  # a steady beep


def test_graph_text_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_graphs(tmp_path)
    outputs = run_guide(ROOT / "docs" / "graph_text.md", tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "data/graphs/summary.json").read_text())
    assert summary["records"] == 160
    assert summary["skipped"]["reasons"] == {"unreadable_file/bad_graph": 1}
    assert (tmp_path / "data/graphs/spm.model").is_file()
    losses = training_losses(tmp_path / "runs/guides/graph_text")
    assert losses[-1] < math.log(32) - 1.0 and losses[-1] < losses[0]  # chance: log(batch)
    rows = search_rows(output_of(outputs, "mmalign search"))
    assert len(rows) == 5 and sum(row["cls"] == "2" for row in rows) >= 4  # stars


def test_many_modalities_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labs = write_patients(tmp_path)
    outputs = run_guide(ROOT / "docs" / "many_modalities.md", tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "data/patients/summary.json").read_text())
    assert summary["fields"] == {"xray": "png", "condition": "cls"}
    assert summary["records"] == 240
    assert summary["per_modality"]["xray"] < 240  # missing x-rays are kept as absent
    run = tmp_path / "runs/guides/many_modalities"
    losses = training_losses(run)
    assert losses[-1] < losses[0] - 0.3 and losses[-1] < 2 * math.log(32)  # chance: log(B^2)
    model = AlignmentModel.from_pretrained(run / "model")
    train_keys = set()
    for record in iterate_records(str(tmp_path / "data/patients/train"), {"labs": "labs.npy"}):
        train_keys.add(record["__key__"])
    order = [i for i in range(len(labs)) if f"p{i:04d}" in train_keys]
    fitted = labs[order][~np.isnan(labs[order]).all(axis=1)][:100]
    np.testing.assert_allclose(model.towers["labs"].mean, np.nanmean(fitted, axis=0), rtol=1e-5)
    np.testing.assert_allclose(model.towers["labs"].std, np.nanstd(fitted, axis=0), rtol=1e-4)
    assert "labs: normalization statistics fit over 100 records" in (run / "train.log").read_text()
    assert "  steps: 60 (train.steps)" in output_of(outputs, "mmalign train")  # the plan
    rows = search_rows(output_of(outputs, "mmalign search"))
    # the query's labs are those of condition 1 (high glucose): its patients' x-rays come up
    assert len(rows) == 5 and sum(row["cls"] == "1" for row in rows) >= 4


def test_video_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_videos(tmp_path / "videos")
    outputs = run_guide(ROOT / "docs" / "video.md", tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "data/videos/summary.json").read_text())
    assert summary["fields"] == {"video": "mp4", "caption": "txt", "label": "cls"}
    assert summary["records"] == 96
    assert summary["skipped"]["reasons"] == {"unreadable_file/bad_video": 1}
    losses = training_losses(tmp_path / "runs/guides/video_text")
    assert losses[-1] < math.log(32) - 1.0 and losses[-1] < losses[0]  # chance: log(batch)
    rows = search_rows(output_of(outputs, "mmalign search emb/video_text --text"))
    assert len(rows) == 5 and sum(row["cls"] == "1" for row in rows) >= 4  # blue, down
    rows = search_rows(output_of(outputs, "mmalign search emb/video_text --query"))
    assert len(rows) == 5 and sum(row["cls"] == "1" for row in rows) >= 4  # 0001.mp4: label 1


def test_timeseries_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_recordings(tmp_path)
    outputs = run_guide(ROOT / "docs" / "timeseries.md", tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "data/ecg/summary.json").read_text())
    assert summary["fields"] == {"signal": "csv", "rhythm": "txt", "label": "cls"}
    assert summary["records"] == 160 and summary["skipped"]["reasons"] == {"missing_file": 1}
    run = tmp_path / "runs/guides/timeseries_text"
    assert "ecg: normalization statistics fit over 64 records" in (run / "train.log").read_text()
    losses = training_losses(run)  # chance: log(32); 4 captions: at best log(32 / 4)
    assert losses[-1] < math.log(32) - 0.7 and losses[-1] < losses[0]
    rows = search_rows(output_of(outputs, "mmalign search emb/ecg_text --text"))
    assert len(rows) == 5 and sum(row["cls"] == "1" for row in rows) >= 4  # fast rhythm
    rows = search_rows(output_of(outputs, "mmalign search emb/ecg_text --query"))
    assert len(rows) == 5 and sum(row["cls"] == "1" for row in rows) >= 4  # ecg/0001: label 1


def test_guide_configs_read_the_directories_prep_writes() -> None:
    guides = ["image_text", "audio_text", "graph_text", "many_modalities"]
    configs = {"video": "video_text", "timeseries": "timeseries_text"}
    for guide in [*guides, *configs]:
        commands = [shlex.split(c) for c in guide_commands(ROOT / "docs" / f"{guide}.md")]
        (prep,) = [c for c in commands if c[:3] == ["mmalign", "prep", "from-manifest"]]
        train = next(c for c in commands if c[:2] == ["mmalign", "train"])
        assert "--val-fraction" in prep and "--name" not in prep
        out = prep[prep.index("--out") + 1]
        config = load_config(ROOT / train[2])
        assert train[2] == f"configs/guides/{configs.get(guide, guide)}.yaml"
        assert (config.data.train, config.data.val) == (f"{out}/train", f"{out}/val")
        for command in commands[2:]:
            if "--data" in command:
                assert command[command.index("--data") + 1] == f"{out}/val"


def test_img2dataset_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = write_img2dataset(tmp_path / "laion")
    outputs = run_guide(ROOT / "docs" / "img2dataset.md", tmp_path, monkeypatch)
    losses = training_losses(tmp_path / "runs/guides/img2dataset")
    assert losses[-1] < math.log(32) - 1.0 and losses[-1] < losses[0]  # chance: log(batch)
    assert read_export(tmp_path / "emb/laion")["rows"] == 48  # the held-out shard
    rows = search_rows(output_of(outputs, "mmalign search"))
    assert len(rows) == 5 and sum(labels[row["key"]] == 0 for row in rows) >= 4  # red
