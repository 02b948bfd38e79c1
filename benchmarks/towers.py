"""Encode throughput of every tower type against the bare backbone, on CPU.

For each tower the same raw samples go through

- ``encode``: ``AlignmentModel.encode`` (preprocess, collate, forward, projection, L2 norm);
- ``reference``: the path a user of the backing library writes by hand: the library's own
  preprocessing (open_clip's image transform + ``torch.stack``, open_clip's or the Hugging
  Face tokenizer called on the whole batch; for the in-house audio, graph and tabular towers
  the tower's own ``preprocess`` + ``collate``) followed by the bare backbone's forward on
  those tensors (no projection, no normalization);

and, separately, mmalign's preprocess+collate alone, the backbone forward alone and the
model's forward (backbone + projection to ``dim`` + L2 norm) on the same tensors. The
overhead is ``encode time / reference time - 1`` (goal: at most 15%); it includes the
projection, which is model compute rather than wrapping, so the table also shows the model
forward.

A second table measures video decoding: clips per second of the data loader (tar shard ->
header check -> the video tower's ``preprocess``: decode of the sampled frames, resize and
normalization -> ``collate``) against a bare PyAV loop over the same clips in memory (open
each, decode every frame, or the same sampled frames, to an RGB array; also with one
swscale set-up per clip, as the loader converts), in turns in the same process; overhead = loader
time / bare time - 1 (goal: at most 15%), and the memory each clip holds (the item the tower
makes, the decoded frames) and the process's peak resident memory.

Run: ``.venv/bin/python benchmarks/towers.py`` (``--samples`` / ``--repeats`` to change the
work; ``--threads`` sets torch's CPU threads; ``--only video`` for the video table alone).
"""

from __future__ import annotations

import argparse
import io
import math
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import sentencepiece
import torch
import transformers
import webdataset as wds
from PIL import Image

from mmalign.data import make_loader
from mmalign.data.video import decode_video, encode_video
from mmalign.model import AlignmentModel
from mmalign.towers import build_tower
from mmalign.towers.video import sample_indices

WORDS = ["a", "the", "handwritten", "digit", "zero", "one", "two", "three", "four"]
WORDS += ["five", "six", "seven", "eight", "nine"]


@dataclass
class Case:
    """One tower to measure: its config, raw samples and the by-hand reference path."""

    name: str
    tower: dict[str, Any]
    raws: list[Any]
    reference_preprocess: Callable[[AlignmentModel, list[Any]], Any] | None
    backbone: Callable[[AlignmentModel, Any], torch.Tensor]


def interleaved_best(
    paths: dict[str, Callable[[], Any]],
    repeats: int,
    clock: Callable[[], float],
    min_seconds: float = 0.2,
) -> dict[str, float]:
    """The fastest of ``repeats`` timings of each path (seconds per call). The paths run in
    turns, so a change of load on the machine hits all of them alike; each timing loops a
    call until the slowest path takes ``min_seconds``, so fast towers are not timed at the
    clock's noise level."""
    warmup = {}
    for name, function in paths.items():
        start = clock()
        function()
        warmup[name] = clock() - start
    loops = max(1, math.ceil(min_seconds / max(max(warmup.values()), 1e-9)))
    timings: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, function in paths.items():
            start = clock()
            for _ in range(loops):
                function()
            timings[name].append((clock() - start) / loops)
    return {name: min(values) for name, values in timings.items()}


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def own_preprocess(model: AlignmentModel, modality: str, raws: list[Any]) -> Any:
    tower = model.towers[modality]
    return tower.collate([tower.preprocess(raw) for raw in raws])


def make_sentencepiece(directory: Path, rng: np.random.Generator) -> Path:
    sentences = [" ".join(rng.choice(WORDS, size=5)) for _ in range(200)]
    path = directory / "spm.model"
    with path.open("wb") as model_writer:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_writer,
            vocab_size=64,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    return path


def make_bert(directory: Path) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(
        directory
    )
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
    )
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def graph_sample(rng: np.random.Generator) -> dict[str, Any]:
    nodes = int(rng.integers(8, 20))
    ring = np.arange(nodes)
    edges = np.concatenate(
        [np.stack([ring, np.roll(ring, 1)]), np.stack([np.roll(ring, 1), ring])], 1
    )
    return {"x": rng.normal(size=(nodes, 2)).astype(np.float32), "edge_index": edges}


