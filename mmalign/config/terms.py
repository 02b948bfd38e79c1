"""Auxiliary loss terms of ``model.objective.terms``: ``two_view``, ``distill`` and ``queue``.

Each entry is ``{type: ..., weight: ..., <its own fields>}``; the loss of a step is the main
objective's plus ``sum_t weight_t * L_t`` (:mod:`mmalign.objectives.terms`). Unknown keys are
errors naming the field.

Example:
    >>> from mmalign.config.terms import term_config
    >>> term = term_config({"type": "two_view", "modality": "graph", "weight": 0.5})
    >>> term.name, term.temperature
    ('two_view_graph', 0.2)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Term(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """The term's weight in ``loss = main + sum_t weight_t * L_t``."""

    @property
    def name(self) -> str:
        """The term's name in the logs (``train/loss/<name>``)."""
        raise NotImplementedError


class TwoViewTerm(_Term):
    """NT-Xent (SimCLR) between two augmentations of one modality's inputs; the loader makes
    both views with the tower's train-time augmentation (``preprocess(raw, augment=True)``),
    seeded per record."""

    type: Literal["two_view"]
    modality: str
    """The modality whose inputs get two views (e.g. ``graph``: GraphCL's augmentations)."""
    temperature: float = Field(default=0.2, gt=0, allow_inf_nan=False)
    """NT-Xent temperature (SimCLR uses 0.1-0.5)."""

    @property
    def name(self) -> str:
        return f"two_view_{self.modality}"


class DistillTerm(_Term):
    """KL between a frozen teacher's and the student's softmax over the batch, per pair."""

    type: Literal["distill"]
    teacher: str
    """The frozen teacher, read from disk only: a saved mmalign model directory
    (``save_pretrained`` / ``--output``); an open_clip folder (``open_clip_config.json`` and a
    checkpoint, the hf-hub layout; also ``local-dir:DIR``, or ``hf-hub:ORG/NAME`` from the local
    Hugging Face cache); or, with ``teacher_model``, an open_clip checkpoint file. Its towers
    must take the same preprocessed inputs as the student's."""
    teacher_model: str | None = None
    """The open_clip model name (built-in or registered) of a ``teacher`` checkpoint file."""
    teacher_encoders: dict[str, Literal["image", "text"]] | None = None
    """An open_clip teacher: which of its encoders embeds each student modality
    (``{photo: image, caption: text}``); default: each student tower of type ``image`` or
    ``text`` gets that encoder."""
    temperature: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Softmax temperature of both teacher and student; ``None``: each model's own learned
    temperature (open_clip's ``--distill-model``)."""

    @property
    def name(self) -> str:
        return "distill"


class QueueTerm(_Term):
    """InfoNCE of each pair of the main objective against the batch plus the last ``size``
    gathered embeddings of each modality (MoCo / ALBEF / CrossBatchMemory), no gradient."""

    type: Literal["queue"]
    size: int = Field(ge=1)
    """How many past embeddings of each modality are kept as extra negatives."""

    @property
    def name(self) -> str:
        return "queue"


TermConfig = Annotated[TwoViewTerm | DistillTerm | QueueTerm, Field(discriminator="type")]
"""One entry of ``model.objective.terms``, picked by ``type``."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(TermConfig)


def term_config(value: Any) -> TwoViewTerm | DistillTerm | QueueTerm:
    """Validate one term entry (a dict with ``type``)."""
    result: TwoViewTerm | DistillTerm | QueueTerm = _ADAPTER.validate_python(value)
    return result
