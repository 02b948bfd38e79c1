"""Data faults of the campaign (``run_faults.py``): hostile records and shards.

Each fault kind plants one bad record (at a seeded position among good ones) or one bad
shard, and reads it with the real loader: the record must be skipped and counted under the
expected reason while the good records are used, with the memory traced by ``tracemalloc``
staying far below what the bad record claims; a resampled stream with no usable record must
end with :class:`~mmalign.data.NoUsableData` after a bounded number of records.

Usage (also run by ``run_faults.py``)::

    .venv/bin/python tests/reliability/data_faults.py --repeats 3 --seed 0

Example:
    >>> sorted(DATA_FAULTS)[0]
    'FLAC decoding to 230 MB (20 min of silence, 180 KB)'
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from conftest import good_record, tiny_config, write_shard
from test_record_limits import AUDIO, silent_flac, sparse_member, tone_wav, wav_claiming

from mmalign.data import NoUsableData, make_loader
from mmalign.towers import build_tower

MIB = 2**20
GOOD = 12


def _tabular_towers(root: Path) -> dict[str, Any]:
    model = tiny_config(root, "")["model"]["towers"]
    return {name: build_tower(config) for name, config in model.items()}


def _audio_case(bad: Callable[[], bytes], extension: str) -> Callable[[Path, int], Any]:
    def case(root: Path, position: int) -> tuple[Any, str]:
        records = [{"__key__": f"good{i:03d}", "wav": tone_wav()} for i in range(GOOD)]
        records.insert(position, {"__key__": "bad", extension: bad()})
        shard = write_shard(root / "audio.tar", records)
        towers = {"audio": build_tower(AUDIO)}
        return make_loader(str(shard), towers, {"audio": "wav;flac"}, batch_size=4), "bad"

    return case


def _sparse_case(root: Path, position: int) -> tuple[Any, str]:
    shard = write_shard(root / "sparse.tar", [good_record(i) for i in range(GOOD)])
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    last = members[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    cut = members[3 * position].offset if position < GOOD else end
    bad = sparse_member("bad.npy", b"\x93NUMPY" + b"\0" * 500, 512 * MIB)
    bad += sparse_member("bad.graph.json", b"{}", 2)
    data = shard.read_bytes()
    shard.write_bytes(data[:cut] + bad + data[cut:])
    fields = {"labs": "npy", "graph": "graph.json"}
    return make_loader(str(shard), _tabular_towers(root), fields, 4), "bad"


def _stream_case(fields: dict[str, str], not_tar: bool) -> Callable[[Path, int], Any]:
    def case(root: Path, position: int) -> tuple[Any, str]:
        shard = root / "nottar.tar"
        if not_tar:
            shard.write_bytes(b"not a tar\n" * (position + 1))
        else:
            write_shard(shard, [good_record(i) for i in range(GOOD)])
        towers = _tabular_towers(root)
        loader = make_loader(
            str(shard), towers, fields, 4, resampled=True, shuffle_buffer=8,
            require_modalities=True,
        )  # fmt: skip
        return loader, ""

    return case


TABULAR = {"labs": "npy", "graph": "graph.json"}
DATA_FAULTS: dict[str, tuple[Callable[[Path, int], Any], str, int]] = {
    # fault: (case(root, position) -> (loader, bad key), expected counter or error, claimed MiB)
    "WAV header claims 2147483647 Hz": (
        _audio_case(lambda: wav_claiming(2147483647), "wav"),
        "skipped/bad_sample_rate",
        320 * 1024,
    ),
    "WAV header claims 1,000,003 Hz": (
        _audio_case(lambda: wav_claiming(1000003), "wav"),
        "skipped/bad_sample_rate",
        900,
    ),
    "FLAC decoding to 230 MB (20 min of silence, 180 KB)": (
        _audio_case(lambda: silent_flac(1200), "flac"),
        "skipped/too_long",
        220,
    ),
    "tar with a GNU-sparse member claiming 512 MiB": (
        _sparse_case,
        "skipped/member_too_large",
        512,
    ),
    "resampled stream, one non-tar shard": (
        _stream_case(TABULAR, not_tar=True),
        "NoUsableData",
        0,
    ),
    "resampled stream, data.fields typo (labs: npz)": (
        _stream_case({**TABULAR, "labs": "npz"}, not_tar=False),
        "NoUsableData",
        0,
    ),
}


@dataclass
class DataTally:
    """Outcomes of one data fault kind."""

    runs: int = 0
    handled: int = 0
    """Runs where the bad record was skipped under the expected reason and the good ones
    used (or the stream ended with NoUsableData)."""
    peak_mib: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read(loader: Any, expected: str, bad: str) -> bool:
    if expected == "NoUsableData":
        try:
            for _ in loader:
                pass
        except NoUsableData:
            return loader.counters["seen"] <= 200
        return False
    keys = [key for batch in loader for key in batch.keys]
    return bad not in keys and len(keys) == GOOD and loader.counters.get(expected) == 1


def data_campaign(root: Path, repeats: int, seed: int) -> dict[str, DataTally]:
    tallies = {}
    for number, (name, (case, expected, _)) in enumerate(DATA_FAULTS.items()):
        tally = tallies[name] = DataTally()
        rng = random.Random(f"{seed}-{name}")
        for repeat in range(repeats):
            directory = root / f"data-{number}-{repeat}"
            directory.mkdir(parents=True)
            loader, bad = case(directory, rng.randint(0, GOOD))
            began = time.monotonic()
            tracemalloc.start()
            try:
                ok = _read(loader, expected, bad)
            except Exception as error:  # a crash is a failed run, reported below
                ok = False
                tally.notes.append(f"{type(error).__name__}: {error}"[:200])
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            tally.runs += 1
            tally.handled += ok
            tally.peak_mib.append(peak / MIB)
            tally.seconds.append(time.monotonic() - began)
    return tallies


def data_table(tallies: dict[str, DataTally]) -> str:
    lines = [
        "### Hostile records and shards (real loader, seeded position among 12 good records)",
        "",
        "| fault | runs | what it claims | expected | handled | peak traced memory | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, tally in tallies.items():
        _, expected, claimed = DATA_FAULTS[name]
        claim = f"{claimed} MiB" if claimed else "endless stream"
        lines.append(
            f"| {name} | {tally.runs} | {claim} | `{expected}` | {tally.handled}/{tally.runs} | "
            f"max {max(tally.peak_mib):.1f} MiB | max {max(tally.seconds):.2f} s |"
        )
        lines += [f"|  failed: `{note}` | | | | | | |" for note in tally.notes]
    return "\n".join(lines)


def data_failures(tallies: dict[str, DataTally]) -> int:
    return sum(tally.runs - tally.handled for tally in tallies.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per fault kind")
    parser.add_argument("--seed", type=int, default=0, help="seeds the bad record's position")
    options = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mmalign-data-faults-"))
    began = time.monotonic()
    try:
        tallies = data_campaign(root, options.repeats, options.seed)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(data_table(tallies))
    print(f"\n{time.monotonic() - began:.0f} s in all")
    return 1 if data_failures(tallies) else 0


if __name__ == "__main__":
    raise SystemExit(main())
