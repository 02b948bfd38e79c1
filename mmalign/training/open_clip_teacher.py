"""A raw open_clip model as the ``distill`` term's teacher, read from a local path.

``teacher:`` may name an open_clip model instead of a saved mmalign model: a folder with
``open_clip_config.json`` and a checkpoint (the hf-hub layout; ``local-dir:DIR`` too), a
repository of the local Hugging Face cache (``hf-hub:ORG/NAME``), or a checkpoint file with
``teacher_model: <open_clip name>``. Nothing is downloaded. :func:`open_clip_teacher_config`
turns it into an mmalign model config whose towers are the open_clip model's encoders (the
image and text towers' ``pretrained:`` / ``model`` + ``checkpoint`` loading of
:mod:`mmalign.towers.pretrained`), one per student modality (``teacher_encoders``; default:
the student's ``image`` and ``text`` towers), without projections and with the checkpoint's
temperature: its similarities are open_clip's ``encode_image`` / ``encode_text`` logits.

Example:
    >>> from mmalign.config.terms import term_config
    >>> term = term_config({"type": "distill", "teacher": "runs/demo/digits/model"})
    >>> open_clip_teacher_config(term, {"image": "image", "text": "text"}) is None  # mmalign
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmalign.config.terms import DistillTerm
from mmalign.errors import ConfigError
from mmalign.towers.pretrained import OPEN_CLIP_CONFIG, resolve_pretrained

WHERE = "model.objective.terms: distill teacher"


def _source(term: DistillTerm) -> tuple[dict[str, Any], int] | None:
    """The tower keys that load the open_clip teacher and its ``embed_dim`` (``None``: the
    teacher is an mmalign model directory)."""
    if term.teacher_model is not None:
        import open_clip

        model_cfg = open_clip.get_model_config(term.teacher_model)
        if model_cfg is None:
            raise ConfigError(
                f"{WHERE}: teacher_model {term.teacher_model!r} is not an open_clip model name; "
                "use a name of open_clip.list_models() or register its config"
            )
        if not Path(term.teacher).is_file():
            raise ConfigError(
                f"{WHERE}: {term.teacher} is not a file; with teacher_model, teacher is the "
                "open_clip checkpoint file"
            )
        return {"model": term.teacher_model, "checkpoint": term.teacher}, model_cfg["embed_dim"]
    spec = term.teacher
    if not spec.startswith(("local-dir:", "hf-hub:")):
        if not (Path(spec) / OPEN_CLIP_CONFIG).is_file():
            return None
        spec = f"local-dir:{spec}"
    source = resolve_pretrained(spec, WHERE)
    return {"pretrained": spec}, int(source.model_cfg["embed_dim"])


def open_clip_teacher_config(
    term: DistillTerm, student_types: Mapping[str, str]
) -> dict[str, Any] | None:
    """The mmalign model config of ``term``'s open_clip teacher (``None`` when the teacher is
    a saved mmalign model); ``student_types`` maps the student's modalities to tower types."""
    found = _source(term)
    if found is None:
        return None
    keys, dim = found
    encoders: Mapping[str, str] | None = term.teacher_encoders
    if encoders is None:
        encoders = {m: kind for m, kind in student_types.items() if kind in ("image", "text")}
    unknown = sorted(set(encoders) - set(student_types))
    if unknown:
        raise ConfigError(
            f"{WHERE}: teacher_encoders names {unknown}, which the student has no tower for; "
            f"use the student's modalities {list(student_types)}"
        )
    towers = {modality: {"type": kind, **keys} for modality, kind in encoders.items()}
    return {"dim": dim, "projection": "none", "towers": towers}
