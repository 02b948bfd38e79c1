"""Synthesis of the demo modalities of a digit: image, caption, DTMF tone, seven-segment
graph, a short video of the digit moving, and the pen trajectory that draws its seven
segments (a 2-channel time series).

Everything starts from scikit-learn's 1,797 handwritten 8x8 digits (shipped with the
package, no download). Each function takes a ``numpy.random.Generator`` so that a record is
a pure function of its seed.

Example:
    >>> rng = np.random.default_rng(0)
    >>> caption(7, rng)[0] in {t.format(w) for lang in TEMPLATES
    ...     for t in TEMPLATES[lang] for w in DIGIT_WORDS[lang]}
    True
    >>> dtmf_clip(5, rng).dtype
    dtype('float32')
    >>> moving_digit(np.eye(8) * 16, rng).shape, pen_trajectory(1, rng).shape[0]
    ((6, 32, 32, 3), 2)
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import soundfile
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SAMPLE_RATE = 16000
IMAGE_SIZE = 32
VIDEO_FRAMES = 6
VIDEO_FPS = 6.0
POINTS_PER_SEGMENT = 8
SPLITS = ("train", "val", "test")

DIGIT_WORDS = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "fr": ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"],
    "de": ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"],
    "es": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"],
}
TEMPLATES = {
    "en": ["a handwritten {}", "the digit {}", "a picture of the number {}", "a drawing of a {}"],
    "fr": ["le chiffre {}", "le nombre {}", "un {} écrit à la main", "une image du chiffre {}"],
    "de": ["die Ziffer {}", "die Zahl {}", "eine handgeschriebene {}", "ein Bild der Ziffer {}"],
    "es": ["el dígito {}", "el número {}", "un {} escrito a mano", "una imagen del número {}"],
}
LANGUAGES = tuple(DIGIT_WORDS)

# Standard DTMF keypad: digit -> (row frequency, column frequency) in Hz.
DTMF_FREQUENCIES = {
    1: (697, 1209), 2: (697, 1336), 3: (697, 1477),
    4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
    7: (852, 1209), 8: (852, 1336), 9: (852, 1477),
    0: (941, 1336),
}  # fmt: skip

# Seven-segment display: corner points (x, y) and segments a..g between them.
SEGMENT_POINTS = {
    "top_left": (0.0, 2.0),
    "top_right": (1.0, 2.0),
    "mid_left": (0.0, 1.0),
    "mid_right": (1.0, 1.0),
    "bottom_left": (0.0, 0.0),
    "bottom_right": (1.0, 0.0),
}
SEGMENTS = {
    "a": ("top_left", "top_right"),
    "b": ("top_right", "mid_right"),
    "c": ("mid_right", "bottom_right"),
    "d": ("bottom_left", "bottom_right"),
    "e": ("mid_left", "bottom_left"),
    "f": ("top_left", "mid_left"),
    "g": ("mid_left", "mid_right"),
}
LIT_SEGMENTS = [
    "abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg",
]  # fmt: skip


def load_sources() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images ``[1797, 8, 8]`` (0..16) and labels ``[1797]``."""
    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def split_sources(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Source-image indices per split: 70/10/20, stratified by digit, fixed by ``seed``."""
    indices = np.arange(len(labels))
    train, rest = train_test_split(indices, test_size=0.3, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, test_size=2 / 3, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def caption(digit: int, rng: np.random.Generator) -> tuple[str, str]:
    """A caption naming ``digit`` in words, in a random language and template."""
    language = LANGUAGES[rng.integers(len(LANGUAGES))]
    templates = TEMPLATES[language]
    return templates[rng.integers(len(templates))].format(DIGIT_WORDS[language][digit]), language


def render_digit(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 digit (0..16) upsampled to 32x32 grey levels with a random shift, scale, rotation."""
    grey = Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8))
    size = round(IMAGE_SIZE * rng.uniform(0.8, 1.0))
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))
    corner = (IMAGE_SIZE - size) // 2
    shift = rng.integers(-2, 3, size=2)
    canvas.paste(grey.resize((size, size), Image.Resampling.BICUBIC), tuple(corner + shift))
    rotated = canvas.rotate(float(rng.uniform(-12.0, 12.0)), Image.Resampling.BILINEAR)
    return np.asarray(rotated, dtype=np.uint8)


