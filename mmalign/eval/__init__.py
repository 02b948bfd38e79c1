"""Evaluation: zero-shot classification, retrieval metrics, embedding diagnostics, reports.

Example:
    >>> import torch
    >>> from mmalign.eval import retrieval_metrics
    >>> retrieval_metrics(torch.eye(3), torch.eye(3), ks=(1,))["g2q/R@1"]
    1.0
"""

from mmalign.eval.classification import classification_metrics, confusion_matrix, topk_accuracy
from mmalign.eval.diagnostics import embedding_diagnostics
from mmalign.eval.report import run_eval
from mmalign.eval.retrieval import nway_retrieval_metrics, retrieval_metrics
from mmalign.eval.zeroshot import ZeroShotClassifier, run_zeroshot

__all__ = [
    "ZeroShotClassifier",
    "classification_metrics",
    "confusion_matrix",
    "embedding_diagnostics",
    "nway_retrieval_metrics",
    "retrieval_metrics",
    "run_eval",
    "run_zeroshot",
    "topk_accuracy",
]
