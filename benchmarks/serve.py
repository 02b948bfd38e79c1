"""Serving benchmark: ``mmalign serve`` under a bounded load on loopback.

1. The demo export: the digits (image, caption, DTMF tone; ``--rows`` records rendered as
   ``mmalign prep make-demo`` does) embedded by the model of ``configs/guides/serving.yaml``
   (random init: speed does not depend on training), items kept, a flat index per modality.
   ``mmalign serve`` runs in its own process; ``--clients`` concurrent clients (asyncio +
   httpx, one process) send ``--requests`` text queries to ``/search`` (target image,
   k=10): requests/s, p50/p99 latency, errors, and the server's resident memory after the
   warm-up and at the end (the model and index are loaded once: flat). Reference: the same
   queries answered in one process by ``mmalign.export.search.query_vector`` and the loaded
   index, one after another (no HTTP, no batching).
2. A ViT-B-32-sized text tower (open_clip's text transformer: width 512, 8 heads, 12
   layers, 77 tokens, random init) over an export of captions: the same load at
   ``--clients`` clients with dynamic batching (``--max-batch 32``) and with one request per
   forward (``--max-batch 1``), in the same run.

Run (CPU; a few minutes on 2 cores):

    .venv/bin/python benchmarks/serve.py --requests 2000 --clients 16 --big-requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch
import webdataset as wds
import yaml

from mmalign.demo.digits import (
    DIGIT_WORDS,
    caption,
    dtmf_clip,
    flac_bytes,
    load_sources,
    render_digit,
)
from mmalign.export import load_index, run_export
from mmalign.export.search import query_vector
from mmalign.model import AlignmentModel

ROOT = Path(__file__).parents[1]
BIG_TEXT = {
    "dim": 512,
    "towers": {
        "text": {"type": "text", "width": 512, "heads": 8, "layers": 12, "context_length": 77}
    },
}
"""A text tower the size of open_clip ViT-B-32's (about 38M parameters)."""


def write_digits(path: Path, rows: int) -> str:
    """``rows`` demo records (png, txt, flac, cls) in one shard."""
    import io

    from PIL import Image

    images, labels = load_sources()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path), mtime=0) as writer:
        for index in range(rows):
            digit = int(labels[index])
            buffer = io.BytesIO()
            Image.fromarray(render_digit(images[index], rng)).save(buffer, format="PNG")
            writer.write(
                {
                    "__key__": f"digit{index:05d}",
                    "png": buffer.getvalue(),
                    "txt": caption(digit, rng)[0],
                    "flac": flac_bytes(dtmf_clip(digit, rng)),
                    "cls": digit,
                }
            )
    return str(path)


def make_export(root: Path, model_config: dict, fields: dict[str, str], rows: int) -> Path:
    torch.manual_seed(0)
    model_dir = AlignmentModel.from_config(model_config).save_pretrained(root / "model")
    shard = write_digits(root / "digits-000000.tar", rows)
    out = root / "emb"
    run_export(
        str(model_dir),
        shard,
        list(fields),
        out,
        index="flat",
        items=list(fields),
        fields=fields,
        metadata_fields=["cls"],
        progress=False,
    )
    return out


def queries(count: int) -> list[str]:
    rng = random.Random(0)
    words = DIGIT_WORDS["en"]
    templates = ["the digit {}", "a handwritten {}", "{}", "the number {} written by hand"]
    return [rng.choice(templates).format(rng.choice(words)) for _ in range(count)]


def percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def start_server(export: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "mmalign", "serve", str(export), "--port", "0"]
    command += ["--max-batch", str(max_batch), "--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("mmalign serve: http"):
        raise RuntimeError(f"the server did not start: {line}")
    return process, line.split()[2].rstrip("/")


def rss_mib(process: subprocess.Popen) -> float:
    return psutil.Process(process.pid).memory_info().rss / 2**20


def cpu_s(process: subprocess.Popen) -> float:
    """CPU seconds (user + system) the process has used."""
    times = psutil.Process(process.pid).cpu_times()
    return times.user + times.system


async def load(url: str, texts: list[str], clients: int, target: str) -> dict[str, Any]:
    """Send every text to ``/search`` from ``clients`` concurrent clients."""
    latencies: list[float] = []
    errors = 0
    pending = list(enumerate(texts))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while pending:
            _, text = pending.pop()
            body = {"query": {"text": text}, "target": target, "k": 10}
            started = time.perf_counter()
            try:
                answer = await http.post(f"{url}/search", json=body)
                ok = answer.status_code == 200 and len(answer.json()["results"]) == 10
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "requests": len(texts),
        "errors": errors,
        "rps": len(texts) / wall,
        **percentiles(latencies),
        "client_cpu_s": cpu,
    }


def serve_row(
    export: Path, texts: list[str], clients: int, max_batch: int, target: str, threads: int
) -> dict:
    process, url = start_server(export, max_batch, threads)
    try:
        warm = min(100, len(texts) // 10)
        asyncio.run(load(url, texts[:warm], clients, target))
        memory_warm, cpu = rss_mib(process), cpu_s(process)
        row = asyncio.run(load(url, texts[warm:], clients, target))
        row |= {"server_cpu_s": cpu_s(process) - cpu}
        row |= {"rss_warm_mib": memory_warm, "rss_end_mib": rss_mib(process)}
        metrics = httpx.get(f"{url}/metrics").text
        count = [ln for ln in metrics.splitlines() if ln.startswith("mmalign_batch_size_count")]
        total = [ln for ln in metrics.splitlines() if ln.startswith("mmalign_batch_size_sum")]
        row["mean_batch"] = float(total[0].split()[-1]) / float(count[0].split()[-1])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return {"max_batch": max_batch, **row}


def direct_row(export: Path, texts: list[str], target: str, threads: int) -> dict:
    """The same queries in one process: encode + index search, one after another."""
    settings = json.loads((export / "manifest.json").read_text())["settings"]
    torch.set_num_threads(threads)
    model = AlignmentModel.from_pretrained(settings["model_path"])
    index = load_index(export, target)
    latencies = []
    started = time.perf_counter()
    for text in texts:
        begun = time.perf_counter()
        index.search(query_vector(model, {"text": text})[None], 10)
        latencies.append(time.perf_counter() - begun)
    wall = time.perf_counter() - started
    return {"requests": len(texts), "errors": 0, "rps": len(texts) / wall, **percentiles(latencies)}


def environment() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": psutil.cpu_count(), "load_before": list(psutil.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rows", type=int, default=600, help="records of the demo export")
    parser.add_argument("--big-requests", type=int, default=400)
    parser.add_argument("--parts", default="demo,big")
    parser.add_argument("--memory-gib", type=float, default=8.0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, server and direct (1: busy CPU)"
    )
    args = parser.parse_args()
    limit = int(args.memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # server processes inherit it
    report: dict[str, Any] = {"environment": environment(), "threads": args.threads}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if "demo" in args.parts:
            config = yaml.safe_load((ROOT / "configs/guides/serving.yaml").read_text())["model"]
            fields = {"image": "png", "text": "txt", "audio": "flac"}
            (root / "demo").mkdir()
            export = make_export(root / "demo", config, fields, args.rows)
            texts = queries(args.requests)
            report["demo"] = {
                "served": serve_row(export, texts, args.clients, 32, "image", args.threads),
                "direct": direct_row(export, texts[: args.requests // 4], "image", args.threads),
            }
            print(json.dumps(report["demo"], indent=1), flush=True)
        if "big" in args.parts:
            (root / "big").mkdir()
            export = make_export(root / "big", BIG_TEXT, {"text": "txt"}, 200)
            texts = queries(args.big_requests)
            report["big_text"] = [
                serve_row(export, texts, args.clients, batch, "text", args.threads)
                for batch in (32, 1)
            ]
            print(json.dumps(report["big_text"], indent=1), flush=True)
    report["environment"]["load_after"] = list(psutil.getloadavg())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
