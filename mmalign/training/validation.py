"""Periodic validation: loss, retrieval recall@1/5 and zero-shot accuracy on ``data.val``.

Every process reads its own part of the validation shards (the same number of full batches
on every rank, so the objective's all-gather sees the same global batches as in training);
embeddings are gathered and the main process computes

- ``val/loss``: the objective on each validation batch, averaged;
- retrieval between modalities with :func:`mmalign.eval.retrieval_metrics`
  (``val/R@1/image->text``, ...) for pairwise objectives, or Symile's N-way retrieval of each
  modality from the product of the others (``val/R@1/*->image``) for Symile models, and
  ``val/R@1/mean``, ``val/R@5/mean`` over all directions;
- zero-shot accuracy from ``data.classes`` (``val/zeroshot/top1``, ``.../top5``,
  ``.../balanced_accuracy``) when ``eval.zeroshot_modality`` is set.

The metrics are broadcast to every process.

Example:
    >>> directions({"a": None, "b": None}, None)
    [('a', 'b'), ('b', 'a')]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch import Tensor

from mmalign.config import Config
from mmalign.eval.classification import classification_metrics
from mmalign.eval.retrieval import nway_retrieval_metrics, retrieval_metrics
from mmalign.eval.zeroshot import ZeroShotClassifier, load_classes

KS = (1, 5)


def directions(
    modalities: dict[str, Any] | Sequence[str], pairs: Sequence[tuple[str, str]] | None
) -> list[tuple[str, str]]:
    """(query, gallery) pairs: ``eval.retrieval_pairs`` or every ordered pair."""
    if pairs is not None:
        return [tuple(pair) for pair in pairs]
    return list(itertools.permutations(list(modalities), 2))


def _pairwise_recall(
    embeddings: dict[str, Tensor], present: Tensor, names: list[str], pairs: list[tuple[str, str]]
) -> dict[str, float]:
    metrics = {}
    for query, gallery in pairs:
        both = present[:, names.index(query)] & present[:, names.index(gallery)]
        if both.sum() < 2:
            continue
        result = retrieval_metrics(embeddings[query][both], embeddings[gallery][both], ks=KS)
        for k in KS:
            metrics[f"val/R@{k}/{query}->{gallery}"] = result[f"q2g/R@{k}"]
    return metrics


def _nway_recall(
    embeddings: dict[str, Tensor], present: Tensor, names: list[str]
) -> dict[str, float]:
    complete = present.all(dim=1)
    if complete.sum() < 2 or len(names) < 2:
        return {}
    rows = {name: embeddings[name][complete] for name in names}
    metrics = {}
    for target in names:
        result = nway_retrieval_metrics(rows, target, ks=KS)
        for k in KS:
            metrics[f"val/R@{k}/*->{target}"] = result[f"R@{k}"]
    return metrics


def _with_means(metrics: dict[str, float]) -> dict[str, float]:
    for k in KS:
        values = [v for key, v in metrics.items() if key.startswith(f"val/R@{k}/")]
        if values:
            metrics[f"val/R@{k}/mean"] = sum(values) / len(values)
    return metrics


class Validator:
    """Validation of a training run (see the module docstring).

    ``make_loader(split, label_field)`` returns this rank's loader of ``data.<split>``.
    """

    def __init__(self, config: Config, make_loader: Callable[..., Any]) -> None:
        self.config = config
        self.make_loader = make_loader
        query = config.eval.zeroshot_modality
        self.zeroshot_queries = [query] if isinstance(query, str) else list(query or [])
        self.classes = (
            load_classes(config.data.classes, config.eval.zeroshot_language)
            if self.zeroshot_queries and config.data.classes
            else None
        )

    def _batches(self, accelerator: Any) -> list[dict[str, Any]]:
        """This rank's batches, cut to the count every rank has (collectives stay aligned)."""
        per_batch = self.config.data.batch_size * accelerator.num_processes
        wanted = math.ceil(self.config.eval.max_samples / per_batch)
        label_field = self.config.data.label_field if self.classes is not None else None
        batches = list(itertools.islice(self.make_loader("val", label_field), wanted))
        count = torch.tensor([len(batches)], device=accelerator.device)
        if accelerator.num_processes > 1:
            count = accelerator.gather(count).min()
        return batches[: int(count)]

    @torch.no_grad()
    def _embed(
        self, accelerator: Any, model: Any, batches: list[dict[str, Any]], generator: Any
    ) -> tuple[dict[str, Tensor], Tensor, Tensor | None, float]:
        """Gathered embeddings, presence, labels and the mean loss of the batches."""
        device = accelerator.device
        parts: dict[str, list[Tensor]] = {name: [] for name in model.modalities}
        masks, labels, losses = [], [], []
        for batch in batches:
            inputs = {
                name: model.towers[name].move_to(value, device)
                for name, value in batch["inputs"].items()
            }
            present = batch["present"].to(device)
            with accelerator.autocast():
                embeddings = model(inputs, present=present)
                losses.append(model.loss(embeddings, present=present, generator=generator()).loss)
            for name in model.modalities:
                parts[name].append(embeddings[name].float())
            masks.append(present)
            if batch.get("labels") is not None:
                labels.append(batch["labels"].to(device))
        gathered = {
            name: accelerator.gather(torch.cat(chunks)).cpu() for name, chunks in parts.items()
        }
        present = accelerator.gather(torch.cat(masks)).cpu()
        label_tensor = accelerator.gather(torch.cat(labels)).cpu() if labels else None
        loss = accelerator.gather(torch.stack(losses).float().mean().reshape(1)).mean()
        return gathered, present, label_tensor, float(loss)

    def _zeroshot(
        self, model: Any, embeddings: dict[str, Tensor], present: Tensor, labels: Tensor | None
    ) -> dict[str, float]:
        if self.classes is None or labels is None:
            return {}
        classnames, prompts = self.classes
        text = self.config.eval.zeroshot_text or next(
            name for name, tower in self.config.model.towers.items() if tower["type"] == "text"
        )
        classifier = ZeroShotClassifier(model, prompts, text, classnames=classnames)
        names = list(model.modalities)
        columns = {name: present[:, names.index(name)] for name in self.zeroshot_queries}
        usable = (labels >= 0) & torch.stack(list(columns.values())).any(dim=0)
        if not usable.any():
            return {}
        scores = classifier.scores_from_embeddings(
            {name: embeddings[name][usable] for name in self.zeroshot_queries},
            {name: mask[usable] for name, mask in columns.items()},
        )
        result = classification_metrics(scores, labels[usable], classnames, KS)
        keys = [f"top{k}" for k in KS if k <= len(classnames)] + ["balanced_accuracy"]
        return {f"val/zeroshot/{key}": result[key] for key in keys if key in result}

    def __call__(
        self, accelerator: Any, model: Any, generator: Callable[[], Any]
    ) -> dict[str, float]:
        """Validate ``model`` (unwrapped); a collective call. Returns the metrics (all ranks)."""
        model.eval()
        try:
            batches = self._batches(accelerator)
            metrics: dict[str, float] = {}
            if batches:
                embeddings, present, labels, loss = self._embed(
                    accelerator, model, batches, generator
                )
                if accelerator.is_main_process:
                    metrics = self._metrics(model, embeddings, present, labels, loss)
            shared = [metrics]
            if accelerator.num_processes > 1:
                broadcast_object_list(shared, from_process=0)
            return shared[0]
        finally:
            model.train()

    def _metrics(
        self,
        model: Any,
        embeddings: dict[str, Tensor],
        present: Tensor,
        labels: Tensor | None,
        loss: float,
    ) -> dict[str, float]:
        names = list(model.modalities)
        if model.config.objective.name == "symile":
            recall = _nway_recall(embeddings, present, names)
        else:
            pairs = directions(names, self.config.eval.retrieval_pairs)
            recall = _pairwise_recall(embeddings, present, names, pairs)
        metrics = {"val/loss": loss, "val/samples": float(present.shape[0]), **_with_means(recall)}
        metrics.update(self._zeroshot(model, embeddings, present, labels))
        return metrics