def cases(directory: Path, samples: int, rng: np.random.Generator) -> list[Case]:
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(samples)]
    images = [
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(samples)
    ]
    bert = make_bert(directory / "bert")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(bert)
    clip_transform = open_clip.image_transform(64, is_train=False)
    bpe = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    text_cfg = {"type": "text", "width": 256, "heads": 4, "layers": 4, "context_length": 32}
    return [
        Case(
            "image (open_clip ViT-S-32 @64px)",
            {"type": "image", "model": "ViT-S-32", "image_size": 64},
            images,
            lambda model, raws: torch.stack([clip_transform(raw) for raw in raws]),
            lambda model, inputs: model.towers["x"].visual(inputs),
        ),
        Case(
            "text (open_clip BPE, 4x256, ctx 32)",
            text_cfg,
            captions,
            lambda model, raws: bpe(raws),
            lambda model, inputs: model.towers["x"].encoder.module(inputs),
        ),
        Case(
            "text (open_clip + SentencePiece)",
            {**text_cfg, "tokenizer": str(make_sentencepiece(directory, rng))},
            captions,
            None,
            lambda model, inputs: model.towers["x"].encoder.module(inputs),
        ),
        Case(
            "text (HF BERT 4x256, cls)",
            {"type": "text", "backend": "hf", "path": str(bert)},
            captions,
            lambda model, raws: dict(hf_tokenizer(raws, padding=True, return_tensors="pt")),
            lambda model, inputs: model.towers["x"].encoder.module(**inputs).last_hidden_state,
        ),
        Case(
            "audio (spectrogram transformer, 1 s)",
            {"type": "audio", "clip_seconds": 1.0},
            [(rng.normal(size=16000).astype(np.float32), 16000) for _ in range(samples)],
            None,
            lambda model, inputs: model.towers["x"](inputs),
        ),
        Case(
            "graph (GIN 3x64)",
            {"type": "graph", "in_features": 2},
            [graph_sample(rng) for _ in range(samples)],
            None,
            lambda model, inputs: model.towers["x"](inputs),
        ),
        Case(
            "tabular (MLP 2x128, 16 features)",
            {"type": "tabular", "in_features": 16},
            [rng.normal(size=16).astype(np.float32) for _ in range(samples)],
            None,
            lambda model, inputs: model.towers["x"](inputs),
        ),
    ]


def _each(items: list[Any], work: Callable[[Any], Any], grad: bool = False) -> Callable[[], None]:
    """A timed path: ``work`` on every item (under ``torch.no_grad`` unless ``grad``)."""

    def run() -> None:
        with torch.enable_grad() if grad else torch.no_grad():
            for item in items:
                work(item)

    return run


