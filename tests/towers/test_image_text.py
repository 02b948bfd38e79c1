"""Image and text towers: raw inputs, reference equality with open_clip / transformers,
local checkpoints, tokenizers, and clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import open_clip
import pytest
import sentencepiece
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from mmalign.config import ConfigError
from mmalign.model import AlignmentModel
from mmalign.towers import TOWERS, build_tower

VISION_CFG = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TINY_IMAGE = {"type": "image", "embed_dim": 24, "vision_cfg": VISION_CFG}
TINY_TEXT = {"type": "text", "width": 32, "heads": 2, "layers": 1, "context_length": 16}
WORDS = ["a", "the", "handwritten", "digit", "seven", "three"]
WORDS += ["le", "chiffre", "sept", "die", "ziffer", "sieben"]
SENTENCES = [
    "a handwritten seven",
    "a handwritten three",
    "le chiffre sept",
    "le chiffre trois",
    "die Ziffer sieben",
    "die Ziffer drei",
    "la cifra siete",
    "het cijfer zeven",
] * 4


def make_hf_text(directory: Path) -> Path:
    """A tiny BERT and its WordPiece tokenizer saved as a Hugging Face directory."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_sentencepiece(path: Path) -> Path:
    """A tiny SentencePiece model trained on multilingual digit captions."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_writer=model,
        vocab_size=50,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_text(tmp_path_factory.mktemp("hf") / "bert")


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sentencepiece(tmp_path_factory.mktemp("spm") / "spm.model")


def image_model(**tower: object) -> AlignmentModel:
    return AlignmentModel.from_config({"dim": 16, "towers": {"image": {**TINY_IMAGE, **tower}}})


def random_pil(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_registry_has_all_five_tower_types() -> None:
    assert {"image", "text", "audio", "graph", "tabular"} <= set(TOWERS)


def test_image_raw_formats_agree_and_give_unit_norm(tmp_path: Path) -> None:
    model = image_model()
    pil = random_pil(0)
    png = io.BytesIO()
    pil.save(png, format="PNG")
    (tmp_path / "digit.png").write_bytes(png.getvalue())
    rgba = np.concatenate([np.asarray(pil), np.full((40, 48, 1), 255, np.uint8)], axis=-1)
    raws = [pil, np.asarray(pil), rgba, str(tmp_path / "digit.png"), png.getvalue()]
    embeddings = model.encode("image", raws)
    assert embeddings.shape == (5, 16)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(5))
    for row in embeddings[1:]:
        torch.testing.assert_close(row, embeddings[0], rtol=0, atol=1e-6)


def test_grayscale_array_equals_pil_luminance_image() -> None:
    model = image_model()
    gray = np.random.default_rng(1).integers(0, 256, (30, 30), dtype=np.uint8)
    from_array = model.encode("image", [gray, gray[..., None], gray.astype(np.float32) / 255])
    from_pil = model.encode("image", [Image.fromarray(gray, mode="L").convert("RGB")])
    torch.testing.assert_close(from_array, from_pil.expand(3, -1), rtol=0, atol=1e-6)


def test_image_preprocess_equals_open_clip_transform() -> None:
    tower = build_tower(TINY_IMAGE, field="model.towers.image")
    pil = random_pil(2, (50, 37))
    reference = open_clip.image_transform(32, is_train=False)(pil)
    assert torch.equal(tower.preprocess(pil), reference)
    assert tower.preprocess(pil).shape == (3, 32, 32)


def test_augment_switches_to_random_train_transform_but_encode_does_not() -> None:
    model = image_model(augmentation={"scale": [0.3, 0.6]})
    tower = model.towers["image"]
    pil = random_pil(3)
    plain = model.encode("image", [pil])
    torch.manual_seed(0)
    first, second = tower.preprocess(pil, augment=True), tower.preprocess(pil, augment=True)
    assert first.shape == (3, 32, 32) and not torch.equal(first, second)
    assert torch.equal(model.encode("image", [pil]), plain)
    assert torch.equal(tower.preprocess(pil), tower.preprocess(pil))
    assert torch.equal(tower.preprocess(pil), model.tower("image").preprocess(pil, augment=False))


@pytest.mark.parametrize(
    ("towers", "modality", "raws"),
    [
        ({"image": TINY_IMAGE}, "image", [random_pil(i) for i in range(5)]),
        ({"text": TINY_TEXT}, "text", SENTENCES[:5]),
        (
            {"text": {"type": "text", "backend": "hf", "path": "HF", "pooling": "mean"}},
            "text",
            ["a seven", "le chiffre sept sept sept", "die", "digit three the", "a"],
        ),
    ],
    ids=["image", "open_clip-text", "hf-text-padded"],
)
def test_batch_composition_does_not_change_embeddings(
    towers: dict, modality: str, raws: list, hf_dir: Path
) -> None:
    towers = {
        m: {**c, "path": str(hf_dir)} if c.get("path") == "HF" else c for m, c in towers.items()
    }
    model = AlignmentModel.from_config({"dim": 16, "towers": towers})
    together = model.encode(modality, raws)
    alone = model.encode(modality, raws, batch_size=1)
    reordered = model.encode(modality, raws[::-1], batch_size=2).flip(0)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(len(raws)))
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    torch.testing.assert_close(reordered, together, rtol=0, atol=1e-5)


def test_bad_image_inputs_raise_clear_errors(tmp_path: Path) -> None:
    model = image_model()
    with pytest.raises(ValueError, match=r"shape \(8, 8, 2\).*HxWx3"):
        model.encode("image", [np.zeros((8, 8, 2), np.uint8)])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken.png"):
        model.encode("image", [str(tmp_path / "broken.png")])
    with pytest.raises(ValueError, match=r"missing.png"):
        model.encode("image", [tmp_path / "missing.png"])
    with pytest.raises(TypeError, match=r"got a int.*PIL image"):
        model.encode("image", [3])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model.encode("image", [np.full((8, 8), 3.0)])
    with pytest.raises(ValueError, match=r"raws is empty"):
        model.encode("image", [])
    with pytest.raises(TypeError, match=r"list of samples"):
        model.encode("image", random_pil(0))


def test_text_wrong_inputs_raise_clear_errors() -> None:
    model = AlignmentModel.from_config({"dim": 8, "towers": {"caption": TINY_TEXT}})
    with pytest.raises(TypeError, match=r"model.towers.caption: text tower expects a str"):
        model.encode("caption", [b"bytes"])
    with pytest.raises(TypeError, match=r"list of samples"):
        model.encode("caption", "one caption")
    with pytest.raises(KeyError, match=r"unknown modality 'text'.*caption"):
        model.encode("text", ["a"])


def test_bpe_tokenizer_equals_open_clip_tokenize() -> None:
    tower = build_tower(TINY_TEXT, field="model.towers.text")
    text = "A handwritten SEVEN, twice!"
    expected = open_clip.get_tokenizer("ViT-B-32", context_length=16)([text])[0]
    assert torch.equal(tower.preprocess(text), expected)
    long = tower.preprocess(" ".join(["seven"] * 40))
    assert long.shape == (16,) and long[-1] == 49407  # truncated, ends with end-of-text


def test_open_clip_text_checkpoint_matches_clip_encode_text(tmp_path: Path) -> None:
    clip = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=VISION_CFG,
        text_cfg={"context_length": 16, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    tower = build_tower(
        {**TINY_TEXT, "embed_dim": 24, "checkpoint": str(tmp_path / "clip.pt")},
        field="model.towers.text",
    ).eval()
    tokens = open_clip.tokenize(SENTENCES[:3], context_length=16)
    expected = clip.encode_text(tokens)
    actual = tower(tower.collate([tower.preprocess(text) for text in SENTENCES[:3]]))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_image_tower_loads_full_and_visual_checkpoints(tmp_path: Path) -> None:
    clip = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=VISION_CFG,
        text_cfg={"context_length": 16, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "full.pt")
    save_file(clip.visual.state_dict(), str(tmp_path / "visual.safetensors"))
    images = torch.randn(2, 3, 32, 32)
    for name in ("full.pt", "visual.safetensors"):
        tower = build_tower(
            {**TINY_IMAGE, "checkpoint": str(tmp_path / name)}, field="model.towers.image"
        ).eval()
        for key, value in clip.visual.state_dict().items():
            assert torch.equal(tower.visual.state_dict()[key], value), key
        torch.testing.assert_close(tower(images), clip.encode_image(images), rtol=0, atol=0)


def test_mismatched_or_missing_checkpoint_names_the_field(tmp_path: Path) -> None:
    other = open_clip.model._build_vision_tower(24, {**VISION_CFG, "width": 32, "layers": 3})
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError) as error:
        build_tower(
            {**TINY_IMAGE, "checkpoint": str(tmp_path / "other.safetensors")},
            field="model.towers.image",
        )
    message = str(error.value)
    assert "model.towers.image.checkpoint" in message
    assert "unexpected keys (" in message and "transformer.resblocks.2" in message
    assert "shape mismatches" in message and "conv1.weight (32, 3, 8, 8)" in message
    with pytest.raises(ConfigError) as error:
        build_tower(
            {**TINY_IMAGE, "checkpoint": str(tmp_path / "nope.pt")}, field="model.towers.image"
        )
    message = str(error.value)
    assert "nope.pt does not exist (model.towers.image.checkpoint); " in message
    # what to do, as every one-line error says: a local file (nothing is downloaded) or none
    assert "; give the path of a local checkpoint file" in message
    assert "leave out checkpoint" in message


def test_image_config_errors_name_fields() -> None:
    with pytest.raises(ConfigError, match=r"model.towers.image.vision_cfg: unknown key\(s\) depth"):
        build_tower({**TINY_IMAGE, "vision_cfg": {"depth": 2}}, field="model.towers.image")
    with pytest.raises(ConfigError, match=r"model.towers.image.embed_dim"):
        build_tower({"type": "image", "vision_cfg": VISION_CFG}, field="model.towers.image")
    with pytest.raises(ConfigError, match=r"model.towers.image.model: 'hf-hub:x/y'"):
        build_tower({"type": "image", "model": "hf-hub:x/y"}, field="model.towers.image")
    with pytest.raises(ConfigError, match=r"timm_model_pretrained: would download"):
        build_tower(
            {
                **TINY_IMAGE,
                "vision_cfg": {"timm_model_name": "test_resnet", "timm_model_pretrained": True},
            },
            field="model.towers.image",
        )
    with pytest.raises(ConfigError, match=r"model.towers.image.type: unknown tower type 'imag'"):
        build_tower({"type": "imag"}, field="model.towers.image")


@pytest.mark.parametrize(
    "tower",
    [
        {
            "type": "image",
            "model": "RN50",
            "image_size": 32,
            "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
        },
        {
            "type": "image",
            "embed_dim": 24,
            "image_size": 32,
            "vision_cfg": {"timm_model_name": "test_convnext"},
        },
    ],
    ids=["modified-resnet", "timm-convnext"],
)
def test_resnet_and_timm_backbones(tower: dict) -> None:
    built = build_tower(tower, field="model.towers.image").eval()
    out = built(built.collate([built.preprocess(random_pil(i)) for i in range(2)]))
    assert out.shape == (2, built.width)
    assert built.width == (1024 if tower.get("model") == "RN50" else 24)


def test_hf_text_tower_weights_and_pooling_match_transformers(hf_dir: Path) -> None:
    reference = transformers.BertModel.from_pretrained(hf_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = ["a handwritten seven", "le chiffre sept sept"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = {
        "cls": hidden[:, 0],
        "mean": (hidden * mask).sum(1) / mask.sum(1),
        "eos": hidden[torch.arange(2), batch["attention_mask"].sum(1) - 1],
    }
    for pooling, want in expected.items():
        tower = build_tower(
            {"type": "text", "backend": "hf", "path": str(hf_dir), "pooling": pooling},
            field="model.towers.text",
        ).eval()
        assert tower.width == 32
        for key, value in reference.state_dict().items():
            assert torch.equal(tower.encoder.module.state_dict()[key], value), key
        got = tower(tower.collate([tower.preprocess(text) for text in texts]))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_hf_truncation_and_missing_path(hf_dir: Path, tmp_path: Path) -> None:
    tower = build_tower(
        {"type": "text", "backend": "hf", "path": str(hf_dir), "context_length": 5},
        field="model.towers.text",
    )
    ids = tower.preprocess("a the handwritten digit seven three")
    assert len(ids) == 5 and ids[0] == 2 and ids[-1] == 3  # [CLS] ... [SEP]
    with pytest.raises(ConfigError, match=r"model.towers.text.path: .*nowhere is not a directory"):
        build_tower(
            {"type": "text", "backend": "hf", "path": str(tmp_path / "nowhere")},
            field="model.towers.text",
        )
    with pytest.raises(ConfigError, match=r"model.towers.text.*pooling.*do not apply"):
        build_tower({**TINY_TEXT, "pooling": "mean"}, field="model.towers.text")


def test_sentencepiece_tokenizer_sizes_the_vocabulary(spm_file: Path) -> None:
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    tower = build_tower(
        {
            "type": "text",
            "tokenizer": str(spm_file),
            "width": 16,
            "heads": 2,
            "layers": 1,
            "context_length": 24,
        },
        field="model.towers.text",
    ).eval()
    assert tower.encoder.module.token_embedding.num_embeddings == processor.get_piece_size()
    text = "die Ziffer sieben"
    pieces = processor.encode(text)
    ids = tower.preprocess(text)
    assert ids[: len(pieces) + 1].tolist() == [*pieces, processor.eos_id()]
    assert ids.shape == (24,) and len(pieces) < 23
    long = tower.preprocess(" ".join(SENTENCES))
    assert (
        long[-1] == processor.eos_id()
        and long[:-1].tolist() == processor.encode(" ".join(SENTENCES))[:23]
    )
    batch = tower.collate([tower.preprocess(t) for t in ("le chiffre sept", "la cifra siete")])
    assert tower(batch).shape == (2, 16)  # no text projection: width = transformer width


def test_sentencepiece_missing_file_names_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.towers.text.tokenizer: .*spm.model does not"):
        build_tower(
            {**TINY_TEXT, "tokenizer": str(tmp_path / "spm.model")}, field="model.towers.text"
        )
