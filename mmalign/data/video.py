"""Video files (``mp4``, ``webm``, ``mkv``, ``mov``, ``avi``) through PyAV (FFmpeg).

:func:`decode_video` reads only the container's header: the first video stream's frame count
(or duration x frame rate), frame rate, duration and frame size, checked against the
per-record limits (:mod:`mmalign.data.limits`: ``max_video_seconds``, ``max_video_frames``,
``max_video_pixels``, ``max_decoded_bytes``) before a frame is decoded. It returns an
:class:`EncodedVideo`; the video tower decodes the frames it samples with
:meth:`EncodedVideo.decode_frames`, which stops at the last frame it needs and never reads
past the frame count the header gave (a header that understates the length cannot make it
decode more).

Example:
    >>> video = read_video("clip.mp4")  # doctest: +SKIP
    >>> video.decode_frames([0, video.frame_count - 1]).shape  # doctest: +SKIP
    (2, 64, 64, 3)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from mmalign.data.audio_header import check_audio_header
from mmalign.data.limits import DEFAULT_LIMITS, RecordLimits
from mmalign.data.record_error import RecordError, check_decoded_size
from mmalign.extras import missing_extra

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise missing_extra("video", "video files (type: video, data.fields: mp4)") from None
    return av


@dataclass(frozen=True)
class EncodedVideo:
    """A video file's bytes and what its header says; frames are decoded on demand."""

    data: bytes
    frame_count: int
    fps: float
    width: int
    height: int
    opened: list[Any] = field(default_factory=list, compare=False, repr=False)
    """The container :func:`decode_video` opened to read the header, handed to the first
    :meth:`decode_frames` (the file is opened once); later calls open the bytes again."""

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the opened container (a copy opens the bytes again)."""
        return {**self.__dict__, "opened": []}

    def decode_frames(self, indices: Sequence[int]) -> np.ndarray:
        """The frames at ``indices`` (sorted or not, repeats allowed) as ``[N, H, W, 3]``
        uint8 RGB. Decoding stops after the largest index; a stream that ends early repeats
        its last frame; a stream with no decodable frame raises ``ValueError``."""
        wanted = sorted(set(indices))
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.frame_count:
            raise ValueError(f"frame indices must lie in [0, {self.frame_count}), got {wanted}")
        slots = {position: slot for slot, position in enumerate(wanted)}
        # each frame is converted straight into its row (the converted frame's buffer is
        # freed at once and reused by the next), one swscale set-up per clip
        out = np.empty((len(wanted), self.height, self.width, 3), np.uint8)
        filled = 0
        reformatter = _av().video.reformatter.VideoReformatter()
        with self.opened.pop() if self.opened else _av().open(io.BytesIO(self.data)) as container:
            for position, frame in enumerate(container.decode(container.streams.video[0])):
                if (frame.width, frame.height) != (self.width, self.height):
                    raise ValueError(
                        f"frame {position} is {frame.width}x{frame.height}, the header said "
                        f"{self.width}x{self.height}"
                    )
                if position in slots:
                    out[filled] = reformatter.reformat(frame, format="rgb24").to_ndarray()
                    filled += 1
                if position >= wanted[-1]:
                    break
        if filled == 0:
            raise ValueError("the video stream has no decodable frame")
        out[filled:] = out[filled - 1]  # a stream that ended early: its last frame
        return out if list(indices) == wanted else out[[slots[index] for index in indices]]


def _header(container: Any) -> EncodedVideo:
    if not container.streams.video:
        raise RecordError("bad_video", "the file has no video stream")
    stream = container.streams.video[0]
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = (container.duration or 0) / 1_000_000
    frames = int(stream.frames or round(seconds * rate))
    width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    if frames < 1 or width < 1 or height < 1 or rate <= 0:
        raise RecordError(
            "bad_video",
            f"the header gives {frames} frames of {width}x{height} at {rate:g} fps: no frames",
        )
    return EncodedVideo(b"", frames, rate, width, height)


def check_video_header(header: EncodedVideo, limits: RecordLimits) -> None:
    """Raise :class:`RecordError` when a video's header is over a limit: duration or frame
    count (``too_long``), frame size or decoded size (``too_large``).

    Example:
        >>> check_video_header(EncodedVideo(b"", 10**6, 30.0, 64, 64), DEFAULT_LIMITS)
        Traceback (most recent call last):
        ...
        mmalign.data.record_error.RecordError: too_long: ...
    """
    seconds = header.frame_count / header.fps
    if seconds > limits.max_video_seconds:
        raise RecordError(
            "too_long",
            f"the header says {seconds:.1f} s ({header.frame_count} frames at "
            f"{header.fps:g} fps), over data.max_video_seconds ({limits.max_video_seconds:g} s)",
        )
    if header.frame_count > limits.max_video_frames:
        raise RecordError(
            "too_long",
            f"the header says {header.frame_count} frames, over data.max_video_frames "
            f"({limits.max_video_frames})",
        )
    pixels = header.width * header.height
    if pixels > limits.max_video_pixels:
        raise RecordError(
            "too_large",
            f"the header says {header.width}x{header.height} frames, over "
            f"data.max_video_pixels ({limits.max_video_pixels})",
        )
    check_decoded_size(header.frame_count * pixels * 3, "the video", limits)


def decode_video(data: bytes, limits: RecordLimits = DEFAULT_LIMITS) -> EncodedVideo:
    """Open a video file, check its header against ``limits``; no frame is decoded (the
    opened container is kept for :meth:`EncodedVideo.decode_frames`)."""
    container = _av().open(io.BytesIO(data))
    try:
        header = _header(container)
        check_video_header(header, limits)
    except BaseException:
        container.close()
        raise
    return EncodedVideo(
        data, header.frame_count, header.fps, header.width, header.height, [container]
    )


def read_video(path: str | Path, limits: RecordLimits = DEFAULT_LIMITS) -> EncodedVideo:
    """:func:`decode_video` of a file on disk."""
    return decode_video(Path(path).read_bytes(), limits)


def encode_video(
    frames: np.ndarray,
    fps: float,
    codec: str = "mpeg4",
    audio: tuple[np.ndarray, int] | None = None,
    audio_codec: str = "aac",
) -> bytes:
    """``[T, H, W, 3]`` uint8 RGB frames (even H and W) to MP4 bytes (what the demo and the
    guides write; ``mpeg4`` ships with every FFmpeg build PyAV bundles), with ``audio``
    (``(mono float32 [T], sample_rate)``) as a track (``audio_codec``: ``alac`` is lossless).

    Example:
        >>> clip = np.zeros((4, 16, 16, 3), np.uint8)
        >>> decode_video(encode_video(clip, 8.0)).frame_count
        4
    """
    av = _av()
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        track = None
        if audio is not None:
            track = container.add_stream(audio_codec, rate=audio[1], layout="mono")
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
        if track is not None and audio is not None:  # PyAV converts to the codec's format
            samples = np.asarray(audio[0], np.float32)[None]
            sound = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            sound.sample_rate = audio[1]
            container.mux(track.encode(sound))
            container.mux(track.encode())
    return buffer.getvalue()


def _track_header(container: Any) -> SimpleNamespace:
    """What the first audio stream's header says, as ``soundfile.info`` names it."""
    if not container.streams.audio:
        raise RecordError("no_audio_track", "the video file has no audio stream")
    stream = container.streams.audio[0]
    rate = int(stream.codec_context.sample_rate or 0)
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = (container.duration or 0) / 1_000_000
    channels = int(stream.codec_context.layout.nb_channels)
    return SimpleNamespace(samplerate=rate, frames=round(seconds * rate), channels=channels)


