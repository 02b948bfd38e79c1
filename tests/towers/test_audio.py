"""Audio tower: log-mel against transformers' reference functions, resampling, cropping and
masking, the spectrogram encoders, Hugging Face encoders from tiny saved models, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import transformers
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from mmalign.config import ConfigError
from mmalign.model import AlignmentModel
from mmalign.towers import build_tower
from mmalign.towers.audio import SpectrogramCNN, SpectrogramTransformer
from mmalign.towers.log_mel import LogMel, mel_filterbank
from mmalign.towers.waveform import resample

SMALL = {"type": "audio", "clip_seconds": 0.5, "n_mels": 32, "width": 32, "heads": 2}
SMALL_CONFIGS = {
    "transformer-mean": SMALL,
    "transformer-cls": {**SMALL, "pooling": "cls", "patch_freq": 8, "patch_time": 3},
    "cnn": {**SMALL, "encoder": "cnn", "cnn_channels": [8]},
}


def clips(count: int) -> list[tuple[np.ndarray, int]]:
    """Clips of different lengths, rates and channel counts (some longer than the window)."""
    rng = np.random.default_rng(1)
    shapes = [(3000,), (2, 12000), (5000,), (20000,), (1, 800), (7999,)]
    rates = [16000, 16000, 8000, 22050, 16000, 16000]
    return [
        (rng.normal(0.0, 0.1, size=shapes[i % 6]).astype(np.float32), rates[i % 6])
        for i in range(count)
    ]


@pytest.mark.parametrize("mel_scale", ["htk", "slaney"])
@pytest.mark.parametrize("slaney_norm", [False, True])
def test_mel_filterbank_equals_transformers(mel_scale: str, slaney_norm: bool) -> None:
    ours = mel_filterbank(257, 40, 16000, 20.0, 7600.0, mel_scale, slaney_norm)
    reference = mel_filter_bank(
        257, 40, 20.0, 7600.0, 16000, norm="slaney" if slaney_norm else None, mel_scale=mel_scale
    )
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-12)


def test_log_mel_equals_transformers_spectrogram() -> None:
    waveform = np.random.default_rng(0).normal(size=6000).astype(np.float32)
    front_end = LogMel(
        16000, n_fft=512, hop_length=160, n_mels=40, win_length=400, f_min=20.0, f_max=7600.0
    )
    ours = front_end(torch.from_numpy(np.stack([waveform, waveform[::-1].copy()])))
    for row, clip in zip(ours, [waveform, waveform[::-1]]):
        reference = spectrogram(
            clip,
            window_function(400, "hann", frame_length=512),
            frame_length=512,
            hop_length=160,
            fft_length=512,
            power=2.0,
            center=True,
            pad_mode="reflect",
            mel_filters=mel_filter_bank(257, 40, 20.0, 7600.0, 16000),
            mel_floor=1e-6,
            log_mel="log",
        )
        assert row.shape == reference.shape == (40, 6000 // 160 + 1)
        np.testing.assert_allclose(row.numpy(), reference, atol=2e-4)


@pytest.mark.parametrize(("source", "target"), [(44100, 16000), (8000, 16000), (16000, 22050)])
def test_resampling_keeps_a_sine_at_its_frequency(source: int, target: int) -> None:
    seconds, frequency = 1.0, 1234.0
    time = np.arange(int(seconds * source)) / source
    resampled = resample(np.sin(2 * np.pi * frequency * time).astype(np.float32), source, target)
    assert resampled.dtype == np.float32
    assert len(resampled) == int(seconds * target)
    peak_bin = int(np.argmax(np.abs(np.fft.rfft(resampled))))
    assert abs(peak_bin * target / len(resampled) - frequency) <= 1.0  # one 1 Hz bin
    assert np.abs(resampled[100:-100]).max() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_spectrogram_encoders_shape_and_batch_independence(name: str) -> None:
    tower = build_tower(SMALL_CONFIGS[name]).eval()
    items = [tower.preprocess(raw) for raw in clips(6)]
    with torch.no_grad():
        batch = tower(tower.collate(items))
        alone = torch.cat([tower(tower.collate([item])) for item in items])
        pairs = tower(tower.collate([items[4], items[0]]))
    assert batch.shape == (6, 32) and tower.width == 32
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pairs, batch[[4, 0]], atol=1e-5, rtol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # different clips, different vectors


@pytest.mark.parametrize("encoder_class", [SpectrogramTransformer, SpectrogramCNN])
def test_encoders_ignore_everything_past_the_real_frames(encoder_class: type) -> None:
    config = build_tower({**SMALL, "patch_time": 4}).config
    encoder = (
        encoder_class(config, 51)
        if encoder_class is SpectrogramTransformer
        else encoder_class(config)
    ).eval()
    features = torch.randn(3, 32, 51)
    frame_lengths = torch.tensor([51, 10, 23])
    garbage = features.clone()
    for row, length in enumerate(frame_lengths.tolist()):
        garbage[row, :, length:] = torch.randn(32, 51 - length) * 100
    with torch.no_grad():
        clean, noisy = encoder(features, frame_lengths), encoder(garbage, frame_lengths)
        shorter = encoder(features, torch.tensor([51, 9, 23]))
    torch.testing.assert_close(clean, noisy, atol=1e-5, rtol=1e-5)
    assert (clean[1] - shorter[1]).abs().max() > 1e-4  # the real frames do count


def test_crop_is_centred_at_eval_and_random_when_augmenting() -> None:
    tower = build_tower({**SMALL, "sample_rate": 1000, "n_fft": 16, "hop_length": 8})
    ramp = np.arange(2000, dtype=np.float32)
    item = tower.preprocess((ramp, 1000))
    assert int(item["length"]) == 500 == len(item["waveform"])
    assert item["waveform"][0] == 750 and torch.equal(item["waveform"], torch.arange(750, 1250.0))
    starts = set()
    for _ in range(20):
        window = tower.preprocess((ramp, 1000), augment=True)["waveform"]
        assert torch.equal(window, window[0] + torch.arange(500.0))  # contiguous crop
        starts.add(int(window[0]))
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 1500
    short = tower.preprocess((ramp[:120], 1000))
    assert int(short["length"]) == 120
    assert torch.equal(short["waveform"][:120], torch.arange(120.0))
    assert not short["waveform"][120:].any()


def test_files_and_channels_mix_to_mono(tmp_path: Path) -> None:
    tower = build_tower(SMALL)
    stereo = np.random.default_rng(2).uniform(-0.5, 0.5, size=(4000, 2)).astype(np.float32)
    soundfile.write(tmp_path / "clip.wav", stereo, 16000, subtype="FLOAT")
    from_file = tower.preprocess(tmp_path / "clip.wav")
    from_array = tower.preprocess((stereo.T, 16000))
    from_tensor = tower.preprocess((torch.from_numpy(stereo.mean(1)), 16000))
    assert int(from_file["length"]) == 4000
    torch.testing.assert_close(from_file["waveform"], from_array["waveform"])
    torch.testing.assert_close(from_file["waveform"], from_tensor["waveform"])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ((np.zeros(0, dtype=np.float32), 16000), "empty"),
        ((np.array([0.0, np.nan, 1.0]), 16000), "NaN or Inf.*first at index 1"),
        ((np.array([0.0, 0.1, np.inf]), 16000), "NaN or Inf"),
        ((np.zeros(100), 0), "sample rate must be positive, got 0"),
        ((np.zeros(100), -8000), "sample rate must be positive"),
        ((np.zeros(100), "16k"), "sample rate must be an integer"),
        ((np.zeros((100, 2)), 16000), "more than 16 channels.*transpose"),
        ((np.zeros((2, 2, 10)), 16000), r"\[samples\] or \[channels, samples\]"),
        (np.zeros(100), "must be a \\(waveform, sample_rate\\) tuple"),
        ("/no/such/file.wav", "cannot read audio file /no/such/file.wav"),
    ],
)
def test_bad_audio_gives_clear_errors(raw: object, message: str) -> None:
    tower = build_tower(SMALL)
    with pytest.raises((ValueError, TypeError), match=message):
        tower.preprocess(raw)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match=f"cannot read audio file {broken}"):
        build_tower(SMALL).preprocess(broken)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"encoder": "hf"}, "needs 'path:'"),
        ({"n_mels": 30}, "patch_freq 16 must divide n_mels 30"),
        ({"heads": 5}, "divisible by heads"),
        ({"f_max": 9000}, "f_max must lie in"),
        ({"clip_seconds": 0.01}, "shorter than half an FFT window"),
        ({"encoder": "hf", "path": "/nowhere"}, "not a Hugging Face model directory"),
        ({"colour": "blue"}, "colour: unknown key"),
    ],
)
def test_bad_config_gives_clear_errors(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_tower({**SMALL, **config}, field="model.towers.audio")


def make_wav2vec2(directory: Path) -> transformers.Wav2Vec2Model:
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_feat_extract_layers=2,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    model = transformers.Wav2Vec2Model(config).eval()
    model.save_pretrained(directory)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(directory)
    return model


def make_whisper(directory: Path) -> transformers.WhisperModel:
    config = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=20,
        max_source_positions=50,  # 1 s of 10 ms frames, halved by the conv stem
        max_target_positions=16,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = transformers.WhisperModel(config).eval()
    model.save_pretrained(directory)
    transformers.WhisperFeatureExtractor(feature_size=20, chunk_length=1).save_pretrained(directory)
    return model


def assert_same_weights(loaded: torch.nn.Module, saved: torch.nn.Module) -> None:
    expected, actual = saved.state_dict(), loaded.state_dict()
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_hf_wav2vec2_loads_saved_weights_and_pools_real_frames(tmp_path: Path) -> None:
    saved = make_wav2vec2(tmp_path / "w2v")
    config = {"type": "audio", "encoder": "hf", "path": str(tmp_path / "w2v"), "clip_seconds": 0.5}
    tower = build_tower(config).eval()
    assert tower.width == 32 and tower.clip_samples == 8000
    assert_same_weights(tower.encoder.model, saved)
    items = [tower.preprocess(raw) for raw in clips(4)]
    assert items[0]["input_values"].shape == (8000,)
    assert int(items[0]["attention_mask"].sum()) == 3000
    with torch.no_grad():
        batch = tower(tower.collate(items))
        alone = torch.cat([tower(tower.collate([item])) for item in items])
        hidden = saved(items[0]["input_values"][None]).last_hidden_state[0]
    frames = int(saved._get_feat_extract_output_lengths(torch.tensor(3000)))
    assert batch.shape == (4, 32)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[0], hidden[:frames].mean(0), atol=1e-5, rtol=1e-5)


def test_hf_whisper_encoder_loads_saved_weights_and_pools_real_frames(tmp_path: Path) -> None:
    saved = make_whisper(tmp_path / "whisper")
    tower = build_tower({"type": "audio", "encoder": "hf", "path": str(tmp_path / "whisper")})
    tower.eval()
    assert tower.width == 32
    assert_same_weights(tower.encoder.model, saved.encoder)
    items = [tower.preprocess(raw) for raw in clips(3)]
    assert items[0]["input_features"].shape == (20, 100)  # the extractor's fixed 1 s window
    frames = -(-3000 // 160)  # mel frames starting on a real sample: ceil(3000 / 160)
    assert int(items[0]["attention_mask"].sum()) == frames
    with torch.no_grad():
        batch = tower(tower.collate(items))
        alone = torch.cat([tower(tower.collate([item])) for item in items])
        hidden = saved.encoder(items[0]["input_features"][None]).last_hidden_state[0]
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    real = (frames - 1) // 2 + 1  # the conv stem's stride 2
    torch.testing.assert_close(batch[0], hidden[:real].mean(0), atol=1e-5, rtol=1e-5)


def test_model_embeds_audio_and_round_trips_without_the_hf_directory(tmp_path: Path) -> None:
    make_whisper(tmp_path / "whisper")
    model = AlignmentModel.from_config(
        {
            "dim": 16,
            "towers": {
                "tone": SMALL_CONFIGS["cnn"],
                "speech": {"type": "audio", "encoder": "hf", "path": str(tmp_path / "whisper")},
            },
        }
    )
    raws = clips(5)
    tone, speech = model.encode("tone", raws, batch_size=2), model.encode("speech", raws)
    for embeddings in (tone, speech):
        assert embeddings.shape == (5, 16)
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(5))
    saved = model.save_pretrained(tmp_path / "saved")
    for path in (tmp_path / "whisper").iterdir():
        path.unlink()  # the saved model must not need the original directory
    (tmp_path / "whisper").rmdir()
    assert (saved / "speech" / "preprocessor_config.json").is_file()
    loaded = AlignmentModel.from_pretrained(saved)
    torch.testing.assert_close(loaded.encode("tone", raws), tone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loaded.encode("speech", raws), speech, atol=1e-6, rtol=1e-6)


def test_transformer_tower_learns_to_tell_tones_apart() -> None:
    tower = build_tower(
        {
            **SMALL,
            "clip_seconds": 0.25,
            "sample_rate": 8000,
            "n_mels": 16,
            "n_fft": 256,
            "hop_length": 128,
            "patch_freq": 4,
        }
    )
    head = torch.nn.Linear(32, 2)
    time = np.arange(1600) / 8000
    raws = [
        (np.sin(2 * np.pi * f * time + p).astype(np.float32), 8000)
        for f in (440.0, 1500.0)
        for p in (0.0, 1.0, 2.0, 3.0)
    ]
    labels = torch.tensor([0] * 4 + [1] * 4)
    inputs = tower.collate([tower.preprocess(raw) for raw in raws])
    optimizer = torch.optim.Adam([*tower.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(head(tower(inputs)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_gain_and_time_mask_augment_only_in_training() -> None:
    config = {"type": "audio", "encoder": "cnn", "clip_seconds": 0.5, "width": 8}
    tower = build_tower({**config, "augment_gain_db": 6.0, "augment_time_mask": 0.5})
    clip = (np.ones(8000, dtype=np.float32), 16000)
    assert torch.equal(tower.preprocess(clip)["waveform"], torch.ones(8000))
    torch.manual_seed(0)
    ratios, silenced = [], []
    for _ in range(20):
        waveform = tower.preprocess(clip, augment=True)["waveform"]
        ratios.append(float(waveform.max()))
        silenced.append(int((waveform == 0).sum()))
    assert 10 ** (-6 / 20) - 1e-6 <= min(ratios) < max(ratios) <= 10 ** (6 / 20) + 1e-6
    assert max(silenced) <= 4000 and len(set(silenced)) > 1


def _encoder_inputs(tower, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The standardized (and masked) log-mel the tower's encoder receives."""
    seen = []
    handle = tower.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        tower(inputs)
    handle.remove()
    return seen[0]


