"""mmalign.demo.data and mmalign.prep: the demo datasets, manifest conversion, tokenizers."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece
import soundfile
from PIL import Image
from scipy.stats import chi2_contingency
from sklearn.datasets import load_digits

from mmalign.cli.main import main
from mmalign.cli.prep.from_manifest import field_map
from mmalign.data import iterate_records, make_loader
from mmalign.demo.digits import DIGIT_WORDS, TEMPLATES, dtmf_clip
from mmalign.prep import from_manifest
from mmalign.towers import build_tower
from tests.data.test_loader import EchoTower

ROW_FREQUENCIES = [697, 770, 852, 941]
COLUMN_FREQUENCIES = [1209, 1336, 1477]
KEYPAD = ["123", "456", "789", " 0 "]
# The standard seven-segment encoding, bit i = segment "abcdefg"[i].
SEVEN_SEGMENT_CODES = [0x3F, 0x06, 0x5B, 0x4F, 0x66, 0x6D, 0x7D, 0x07, 0x7F, 0x6F]
# Segment of each pair of corners, corners named by (column, row) on a 2 x 3 grid.
SEGMENT_OF_CORNERS = {
    frozenset({(0, 2), (1, 2)}): "a",
    frozenset({(1, 2), (1, 1)}): "b",
    frozenset({(1, 1), (1, 0)}): "c",
    frozenset({(0, 0), (1, 0)}): "d",
    frozenset({(0, 1), (0, 0)}): "e",
    frozenset({(0, 2), (0, 1)}): "f",
    frozenset({(0, 1), (1, 1)}): "g",
}
ALL_FIELDS = {
    "image": "png",
    "text": "txt",
    "audio": "flac",
    "graph": "graph.json",
    "label": "cls",
    "meta": "json",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["prep", "make-demo", "--out", str(out), "--variants", "1", "--limit", "600"]) == 0
    return out


def records(directory: Path, split: str) -> list[dict[str, Any]]:
    shards = sorted(str(path) for path in directory.glob(f"{split}-*.tar"))
    return list(iterate_records(shards, ALL_FIELDS))


def two_strongest_peaks(waveform: np.ndarray, rate: int) -> list[float]:
    """Frequencies of the two strongest spectral peaks at least 50 Hz apart."""
    size = 2**15  # zero padding: 0.49 Hz bins at 16 kHz
    spectrum = np.abs(np.fft.rfft(waveform, n=size))
    frequencies = np.fft.rfftfreq(size, 1 / rate)
    first = frequencies[np.argmax(spectrum)]
    spectrum[np.abs(frequencies - first) < 50] = 0
    return sorted([first, frequencies[np.argmax(spectrum)]])


def dtmf_digit(waveform: np.ndarray, rate: int) -> int:
    low, high = two_strongest_peaks(waveform, rate)
    row = int(np.argmin([abs(low - f) for f in ROW_FREQUENCIES]))
    column = int(np.argmin([abs(high - f) for f in COLUMN_FREQUENCIES]))
    assert abs(low - ROW_FREQUENCIES[row]) < 3 and abs(high - COLUMN_FREQUENCIES[column]) < 3
    return int(KEYPAD[row][column])


def caption_digit(text: str, language: str) -> int:
    matches = {
        digit
        for template in TEMPLATES[language]
        for digit, word in enumerate(DIGIT_WORDS[language])
        if template.format(word) == text
    }
    assert len(matches) == 1, (text, language)
    return matches.pop()


def seven_segment_digit(graph: dict[str, np.ndarray]) -> int:
    corners = [tuple(int(v) for v in np.round(point)) for point in graph["x"]]
    assert np.abs(graph["x"] - np.round(graph["x"])).max() < 0.3
    sources, targets = graph["edge_index"]
    assert sorted(zip(sources, targets)) == sorted(zip(targets, sources))  # both directions
    lit = {
        SEGMENT_OF_CORNERS[frozenset({corners[s], corners[t]})] for s, t in zip(sources, targets)
    }
    code = sum(1 << "abcdefg".index(segment) for segment in lit)
    return SEVEN_SEGMENT_CODES.index(code)


@pytest.mark.launches  # the demo data builder runs a process pool
def test_demo_layout_cards_classes_and_skipping(demo: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("digits", "digits-sum"):
        directory = demo / name
        assert [p.name for p in sorted(directory.glob("train-*.tar"))] == [
            f"train-{i:06d}.tar" for i in range(8)
        ]
        assert (directory / "val-000000.tar").is_file() and (
            directory / "test-000000.tar"
        ).is_file()
        classes = json.loads((directory / "classes.json").read_text(encoding="utf-8"))
        assert (
            classes["classnames"]["fr"][7] == "sept" and classes["classnames"]["en"][7] == "seven"
        )
        assert (
            classes["classnames"]["de"][7] == "sieben" and classes["classnames"]["es"][7] == "siete"
        )
        assert "a handwritten {}" in classes["templates"]["en"]
        card = (directory / "README.md").read_text(encoding="utf-8")
        assert "train-{000000..000007}.tar" in card and "classes.json" in card
    before = {path: path.stat().st_mtime_ns for path in demo.rglob("*.tar")}
    capsys.readouterr()
    assert main(["prep", "make-demo", "--out", str(demo), "--variants", "1", "--limit", "600"]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 2
    assert before == {path: path.stat().st_mtime_ns for path in demo.rglob("*.tar")}


@pytest.mark.launches  # the demo data builder runs a process pool
def test_demo_rewrites_with_force_or_new_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    arguments = ["--out", str(tmp_path), "--variants", "1", "--limit", "10"]
    main(["prep", "make-demo", *arguments])
    capsys.readouterr()
    main(["prep", "make-demo", *arguments, "--force"])
    assert capsys.readouterr().out.count("records in") == 2
    main(["prep", "make-demo", *arguments[:-1], "12"])
    assert capsys.readouterr().out.count("records in") == 2
    summary = json.loads((tmp_path / "digits" / "summary.json").read_text())
    assert summary["splits"]["train"]["records"] == 12


@pytest.mark.launches  # the demo data builder runs a process pool
def test_digits_every_modality_agrees_with_the_label(demo: Path) -> None:
    sources = load_digits().target
    used_sources = {}
    for split in ("train", "val", "test"):
        split_records = records(demo / "digits", split)
        assert len(split_records) == {"train": 600, "val": 180, "test": 360}[split]
        for record in split_records:
            digit = record["label"]
            assert record["meta"]["digit"] == digit == sources[record["meta"]["source_index"]]
            assert caption_digit(record["text"], record["meta"]["language"]) == digit
            assert dtmf_digit(*record["audio"]) == digit
            assert seven_segment_digit(record["graph"]) == digit
            assert record["image"].size == (32, 32) and np.asarray(record["image"]).max() > 100
        used_sources[split] = {record["meta"]["source_index"] for record in split_records}
        languages = {record["meta"]["language"] for record in split_records}
        assert languages == {"en", "fr", "de", "es"}
    assert used_sources["train"].isdisjoint(used_sources["val"] | used_sources["test"])
    assert used_sources["val"].isdisjoint(used_sources["test"])


@pytest.mark.launches  # the demo data builder runs a process pool
def test_digits_sum_pairs_are_independent_and_the_triple_determines_the_image(demo: Path) -> None:
    sources = load_digits().target
    triples = []
    for record in records(demo / "digits-sum", "train"):
        a = caption_digit(record["text"], record["meta"]["language"])
        b = dtmf_digit(*record["audio"])
        image_class = record["label"]
        assert sources[record["meta"]["source_index"]] == image_class
        assert (record["meta"]["a"], record["meta"]["b"]) == (a, b)
        triples.append((a, b, image_class))
    triples = np.array(triples)
    assert len(triples) == 600
    assert np.all((triples[:, 0] + triples[:, 1]) % 10 == triples[:, 2])
    for first, second in [(0, 1), (0, 2), (1, 2)]:
        table = np.zeros((10, 10))
        np.add.at(table, (triples[:, first], triples[:, second]), 1)
        assert chi2_contingency(table).pvalue > 0.01, (first, second)
    # the test has power: the image class is far from independent of (a + b) mod 10
    table = np.zeros((10, 10))
    np.add.at(table, ((triples[:, 0] + triples[:, 1]) % 10, triples[:, 2]), 1)
    assert chi2_contingency(table).pvalue < 1e-10


def test_dtmf_tone_has_the_two_keypad_frequencies() -> None:
    rng = np.random.default_rng(3)
    for digit in range(10):
        waveform = dtmf_clip(digit, rng)
        assert 0.25 * 16000 <= len(waveform) <= 0.7 * 16000
        assert dtmf_digit(waveform, 16000) == digit


@pytest.mark.launches  # the demo data builder runs a process pool
def test_demo_batches_through_real_towers(demo: Path, tmp_path: Path) -> None:
    model = tmp_path / "spm.model"
    shards = [str(demo / "digits" / "val-000000.tar")]
    arguments = ["--shards", *shards, "--out", str(model), "--vocab-size", "200"]
    assert main(["prep", "train-tokenizer", *arguments]) == 0
    towers = {
        "image": build_tower(
            {
                "type": "image",
                "embed_dim": 8,
                "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1},
            }
        ),
        "text": build_tower(
            {
                "type": "text",
                "tokenizer": str(model),
                "width": 16,
                "heads": 2,
                "layers": 1,
                "context_length": 12,
            }
        ),
        "audio": build_tower({"type": "audio", "n_mels": 16, "clip_seconds": 0.7}),
        "graph": build_tower({"type": "graph", "in_features": 2, "hidden": 8, "layers": 1}),
    }
    loader = make_loader(
        shards, towers, ALL_FIELDS, 16, label_field="cls", metadata_fields=["json"]
    )
    batch = next(iter(loader))
    assert batch.present.shape == (16, 4) and batch.present.all()
    assert batch.inputs["image"].shape == (16, 3, 32, 32)
    assert batch.inputs["graph"].num_graphs == 16
    assert batch.labels.tolist() == [meta["digit"] for meta in batch.metadata["json"]]
    for name, tower in towers.items():
        assert tower(batch.inputs[name]).shape[0] == 16


def write_manifest_files(directory: Path) -> list[dict[str, Any]]:
    """Files plus rows (good ones first), with the values each good row must give back."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(5):
        pixels = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"img{index}.png")
        waveform = rng.uniform(-1, 1, 300).astype(np.float32)
        soundfile.write(directory / f"clip{index}.wav", waveform, 8000, subtype="FLOAT")
        rows.append(
            {
                "key": f"item{index}",
                "image": f"img{index}.png",
                "text": f"caption number {index}, with a comma",
                "audio": f"clip{index}.wav",
                "graph": {"x": [[index, 0.5], [1.0, 2.0]], "edge_index": [[0], [1]]},
                "vec": [index, 0.25, -1.5],
                "label": index,
                "expect": {"pixels": pixels, "waveform": waveform},
            }
        )
    rows[3]["audio"] = ""  # a missing modality, kept
    rows[4]["image"] = ""
    (directory / "broken.png").write_bytes(b"not an image")
    rows += [
        {"key": "gone", "image": "nowhere.png", "text": "t", "label": 1},
        {"key": "broken", "image": "broken.png", "text": "t", "label": 1},
        {"key": "badlabel", "text": "t", "label": "seven"},
        {"key": "item0", "text": "duplicate key"},
        {"key": "blank"},
    ]
    return rows