def decode_audio_track(data: bytes, limits: RecordLimits = DEFAULT_LIMITS) -> tuple[Any, int]:
    """A video file's own audio track as ``(mono float32 [T], sample_rate)`` (what
    ``data.fields: {audio: mp4}`` gives an audio tower): the track's header is checked
    against the audio limits (``audio_sample_rates``, ``max_audio_seconds``,
    ``max_decoded_bytes``) before decoding, and decoding stops with ``too_long`` at
    ``max_audio_seconds`` whatever the header said; a file without an audio stream fails as
    ``no_audio_track``.

    Example:
        >>> waveform, rate = decode_audio_track(Path("clip.mp4").read_bytes())  # doctest: +SKIP
    """
    with _av().open(io.BytesIO(data)) as container:
        header = _track_header(container)
        check_audio_header(header, limits)
        most = int(limits.max_audio_seconds * header.samplerate)
        resampler = _av().AudioResampler(format="fltp")  # planar float, layout and rate kept
        chunks: list[np.ndarray] = []
        total = 0
        for frame in container.decode(container.streams.audio[0]):
            for converted in resampler.resample(frame):
                chunks.append(converted.to_ndarray().mean(0, dtype=np.float32))
                total += len(chunks[-1])
            if total > most:
                raise RecordError(
                    "too_long",
                    f"the audio track decodes past data.max_audio_seconds "
                    f"({limits.max_audio_seconds:g} s; its header said {header.frames} samples)",
                )
    if total == 0:
        raise ValueError("the audio track has no samples")
    return np.concatenate(chunks), header.samplerate