def test_frequency_mask_sets_a_band_of_mel_bins_to_the_clip_mean() -> None:
    config = {"type": "audio", "encoder": "cnn", "clip_seconds": 0.5, "width": 8, "n_mels": 32}
    tower = build_tower({**config, "augment_freq_mask": 0.5}).eval()
    rng = np.random.default_rng(0)
    clips = [(rng.standard_normal(8000).astype(np.float32), 16000) for _ in range(6)]
    plain = tower.collate([tower.preprocess(clip) for clip in clips])
    assert "mel_keep" not in plain  # evaluation: no mask, the inputs of export and serving
    torch.manual_seed(3)
    augmented = tower.collate([tower.preprocess(clip, augment=True) for clip in clips])
    torch.manual_seed(3)
    again = tower.collate([tower.preprocess(clip, augment=True) for clip in clips])
    keep = augmented["mel_keep"]
    assert torch.equal(keep, again["mel_keep"])  # same seed, same bands
    masked_counts = (~keep).sum(dim=1)
    assert masked_counts.max() <= 16 and len(set(masked_counts.tolist())) > 1
    for row in keep:  # one band of consecutive bins
        masked = torch.nonzero(~row).flatten()
        assert masked.numel() == 0 or masked[-1] - masked[0] + 1 == masked.numel()
    reference = _encoder_inputs(tower, plain)
    features = _encoder_inputs(tower, augmented)
    assert features.shape == reference.shape == (6, 32, features.shape[-1])
    band = ~keep[:, :, None].expand_as(features)
    assert torch.all(features[band] == 0)  # the clip's mean after standardization
    real = int(tower.log_mel.frame_lengths(plain["length"])[0])  # the mean of the real frames
    assert reference[:, :, :real].mean(dim=(1, 2)).abs().max() < 1e-5
    torch.testing.assert_close(features[~band], reference[~band])


def test_frequency_mask_views_are_seeded_per_record() -> None:
    from mmalign.data.two_views import augmented_views

    tower = build_tower(
        {"type": "audio", "encoder": "cnn", "clip_seconds": 0.5, "augment_freq_mask": 0.5}
    )
    clip = (np.ones(8000, dtype=np.float32), 16000)
    views = [augmented_views(tower, clip, f"k{i}", "audio", seed=0, epoch=0) for i in range(8)]
    again = [augmented_views(tower, clip, f"k{i}", "audio", seed=0, epoch=0) for i in range(8)]
    for (first, second), (first_again, second_again) in zip(views, again):
        assert torch.equal(first["mel_keep"], first_again["mel_keep"])
        assert torch.equal(second["mel_keep"], second_again["mel_keep"])
    assert any(not torch.equal(a["mel_keep"], b["mel_keep"]) for a, b in views)
    with pytest.raises(ValueError, match="augment_freq_mask masks the log-mel"):
        build_tower({"type": "audio", "encoder": "hf", "path": "x", "augment_freq_mask": 0.2})