def save_manifest(rows: list[dict[str, Any]], path: Path) -> None:
    columns = ["key", "image", "text", "audio", "graph", "vec", "label"]
    cleaned = [{column: row.get(column, "") for column in columns} for row in rows]
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row) for row in cleaned) + "\n")
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in cleaned:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()}
            )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_to_shards_to_batches_gives_back_the_manifest(tmp_path: Path, suffix: str) -> None:
    rows = write_manifest_files(tmp_path)
    manifest = tmp_path / f"manifest{suffix}"
    save_manifest(rows, manifest)
    out = tmp_path / "shards"
    fields = "image=png,text=txt,audio=wav,graph=graph.json,vec=npy,label=cls"
    arguments = [str(manifest), "--out", str(out), "--fields", fields, "--maxcount", "2"]
    assert main(["prep", "from-manifest", *arguments]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 5 and summary["shards"] == [f"data-{i:06d}.tar" for i in range(3)]
    assert summary["per_modality"] == {
        "image": 4,
        "text": 5,
        "audio": 4,
        "graph": 5,
        "vec": 5,
        "label": 5,
    }
    assert summary["skipped"]["rows"] == 5
    assert summary["skipped"]["reasons"] == {
        "missing_file": 1,
        "unreadable_file/bad_image": 1,
        "bad_value/cls": 1,
        "duplicate_key": 1,
        "empty_row": 1,
    }
    assert [example["key"] for example in summary["skipped"]["examples"]] == [
        "gone",
        "broken",
        "badlabel",
        "item0",
        "blank",
    ]

    extensions = {
        "image": "png",
        "text": "txt",
        "audio": "wav",
        "graph": "graph.json",
        "vec": "npy",
    }
    names = list(extensions)
    towers = {name: EchoTower() for name in names}
    loader = make_loader(str(out), towers, extensions, batch_size=2, label_field="cls")
    batches = list(loader)
    keys = [key for batch in batches for key in batch.keys]
    assert keys == [f"item{i}" for i in range(5)]
    values: dict[str, dict[str, Any]] = {}
    for batch in batches:
        for name in names:
            present_keys = [k for k, p in zip(batch.keys, batch.present_of(name)) if p]
            for key, (value, _) in zip(present_keys, batch.inputs[name] or []):
                values.setdefault(key, {})[name] = value
        for key, label in zip(batch.keys, batch.labels.tolist()):
            values[key]["label"] = label
    for row in rows[:5]:
        got = values[row["key"]]
        assert set(got) == {"label", *(n for n in names if row[n] != "")}
        assert got["text"] == row["text"] and got["label"] == row["label"]
        assert got["vec"].dtype == np.float32 and got["vec"].tolist() == row["vec"]
        assert got["graph"]["x"].tolist() == row["graph"]["x"]
        assert got["graph"]["edge_index"].tolist() == row["graph"]["edge_index"]
        if "image" in got:
            assert np.array_equal(np.asarray(got["image"]), row["expect"]["pixels"])
        if "audio" in got:
            waveform, rate = got["audio"]
            assert rate == 8000 and np.array_equal(waveform, row["expect"]["waveform"])


def test_train_tokenizer_from_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "long.txt").write_text("un texte lu dans un fichier\n", encoding="utf-8")
    sentences = [f"{word} number {i}" for i, word in enumerate(["alpha", "beta", "gamma"] * 20)]
    rows = [{"caption": text} for text in sentences] + [{"caption": "long.txt"}, {"caption": ""}]
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows))
    model = tmp_path / "out" / "spm.model"
    arguments = ["--manifest", str(manifest), "--field", "caption", "--out", str(model)]
    assert main(["prep", "train-tokenizer", *arguments, "--vocab-size", "60"]) == 0
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    assert processor.vocab_size() <= 60
    assert (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id()) == (
        0,
        1,
        2,
        3,
    )
    for text in (sentences[5], "un texte lu dans un fichier"):
        assert processor.decode(processor.encode(text)) == text
    assert processor.unk_id() not in processor.encode("un texte lu dans un fichier")