def measure(
    case: Case, batch_size: int, repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Seconds per pass over ``case.raws`` for each path."""
    model = AlignmentModel.from_config({"dim": 128, "towers": {"x": case.tower}}).eval()
    chunks = batches(case.raws, batch_size)
    reference_preprocess = case.reference_preprocess or (
        lambda model, raws: own_preprocess(model, "x", raws)
    )
    collated = [reference_preprocess(model, chunk) for chunk in chunks]
    paths = {
        "encode": lambda: model.encode("x", case.raws, batch_size=batch_size),
        "reference": _each(
            chunks, lambda chunk: case.backbone(model, reference_preprocess(model, chunk))
        ),
        "backbone": _each(collated, lambda inputs: case.backbone(model, inputs)),
        "model": _each(collated, lambda inputs: model({"x": inputs})),
        "preprocess": _each(chunks, lambda chunk: own_preprocess(model, "x", chunk), grad=True),
        "reference_preprocess": _each(
            chunks, lambda chunk: reference_preprocess(model, chunk), grad=True
        ),
    }
    return interleaved_best(paths, repeats, clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this process's CPU time (robust on a shared machine; use --threads 1)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="measure only towers whose name has this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(
        f"{args.samples} samples, batch {args.batch_size}, best of {args.repeats}, "
        f"{args.threads} CPU thread(s), {args.clock} clock, torch {torch.__version__}; "
        f"throughput in samples per {args.clock} second\n"
    )
    print(
        "| tower | encode | reference: library preprocess + bare forward | overhead "
        "| bare forward | model forward | mmalign preprocess+collate | library preprocess |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as directory:
        for case in cases(Path(directory), args.samples, rng):
            if args.only in case.name:
                print(table_row(case, measure(case, args.batch_size, args.repeats, clock), args))
        if args.only in "video decoding":
            print(video_decoding(Path(directory), args.repeats, clock, rng))


def table_row(case: Case, seconds: dict[str, float], args: argparse.Namespace) -> str:
    """One markdown row: throughputs (samples per second) and the overhead."""
    rate = {key: f"{args.samples / value:,.0f}" for key, value in seconds.items()}
    overhead = seconds["encode"] / seconds["reference"] - 1
    library = rate["reference_preprocess"] if case.reference_preprocess else "(own)"
    return (
        f"| {case.name} | {rate['encode']} | {rate['reference']} | {overhead:+.1%} "
        f"| {rate['backbone']} | {rate['model']} | {rate['preprocess']} | {library} |"
    )


VIDEO_CLIPS = 48
VIDEO_FRAMES = 48
VIDEO_SIZE = 112
SAMPLED_FRAMES = 8


def video_clips(rng: np.random.Generator) -> list[bytes]:
    """``VIDEO_CLIPS`` MP4s of ``VIDEO_FRAMES`` frames: a noise texture moving over a
    gradient (a few KB per frame, like a real low-motion clip)."""
    base = np.linspace(0, 255, VIDEO_SIZE, dtype=np.float32)[None, :, None]
    clips = []
    for _ in range(VIDEO_CLIPS):
        texture = rng.integers(0, 64, (VIDEO_SIZE, VIDEO_SIZE, 3)).astype(np.float32)
        frames = [
            np.clip(base + np.roll(texture, 2 * t, axis=1), 0, 255).astype(np.uint8)
            for t in range(VIDEO_FRAMES)
        ]
        clips.append(encode_video(np.stack(frames), 24.0))
    return clips


def bare_decode(clips: list[bytes], keep: set[int] | None = None, reuse: bool = False) -> int:
    """The loop a PyAV user writes: open each clip, decode its frames, convert every frame
    (or the frames of ``keep``, stopping after the last) to RGB; frames converted. ``reuse``:
    one ``VideoReformatter`` per clip (one swscale set-up, as the loader does) instead of
    ``frame.to_ndarray(format="rgb24")``'s one per frame."""
    import av
    from av.video.reformatter import VideoReformatter

    count = 0
    last = max(keep) if keep else None
    for data in clips:
        reformatter = VideoReformatter()
        with av.open(io.BytesIO(data)) as container:
            for position, frame in enumerate(container.decode(video=0)):
                if keep is None or position in keep:
                    if reuse:
                        reformatter.reformat(frame, format="rgb24").to_ndarray()
                    else:
                        frame.to_ndarray(format="rgb24")
                    count += 1
                if last is not None and position >= last:
                    break
    return count


def video_decoding(
    directory: Path, repeats: int, clock: Callable[[], float], rng: np.random.Generator
) -> str:
    """The video table: loader vs bare PyAV, clips per second, memory per clip."""
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.RLIM_INFINITY))
    clips = video_clips(rng)
    shard = directory / "video.tar"
    with wds.TarWriter(str(shard)) as writer:
        for index, data in enumerate(clips):
            writer.write({"__key__": f"{index:04d}", "mp4": data})
    config = {"type": "video", "encoder": "conv3d", "frames": SAMPLED_FRAMES}
    tower = build_tower({**config, "image_size": VIDEO_SIZE})

    def loader() -> None:
        batches = make_loader(str(shard), {"video": tower}, {"video": "mp4"}, 16)
        assert sum(len(batch.keys) for batch in batches) == VIDEO_CLIPS

    sampled = set(sample_indices(VIDEO_FRAMES, 24.0, SAMPLED_FRAMES, None, augment=False))
    paths = {
        "loader": loader,
        "bare": lambda: bare_decode(clips),
        "sampled": lambda: bare_decode(clips, sampled),
        "reused": lambda: bare_decode(clips, sampled, reuse=True),
    }
    seconds = interleaved_best(paths, repeats, clock)
    item = tower.preprocess(decode_video(clips[0]))
    rate = {name: VIDEO_CLIPS / value for name, value in seconds.items()}
    frames_mb = VIDEO_FRAMES * VIDEO_SIZE * VIDEO_SIZE * 3 / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    encoded_kb = np.mean([len(clip) for clip in clips]) / 1024
    dtype = str(item.dtype).removeprefix("torch.")
    return "\n".join(
        [
            f"\nvideo decoding: {VIDEO_CLIPS} MP4 clips of {VIDEO_FRAMES} frames "
            f"{VIDEO_SIZE}x{VIDEO_SIZE} (MPEG-4 Part 2, {encoded_kb:.0f} KB each), "
            f"loader samples {SAMPLED_FRAMES} frames (conv3d tower, batch 16, no "
            "workers); clips per second\n",
            "| path | clips/s | loader overhead vs this path | memory per clip |",
            "|---|---:|---:|---|",
            f"| bare PyAV loop (every frame to RGB) | {rate['bare']:,.1f} | "
            f"{seconds['loader'] / seconds['bare'] - 1:+.1%} | all frames {frames_mb:.2f} MiB "
            "if kept |",
            f"| bare PyAV loop (the same {SAMPLED_FRAMES} frames to RGB, stop after the last) "
            f"| {rate['sampled']:,.1f} | {seconds['loader'] / seconds['sampled'] - 1:+.1%} | "
            f"{SAMPLED_FRAMES / VIDEO_FRAMES * frames_mb:.2f} MiB |",
            f"| bare PyAV loop (the same {SAMPLED_FRAMES} frames, one VideoReformatter per clip) "
            f"| {rate['reused']:,.1f} | {seconds['loader'] / seconds['reused'] - 1:+.1%} | "
            f"{SAMPLED_FRAMES / VIDEO_FRAMES * frames_mb:.2f} MiB |",
            f"| loader (tar, header check, sampled frames, resize, collate) | "
            f"{rate['loader']:,.1f} | | item "
            f"{item.numel() * item.element_size() / 2**20:.2f} MiB ({dtype} "
            f"{list(item.shape)}) + encoded clip |",
            f"\npeak resident memory of the process: {peak:.0f} MiB",
        ]
    )


if __name__ == "__main__":
    main()
