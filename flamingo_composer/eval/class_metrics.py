"""Scores of ranked class names, as the reference's evaluate_classification computes them: top-1 (and top-k)
accuracy compared by class *name* (ImageNet's list has duplicate names), and HatefulMemes' ROC-AUC from each
query's probability of the greater class name ("yes")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata


def summarize(logprobs: torch.Tensor, class_names: Sequence[str], k: int) -> list[tuple[tuple[int, ...], float]]:
    """(B, C) class log-likelihoods -> per query (top-k class indices, best first; the reference's `pred_score`
    turned into the greater class's probability: p = softmax prob of the top-1 class, kept when it is the greater
    name, else 1 - p)."""
    k = min(k, logprobs.shape[1])
    top_values, top = torch.topk(logprobs, k=k, dim=1)  # (B, k)
    p_top1 = torch.exp(top_values[:, 0] - torch.logsumexp(logprobs, dim=1))  # (B,)
    greater = max(class_names)
    out = []
    for row, p in zip(top.tolist(), p_top1.tolist()):
        out.append((tuple(row), p if class_names[row[0]] == greater else 1.0 - p))
    return out


def top_k_accuracy(predictions: Sequence[Sequence[int]], labels: Sequence[int], class_names: Sequence[str],
                   k: int) -> float:  # fmt: skip
    """% of queries whose label's name is among the names of their first k predicted classes."""
    hits = [class_names[label] in {class_names[c] for c in ranked[:k]} for ranked, label in zip(predictions, labels)]
    return 100.0 * sum(hits) / len(hits)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve x 100 for binary labels (1 = positive), ties counted half (scikit-learn's value);
    NaN when only one class occurs (scikit-learn raises there)."""
    labels_array = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels_array.sum()), int((~labels_array).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))  # average ranks for ties
    u = ranks[labels_array].sum() - positives * (positives + 1) / 2
    return 100.0 * float(u / (positives * negatives))


def classification_score(metric: str, records: Sequence, class_names: Sequence[str]) -> tuple[float, dict]:
    """records: (id, (top-k indices, greater-class probability), (label,)) -> (score, details) for `metric`
    ('Top1Accuracy' also reports top-5 in details; 'ROC_AUC')."""
    predictions = [r[1] for r in records]
    labels = [int(r[2][0]) for r in records]
    if metric == "ROC_AUC":
        greater = class_names.index(max(class_names))
        return roc_auc([label == greater for label in labels], [p[1] for p in predictions]), {}
    if metric == "Top1Accuracy":
        ranked = [p[0] for p in predictions]
        top5 = top_k_accuracy(ranked, labels, class_names, 5)
        return top_k_accuracy(ranked, labels, class_names, 1), {"top5": top5}
    raise ValueError(f"unknown classification metric {metric!r}")