def dtmf_clip(digit: int, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The DTMF tone of ``digit``: 0.25-0.6 s, random level and phase, white noise, and a
    random start offset (up to 0.1 s of noise before the tone)."""
    low, high = DTMF_FREQUENCIES[digit]
    offset = int(rng.uniform(0.0, 0.1) * sample_rate)
    length = int(rng.uniform(0.25, 0.6) * sample_rate)
    time = np.arange(length) / sample_rate
    phases = rng.uniform(0, 2 * np.pi, size=2)
    tone = np.sin(2 * np.pi * low * time + phases[0]) + np.sin(2 * np.pi * high * time + phases[1])
    clip = np.zeros(offset + length)
    clip[offset:] = rng.uniform(0.1, 0.4) * tone
    clip += rng.normal(0.0, rng.uniform(0.002, 0.03), size=clip.shape)
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def moving_digit(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A ``VIDEO_FRAMES``-frame RGB clip ``[T, 32, 32, 3]`` of the digit (rendered as
    :func:`render_digit` does) moving at a random constant velocity (up to 2 px per frame in
    each direction, centred on the clip's middle frame)."""
    still = render_digit(image, rng)
    velocity = rng.integers(-2, 3, size=2)
    middle = (VIDEO_FRAMES - 1) / 2
    frames = [
        np.roll(still, tuple(np.round(velocity * (t - middle)).astype(int)), axis=(0, 1))
        for t in range(VIDEO_FRAMES)
    ]
    return np.repeat(np.stack(frames)[..., None], 3, axis=-1)


def pen_trajectory(digit: int, rng: np.random.Generator) -> np.ndarray:
    """The pen's (x, y) drawing the lit seven-segment strokes of ``digit`` in the order a..g,
    ``POINTS_PER_SEGMENT`` samples per stroke, at a random scale and offset with noise:
    float32 ``[2, T]``."""
    path = [
        np.linspace(SEGMENT_POINTS[start], SEGMENT_POINTS[end], POINTS_PER_SEGMENT)
        for start, end in (SEGMENTS[name] for name in LIT_SEGMENTS[digit])
    ]
    points = np.concatenate(path) * rng.uniform(0.8, 1.2) + rng.uniform(-0.3, 0.3, size=2)
    points += rng.normal(0.0, 0.03, size=points.shape)
    return points.T.astype(np.float32)


def flac_bytes(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono waveform as 16-bit FLAC."""
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def seven_segment_graph(digit: int, rng: np.random.Generator, jitter: float = 0.05) -> dict:
    """The seven-segment drawing of ``digit``: nodes are the end points of the lit segments
    (``x`` [N, 2], jittered, in random order), edges the lit segments in both directions."""
    lit = [SEGMENTS[name] for name in LIT_SEGMENTS[digit]]
    points = sorted({point for segment in lit for point in segment})
    order = rng.permutation(len(points))
    node_of = {points[position]: node for node, position in enumerate(order)}
    x = np.array([SEGMENT_POINTS[points[position]] for position in order])
    x = x + rng.normal(0.0, jitter, size=x.shape)
    edges = [(node_of[start], node_of[end]) for start, end in lit]
    sources = [s for s, t in edges] + [t for s, t in edges]
    targets = [t for s, t in edges] + [s for s, t in edges]
    return {"x": np.round(x, 4).tolist(), "edge_index": [sources, targets]}


def classes_json() -> dict[str, Any]:
    """Class names and prompt templates per language, for zero-shot classification."""
    return {"classnames": DIGIT_WORDS, "templates": TEMPLATES}
