"""The demo pipeline at a tiny scale: data, four trainings, evaluation, search, REPORT.md."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmalign.data.records import iterate_records
from mmalign.demo.data import make_demo
from mmalign.demo.pipeline import (
    PRETRAINED_TOWERS,
    QUICK_OVERRIDES,
    default_configs_dir,
    run_demo,
    train_run,
)
from mmalign.demo.results import reference_images, similarity_rows
from mmalign.errors import UserError
from mmalign.eval.zeroshot import load_classes
from mmalign.model import AlignmentModel

NUMBER = re.compile(r"^-?\d+(\.\d+)?%?$")


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header and separator rows left out)."""
    tables, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append([row for row in current[2:]])
            current = []
    return tables


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("demo")
    report = run_demo(root / "data", root / "out", quick=True, threads=1)
    return root, report, report.read_text()


@pytest.mark.launches  # the demo's data loaders start worker processes
def test_report_is_written_in_out_dir(demo: tuple[Path, Path, str]) -> None:
    root, report, _ = demo
    assert report == root / "out" / "REPORT.md"
    for dataset in ("digits", "digits-sum"):
        assert (root / "data" / dataset / "classes.json").is_file()
    for run in ("digits", "digits-motion", "digits-sum-symile", "digits-sum-clip"):
        assert (root / "out" / run / "model" / "model.safetensors").is_file()
    assert (root / "out" / "digits" / PRETRAINED_TOWERS / "open_clip_config.json").is_file()
    assert "start their image and text towers from the digits model" in demo[2]
    motion = AlignmentModel.from_pretrained(root / "out" / "digits-motion" / "model")
    six = ["image", "text", "audio", "graph", "video", "trajectory"]
    assert motion.modalities == six  # one model of every modality of the digits records
    assert f"## digits-motion: {', '.join(six)} (" in demo[2]


@pytest.mark.launches  # the demo's data loaders start worker processes
def test_every_linked_file_exists(demo: tuple[Path, Path, str]) -> None:
    _, report, text = demo
    links = re.findall(r"\]\(([^)]+)\)", text)
    names = {Path(link).name for link in links}
    assert {"loss.png", "confusion_zeroshot_en.png", "similarity_image_text.png"} <= names
    assert any(name.endswith(".wav") for name in names)
    for link in links:
        assert not Path(link).is_absolute(), link
        assert (report.parent / link).is_file(), link


@pytest.mark.launches  # the demo's data loaders start worker processes
def test_tables_hold_numbers(demo: tuple[Path, Path, str]) -> None:
    tables = _tables(demo[2])
    targets, training, zeroshot, retrieval, motion_zeroshot, motion_retrieval, *rest = tables
    digits_sum, *searches, timings = rest
    assert len(targets) == 7 and len(training) == 4 and len(digits_sum) == 2
    for row in targets:
        assert NUMBER.match(row[1]) and 0.0 <= float(row[1].rstrip("%")) <= 100.0
        assert row[3] in ("yes", "no")
    assert [row[3] for row in training] == [str(QUICK_OVERRIDES["train.steps"])] * 4
    assert [row[0] for row in zeroshot] == ["en", "fr", "de", "es"]
    assert [row[0] for row in retrieval][:2] == ["audio->image", "graph->text"]
    assert [row[0] for row in motion_zeroshot] == ["image", "graph", "video", "trajectory"]
    assert [row[0] for row in motion_retrieval] == [
        *("audio->video", "audio->image", "video->image"),
        *("graph->text", "video->text", "trajectory->text"),
    ]
    assert [row[0] for row in digits_sum] == ["symile", "clip"]
    assert digits_sum[0][1].startswith("MIP") and digits_sum[1][1].startswith("sum")
    assert len(searches) == 2 and all(len(rows) == 5 for rows in searches)
    for table in (zeroshot, retrieval, motion_zeroshot, motion_retrieval, digits_sum, timings):
        for row in table:
            assert sum(bool(NUMBER.match(cell)) for cell in row) >= 2, row
    total = float(timings[-1][1])
    assert total == pytest.approx(
        sum(float(row[1]) for row in timings[:-1]), abs=0.1 * len(timings)
    )


def test_similarity_rows_group_by_class() -> None:
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 0])
    rows = similarity_rows(labels, per_class=2)
    assert rows.tolist() == [1, 4, 3, 0, 2]
    assert labels[rows].tolist() == [0, 0, 1, 2, 2]


@pytest.mark.launches  # the demo's data loaders start worker processes
def test_reference_images_need_every_class(demo: tuple[Path, Path, str]) -> None:
    root = demo[0]
    shards = [str(root / "data" / "digits" / "test-000000.tar")]
    with pytest.raises(ValueError, match=r"no training image of class\(es\) \[10, 11\]"):
        reference_images(shards, per_class=1, classes=12)
    found = reference_images(shards, per_class=1)
    assert [len(images) for images in found] == [1] * 10


@pytest.mark.launches  # the demo's data loaders start worker processes
def test_matryoshka_line_is_the_16_dim_prefix(demo: tuple[Path, Path, str]) -> None:
    """The report's zero-shot figure at 16 dims equals a float64 classification from the
    first 16 coordinates of full-size embeddings, renormalized, computed here."""
    root, _, text = demo
    line = next(line for line in text.splitlines() if line.startswith("Matryoshka"))
    assert "`model.matryoshka: [16, 32, 64]`): the first 16 of 64 dimensions" in line
    reported = float(re.search(r"zero-shot top-1 \(English\) ([\d.]+)%", line).group(1))
    model = AlignmentModel.from_pretrained(root / "out" / "digits" / "model").eval()
    digits = root / "data" / "digits"
    records = list(iterate_records(str(digits / "test-000000.tar"), {"image": "png", "cls": "cls"}))
    _, prompts = load_classes(digits / "classes.json", "en")

    def prefix(vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors.double()[:, :16], dim=-1)

    with torch.no_grad():
        images = prefix(model.encode("image", [record["image"] for record in records]))
        classes = torch.stack(
            [prefix(model.encode("text", texts)).mean(dim=0) for texts in prompts]
        )
    predicted = (images @ F.normalize(classes, dim=-1).T).argmax(dim=1)
    labels = torch.tensor([int(record["cls"]) for record in records])
    assert reported == pytest.approx(100 * (predicted == labels).double().mean().item(), abs=0.05)


@pytest.mark.launches  # the demo's data loaders start worker processes
def test_the_demo_never_deletes_a_folder_it_did_not_write(
    demo: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """``prep make-demo --out`` and ``mmalign demo --out`` replace their own dataset and run
    folders by name (``OUT/digits``): a folder of the user's of that name was deleted."""
    root = demo[0]
    for folder in (tmp_path / "data" / "digits", tmp_path / "out" / "digits"):
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"digits holds files that prep make-demo did not write"):
        make_demo(tmp_path / "data", variants=1, limit=2, progress=False)
    with pytest.raises(UserError, match=r"digits holds files that train did not write"):
        train_run(
            "digits",
            default_configs_dir(),
            root / "data" / "digits",
            tmp_path / "out",
            quick=True,
            reuse=False,
        )
    for folder in (tmp_path / "data" / "digits", tmp_path / "out" / "digits"):
        assert [path.name for path in folder.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "data" / "digits-sum").exists()  # refused before any building
