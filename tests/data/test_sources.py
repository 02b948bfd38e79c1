"""Weighted sources of ``data.train``: drawn by weight, interleaved by weight, counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.config import ConfigError, load_config
from mmalign.data import loader_from_config
from mmalign.data.sources import count_records, interleave, resolve_sources
from mmalign.model import AlignmentModel
from mmalign.training import train
from mmalign.training.plan import describe_plan
from mmalign.training.sample_keys import read_sample_keys
from tests.train_support import metrics, tiny_config, write_shards


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    directory = tmp_path_factory.mktemp("sources")
    return [
        {"shards": write_shards(directory, "a", 3, 20, seed=1), "weight": 1, "name": "web"},
        {"shards": write_shards(directory, "b", 1, 30, seed=2), "weight": 3, "name": "books"},
    ]


def test_resampled_sources_are_drawn_by_weight(tmp_path: Path, two_sources: list[dict]) -> None:
    out = tmp_path / "run"
    config = tiny_config(
        out,
        two_sources,  # type: ignore[arg-type]
        data={"resampled": True, "shuffle_buffer": 0, "batch_size": 100},
        train={"steps": 40, "log_sample_keys": True, "log_every": 40},
    )
    train(config)
    keys = [key for record in read_sample_keys(out)[0] for key in record["keys"]]
    assert len(keys) == 4000
    share = sum(key.startswith("a") for key in keys) / len(keys)
    assert share == pytest.approx(0.25, abs=0.03)
    last = metrics(out)[-1]
    assert last["data/web/used"] + last["data/books/used"] == last["data/used"] == 4000
    assert last["data/web/used"] == sum(key.startswith("a") for key in keys)


def test_finite_epoch_interleaves_by_weight_and_reads_what_the_plan_says(
    tmp_path: Path, two_sources: list[dict]
) -> None:
    config = load_config(
        tiny_config(
            tmp_path / "run",
            two_sources,
            data={"batch_size": 5, "shuffle_buffer": 0},  # type: ignore[arg-type]
        )
    )
    plan = describe_plan(config, processes=1, device="cpu")
    assert "source web: 3 shards, weight 1 (25.0%) of the interleaving; 60 records" in plan
    assert "source books: 1 shards, weight 3 (75.0%) of the interleaving; 30 records" in plan

    model = AlignmentModel(config.model)
    loader = loader_from_config(config.data, model.towers, "train", rank=0, world_size=1)
    keys = [key for batch in loader for key in batch.keys]
    counters = loader.counters
    assert counters["web/seen"] == counters["web/used"] == 60
    assert counters["books/seen"] == counters["books/used"] == 30
    # while both last, three "books" records go with each "web" record, then web goes on
    assert "".join(key[0] for key in keys[:8]) == "bbabbbab"
    assert "".join(key[0] for key in keys[:40]).count("a") == 10
    assert {key[0] for key in keys[40:]} == {"a"}


def test_interleave_reads_every_item_once() -> None:
    items = list(interleave([iter(range(5)), iter("xyz"), iter([])], [2.0, 1.0, 1.0]))
    assert sorted(map(str, items)) == sorted(map(str, [*range(5), *"xyz"]))
    assert items[:4] == [0, 1, "x", 2]


def test_plain_forms_are_one_unnamed_source(two_sources: list[dict]) -> None:
    (source,) = resolve_sources(two_sources[0]["shards"], "data.train")
    assert not source.named and len(source.urls) == 3 and count_records(source.urls) == 60
    named = resolve_sources(
        [{"shards": two_sources[0]["shards"]}, {"shards": two_sources[1]["shards"], "weight": 2}]
    )
    assert [(s.name, s.weight, len(s.urls)) for s in named] == [
        ("source0", 1.0, 3),
        ("source1", 2.0, 1),
    ]


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([{"shards": "a.tar", "name": "x"}, {"shards": "b.tar", "name": "x"}], "names must differ"),
        ([{"shards": "a.tar", "name": "used"}], "none of seen, used"),
        ([{"shards": "a.tar", "weight": 0}], "greater than 0"),
        ([{"shards": "a.tar", "wieght": 2}], "wieght"),
    ],
)
def test_bad_sources_are_config_errors(tmp_path: Path, sources: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config(tiny_config(tmp_path, sources))  # type: ignore[arg-type]
    assert "data.train" in str(error.value)
