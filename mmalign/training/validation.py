"""Periodic validation: loss, retrieval recall@1/5/10 and mAP (instance and class level) and
zero-shot accuracy on ``data.val``.

Every process reads its own part of the validation shards
(:func:`mmalign.data.loader_from_config`: the same number of full batches on every rank, so
the objective's all-gather sees the same global batches as in training); embeddings are
gathered and the main process computes

- ``val/loss``: the objective on each validation batch, averaged;
- retrieval between modalities with :func:`mmalign.eval.retrieval.pairwise_recall`
  (``val/instance/R@1/image->text``, ...), or, for objectives that score modalities jointly
  (``objective.scores_jointly``: Symile), :func:`mmalign.eval.retrieval.nway_recall`, each
  modality from the product of the others (``val/instance/R@1/*->image``); ``R@1``, ``R@5``,
  ``R@10`` and ``mAP`` of each direction and their ``.../mean`` over all directions
  (``val/instance/R@1/mean``). ``instance``: a hit is the query's own paired item; when the
  validation records have labels (``data.label_field``), the same at ``class`` level, where a
  hit is any item of the query's class (``val/class/R@1/image->text``,
  ``val/class/R@1/mean``). ``eval.best_metric`` may name any of them;
- zero-shot accuracy from ``data.classes`` (``val/zeroshot/top1``, ``.../top5``,
  ``.../balanced_accuracy``) when ``eval.zeroshot_modality`` is set;
- label-free metrics (:mod:`mmalign.eval.label_free`: ``val/rankme/<m>``,
  ``val/uniformity/<m>``, ``val/alignment/<a>-<b>``, ``val/gap/<a>-<b>`` and their means);
- with ``model.matryoshka``, retrieval at each smaller trained prefix
  (``val/dim16/R@1/mean``, ...).

The metrics are broadcast to every process.

Example:
    >>> directions({"a": None, "b": None}, None)
    [('a', 'b'), ('b', 'a')]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import broadcast_object_list
from torch import Tensor

from mmalign.batch import Batch
from mmalign.config import Config
from mmalign.data import loader_from_config
from mmalign.embeddings import truncate
from mmalign.eval.classification import classification_metrics
from mmalign.eval.label_free import label_free_metrics
from mmalign.eval.retrieval import nway_recall, pairwise_recall
from mmalign.eval.zeroshot import ZeroShotClassifier, load_classes

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mmalign.model import AlignmentModel

KS = (1, 5, 10)
RETRIEVAL_METRICS = (*(f"R@{k}" for k in KS), "mAP")
"""What validation reports of each retrieval direction (and averages over directions)."""
ZEROSHOT_KS = (1, 5)


def directions(
    modalities: dict[str, Any] | Sequence[str], pairs: Sequence[tuple[str, str]] | None
) -> list[tuple[str, str]]:
    """(query, gallery) pairs: ``eval.retrieval_pairs`` or every ordered pair."""
    if pairs is not None:
        return list(pairs)
    return list(itertools.permutations(list(modalities), 2))


def recall_metrics(
    model: AlignmentModel,
    embeddings: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    pairs: Sequence[tuple[str, str]] | None = None,
    labels: Tensor | None = None,
) -> dict[str, float]:
    """``val/{level}/{metric}/{query}->{gallery}`` of every direction and their
    ``val/{level}/{metric}/mean``: N-way (``*->m``) when ``model.objective.scores_jointly``,
    else the ``pairs`` (or every ordered pair of modalities). Level ``instance`` always,
    ``class`` when some of ``labels`` (-1: none) are set.

    Example:
        >>> from mmalign.model import AlignmentModel
        >>> model = AlignmentModel.from_config({"dim": 4, "towers": {
        ...     "a": {"type": "tabular", "in_features": 2},
        ...     "b": {"type": "tabular", "in_features": 2}}})
        >>> every = torch.ones(3, dtype=torch.bool)
        >>> metrics = recall_metrics(model, {"a": torch.eye(3), "b": torch.eye(3)},
        ...                          {"a": every, "b": every}, labels=torch.tensor([0, 0, 1]))
        >>> metrics["val/instance/R@1/a->b"], metrics["val/class/R@1/mean"]
        (1.0, 1.0)
    """
    names = list(embeddings)
    has_labels = labels is not None and bool((labels >= 0).any())
    metrics = {}
    for level in ("instance", "class") if has_labels else ("instance",):
        level_labels = labels if level == "class" else None
        if model.objective.scores_jointly:
            results = nway_recall(embeddings, present, ks=KS, labels=level_labels)
        else:
            ways = directions(names, pairs)
            results = pairwise_recall(embeddings, present, ways, ks=KS, labels=level_labels)
        for metric in RETRIEVAL_METRICS:
            values = {
                f"val/{level}/{metric}/{query}->{gallery}": result[metric]
                for (query, gallery), result in results.items()
            }
            if values:
                values[f"val/{level}/{metric}/mean"] = sum(values.values()) / len(values)
            metrics.update(values)
    return metrics


class Validator:
    """Validation of a training run on ``data.val`` (see the module docstring).

    Example:
        >>> validator = Validator(config)  # doctest: +SKIP
        >>> validator(accelerator, model, make_generator)["val/instance/R@1/mean"]  # doctest: +SKIP
        0.41
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        query = config.eval.zeroshot_modality
        self.zeroshot_queries = [query] if isinstance(query, str) else list(query or [])
        self.classes = (
            load_classes(config.data.classes, config.eval.zeroshot_language)
            if self.zeroshot_queries and config.data.classes
            else None
        )

    def _batches(self, accelerator: Accelerator, model: AlignmentModel) -> list[Batch]:
        """This rank's batches, cut to the count every rank has (collectives stay aligned)."""
        per_batch = self.config.data.batch_size * accelerator.num_processes
        wanted = math.ceil(self.config.eval.max_samples / per_batch)
        loader = loader_from_config(
            self.config.data,
            model.towers,
            "val",
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            label_field=self.config.data.label_field,
        )
        batches = list(itertools.islice(loader, wanted))
        count = torch.tensor([len(batches)], device=accelerator.device)
        if accelerator.num_processes > 1:
            count = accelerator.gather(count).min()
        return batches[: int(count)]

    @staticmethod
    def _gathered(accelerator: Accelerator, chunks: list[Tensor]) -> Tensor:
        return accelerator.gather(torch.cat(chunks)).cpu()

    @torch.no_grad()
    def _embed(
        self,
        accelerator: Accelerator,
        model: AlignmentModel,
        batches: list[Batch],
        generator: Callable[[], torch.Generator | None],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None, float]:
        """Gathered embeddings and presence (by modality), labels and the mean loss."""
        names = list(model.modalities)
        parts: dict[str, list[Tensor]] = {name: [] for name in names}
        masks, labels, losses = [], [], []
        for batch in batches:
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                embeddings = model(batch)
                losses.append(model.loss(embeddings, present=batch, generator=generator()).loss)
            for name in names:
                parts[name].append(embeddings[name].float())
            masks.append(batch.present_for(names))
            if batch.labels is not None:
                labels.append(batch.labels)
        gathered = {name: self._gathered(accelerator, parts[name]) for name in names}
        present = dict(zip(names, self._gathered(accelerator, masks).unbind(1), strict=True))
        label_tensor = self._gathered(accelerator, labels) if labels else None
        loss = accelerator.gather(torch.stack(losses).float().mean().reshape(1)).mean()
        return gathered, present, label_tensor, float(loss)

    def _classifier(self, model: AlignmentModel) -> ZeroShotClassifier | None:
        """The zero-shot classifier of ``data.classes`` (``None`` without); built on every
        rank, since a sharded (FSDP) text tower needs every rank for its forward."""
        if self.classes is None:
            return None
        classnames, prompts = self.classes
        text = self.config.eval.zeroshot_text or self.config.model.modalities_of_type("text")[0]
        return ZeroShotClassifier(model, prompts, text, classnames=classnames)

    def _zeroshot(
        self,
        classifier: ZeroShotClassifier | None,
        embeddings: dict[str, Tensor],
        present: dict[str, Tensor],
        labels: Tensor | None,
    ) -> dict[str, float]:
        if classifier is None or labels is None:
            return {}
        classnames = classifier.classnames
        columns = {name: present[name] for name in self.zeroshot_queries}
        usable = (labels >= 0) & torch.stack(list(columns.values())).any(dim=0)
        if not usable.any():
            return {}
        scores = classifier.scores_from_embeddings(
            {name: embeddings[name][usable] for name in self.zeroshot_queries},
            {name: mask[usable] for name, mask in columns.items()},
        )
        result = classification_metrics(scores, labels[usable], classnames, ZEROSHOT_KS)
        classes = classifier.class_embeddings.shape[0]
        keys = [f"top{k}" for k in ZEROSHOT_KS if k <= classes] + ["balanced_accuracy"]
        return {f"val/zeroshot/{key}": result[key] for key in keys if key in result}

    def __call__(
        self,
        accelerator: Accelerator,
        model: AlignmentModel,
        generator: Callable[[], torch.Generator | None],
    ) -> dict[str, float]:
        """Validate ``model`` (unwrapped); a collective call. Returns the metrics (all ranks)."""
        model.eval()
        try:
            batches = self._batches(accelerator, model)
            metrics: dict[str, float] = {}
            if batches:
                embeddings, present, labels, loss = self._embed(
                    accelerator, model, batches, generator
                )
                classifier = self._classifier(model)
                if accelerator.is_main_process:
                    metrics = self._metrics(model, classifier, embeddings, present, labels, loss)
            shared = [metrics]
            if accelerator.num_processes > 1:
                broadcast_object_list(shared, from_process=0)
            return shared[0]
        finally:
            model.train()

    def _metrics(
        self,
        model: AlignmentModel,
        classifier: ZeroShotClassifier | None,
        embeddings: dict[str, Tensor],
        present: dict[str, Tensor],
        labels: Tensor | None,
        loss: float,
    ) -> dict[str, float]:
        pairs = self.config.eval.retrieval_pairs
        recall = recall_metrics(model, embeddings, present, pairs, labels)
        samples = float(next(iter(present.values())).shape[0])
        metrics = {"val/loss": loss, "val/samples": samples, **recall}
        metrics.update(label_free_metrics(embeddings, present))
        for dim in (model.config.matryoshka or [])[:-1]:
            prefixes = {name: truncate(value, dim) for name, value in embeddings.items()}
            pairs = self.config.eval.retrieval_pairs
            for key, value in recall_metrics(model, prefixes, present, pairs).items():
                metrics[key.replace("val/", f"val/dim{dim}/", 1)] = value
        metrics.update(self._zeroshot(classifier, embeddings, present, labels))
        return metrics
