"""What a training run does for ``model.objective.terms`` (:mod:`mmalign.objectives.terms`):
the loader's second views (``two_view``), the queue's end of step (``queue``) and the frozen
teacher of the ``distill`` term (:mod:`mmalign.objectives.distill`), described here.

``model.objective.terms: [{type: distill, teacher: <dir>}]`` loads a saved mmalign model from
``<dir>``, or an open_clip model from a local folder or checkpoint file
(:mod:`mmalign.training.open_clip_teacher`); never downloaded. Each micro-batch's inputs go
through the teacher once, under ``no_grad`` and in eval mode, for the modalities the teacher
has; its embeddings join the student's as ``<modality>@teacher`` (any ``dim``). Exact
accumulation encodes every micro-batch twice; the teacher's embeddings of the last
micro-batches are kept, so it runs once per micro-batch. Its towers get the student's
preprocessed inputs, so they must preprocess alike (same image size and normalization, same
tokenizer).

Example:
    >>> teacher = load_teacher(model)  # doctest: +SKIP
    >>> sorted(teacher.embed(batch))  # doctest: +SKIP
    ['image@teacher', 'text@teacher']
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmalign.batch import Batch
from mmalign.config.terms import DistillTerm, TwoViewTerm
from mmalign.errors import ConfigError
from mmalign.model import AlignmentModel
from mmalign.objectives.distill import teacher_name
from mmalign.objectives.terms import TermsObjective
from mmalign.training.open_clip_teacher import open_clip_teacher_config


class Teacher:
    """A frozen model and its embeddings of the last ``keep`` micro-batches."""

    def __init__(self, model: AlignmentModel, keep: int = 16) -> None:
        self.model = model.eval().requires_grad_(False)
        self.keep = keep
        self._recent: list[tuple[Batch, dict[str, Tensor]]] = []
        self.calls = 0
        """How many micro-batches the teacher encoded (tests check once per micro-batch)."""

    @torch.no_grad()
    def embed(self, batch: Batch) -> dict[str, Tensor]:
        """``{"<m>@teacher": [B, teacher dim]}`` for the teacher's modalities in ``batch``."""
        for seen, embeddings in self._recent:
            if seen is batch:
                return embeddings
        names = [name for name in batch.modalities if name in self.model.towers]
        sub = replace(
            batch,
            modalities=names,
            inputs={name: batch.inputs[name] for name in names},
            present=batch.present_for(names),
            item_index={k: v for k, v in batch.item_index.items() if k in names},
        )
        self.model.to(batch.present.device)
        embeddings = {teacher_name(name): value for name, value in self.model(sub).items()}
        self.calls += 1
        self._recent = [*self._recent, (batch, embeddings)][-self.keep :]
        return embeddings


def load_teacher(model: AlignmentModel) -> Teacher | None:
    """The teacher of ``model``'s ``distill`` term (``None`` without one); tells the model's
    objective the teacher's temperature."""
    terms = [term for term in model.config.objective.terms if isinstance(term, DistillTerm)]
    if not terms:
        return None
    directory = Path(terms[0].teacher)
    teacher = _teacher_model(terms[0], model)
    shared = [name for name in model.modalities if name in teacher.towers]
    if len(shared) < 2:
        raise ConfigError(
            f"model.objective.terms: distill teacher {directory} has towers "
            f"{teacher.modalities}, which share fewer than two modalities with the student's "
            f"{model.modalities}; use a teacher with the student's modalities"
        )
    assert isinstance(model.objective, TermsObjective)  # a model with terms wraps its objective
    model.objective.teacher_logit_scale = float(teacher.logit_scale_value().detach())
    return Teacher(teacher)


def _teacher_model(term: DistillTerm, student: AlignmentModel) -> AlignmentModel:
    """The teacher ``term`` names: an open_clip model (:mod:`mmalign.training.open_clip_teacher`)
    or a saved mmalign model directory."""
    types = {name: tower.type for name, tower in student.config.towers.items()}
    config = open_clip_teacher_config(term, types)
    if config is not None:
        return AlignmentModel.from_config(config)
    if term.teacher_encoders is not None:
        raise ConfigError(
            f"model.objective.terms: distill teacher_encoders maps an open_clip teacher's "
            f"encoders, but {term.teacher} is not an open_clip folder; remove teacher_encoders"
        )
    try:
        return AlignmentModel.from_pretrained(Path(term.teacher))
    except FileNotFoundError as error:
        raise ConfigError(
            f"model.objective.terms: distill teacher: {error}; give a saved model directory, "
            "an open_clip folder, or an open_clip checkpoint file with teacher_model"
        ) from None


def two_view_modalities(terms: list[Any]) -> list[str]:
    """The modalities that the ``two_view`` terms give a second view (the loader's)."""
    return [term.modality for term in terms if isinstance(term, TwoViewTerm)]


def end_step(model: AlignmentModel) -> None:
    """After an optimizer step: the terms' end of step (the queue takes the step's batch)."""
    if isinstance(model.objective, TermsObjective):
        model.objective.end_step()