def test_manifest_errors_name_the_problem(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("key,text\na,hello\n")
    with pytest.raises(ValueError, match=r"columns \['image'\] .*not in the manifest"):
        from_manifest.convert(manifest, tmp_path / "o", {"image": "png", "text": "txt"})
    with pytest.raises(argparse.ArgumentTypeError, match="column=extension"):
        field_map("image")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the progress bar draws into it."""

    def isatty(self) -> bool:
        return True


def test_train_tokenizer_shows_progress_on_a_terminal_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sentences read (count and rate), then the training phase, on stderr; a few
    redraws (tqdm's interval), not one line per sentence; nothing when stderr is a file."""
    rows = 5000
    manifest = tmp_path / "pairs.jsonl"
    words = ["seven", "three", "a", "digit", "handwritten", "blue", "eight", "small"]
    lines = [
        json.dumps({"caption": " ".join(words[(i + j) % 8] for j in range(1 + i % 6))})
        for i in range(rows)
    ]
    manifest.write_text("\n".join(lines) + "\n")
    arguments = ["--manifest", str(manifest), "--field", "caption", "--vocab-size", "40"]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["prep", "train-tokenizer", *arguments, "--out", str(tmp_path / "a.model")]) == 0
    shown = terminal.getvalue()
    assert f"{rows}sentence" in shown.replace(" ", "") and "sentence/s" in shown, shown
    assert f"train SentencePiece on the {rows} sentences" in shown, shown
    assert shown.count("\r") < 60 and len(shown) < 8000, len(shown)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert main(["prep", "train-tokenizer", *arguments, "--out", str(tmp_path / "b.model")]) == 0
    assert sys.stderr.getvalue() == ""
    assert f"({rows} sentences)" in capsys.readouterr().out


def test_a_failed_tokenizer_training_is_one_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Texts SentencePiece cannot train on (all empty) end in the one-line error form, exit 2,
    and leave no model behind."""
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text('{"caption": ""}\n{"caption": ""}\n')
    model = tmp_path / "spm.model"
    arguments = ["--manifest", str(manifest), "--field", "caption", "--out", str(model)]
    assert main(["prep", "train-tokenizer", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert re.fullmatch(
        r"mmalign: error: SentencePiece could not train on the 'caption' texts: .+ \(--field\); "
        r"check that --field names non-empty texts, or pass a smaller --vocab-size\n",
        error,
    )
    assert not model.exists()
