"""The paper's F-score (SPEC §4, the CE7454 Codabench definition), per-class F1 and mIoU, streamed.

F-score: for each image and each class id present in its ground truth,
    P = tp/(tp+fp+1e-7),  R = tp/(tp+fn+1e-7),  F = 2PR/(P+R+1e-7);
the image scores the mean of those F, and the data set the mean over images. A class predicted
but absent from an image's ground truth costs that image nothing directly (it only lowers the
precision of nothing); it does lower the other classes' recall where it stole their pixels.

Beside it, from the data set's summed confusion matrix: per-class F1 = 2tp/(2tp+fp+fn) and
IoU = tp/(tp+fp+fn) for every class that occurs in the ground truth or the predictions; mIoU is
their mean. `FScoreMeter.update` takes one batch at a time, so a data set never sits in memory.
"""
from __future__ import annotations

import torch

from msf.data import CLASS_NAMES, NUM_CLASSES

EPS = 1e-7


def count_ids(ids: torch.Tensor, size: int) -> torch.Tensor:
    """How often each value 0..size-1 occurs in `ids` (int64). Unlike `torch.bincount`, whose
    output length depends on the data, this never reads the maximum back to the host on a GPU."""
    ones = torch.ones((), dtype=torch.long, device=ids.device).expand(ids.numel())
    return torch.zeros(size, dtype=torch.long, device=ids.device).index_add_(0, ids.flatten().long(), ones)


def per_image_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B×K×K counts, [b, true, predicted], from B×H×W id maps."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape")
    b = pred.shape[0]
    pair = target.reshape(b, -1).long() * num_classes + pred.reshape(b, -1).long()
    pair = pair + torch.arange(b, device=pair.device)[:, None] * num_classes * num_classes
    counts = count_ids(pair, b * num_classes * num_classes)
    return counts.reshape(b, num_classes, num_classes)


def image_f_scores(confusion: torch.Tensor) -> torch.Tensor:
    """The paper's per-image F-score from B×K×K confusion counts (float64, length B)."""
    confusion = confusion.double()
    tp = confusion.diagonal(dim1=1, dim2=2)
    gt = confusion.sum(dim=2)
    predicted = confusion.sum(dim=1)
    precision = tp / (predicted + EPS)  # tp / (tp + fp + 1e-7)
    recall = tp / (gt + EPS)            # tp / (tp + fn + 1e-7)
    f = 2 * precision * recall / (precision + recall + EPS)
    present = gt > 0
    return (f * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)


class FScoreMeter:
    """Streaming F-score, per-class F1 and mIoU over batches of predicted and true id maps.

    The running sums stay on the device of the first batch, so scoring a data set on a GPU syncs
    with the host once, in `compute`, not once per batch. `state()` / `load_state()` give the sums
    as one float64 vector, which is what a multi-process run all-reduces.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, class_names: tuple[str, ...] = CLASS_NAMES):
        self.num_classes = num_classes
        self.class_names = class_names
        self.reset()

    def reset(self, device: torch.device | str = "cpu") -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=device)
        self.f_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.image_count = torch.zeros((), dtype=torch.float64, device=device)
        self._fresh = True

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: B×H×W predicted ids and B×H×W ground-truth ids (any device)."""
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        if self._fresh and pred.device != self.confusion.device:
            self.reset(pred.device)
        self._fresh = False
        confusion = per_image_confusion(pred, target.to(pred.device), self.num_classes)
        self.f_sum += image_f_scores(confusion).sum().to(self.f_sum.device)
        self.image_count += pred.shape[0]
        self.confusion += confusion.sum(dim=0).double().to(self.confusion.device)

    @property
    def images(self) -> int:
        return int(self.image_count)

    def state(self) -> torch.Tensor:
        """Every running sum as one float64 vector: [confusion (K·K), F-score sum, images]."""
        return torch.cat([self.confusion.flatten(), self.f_sum[None], self.image_count[None]])

    def load_state(self, state: torch.Tensor) -> None:
        k2 = self.num_classes * self.num_classes
        if state.shape != (k2 + 2,):
            raise ValueError(f"meter state has shape {tuple(state.shape)}, expected ({k2 + 2},)")
        state = state.to(torch.float64)
        self.confusion = state[:k2].reshape(self.num_classes, self.num_classes).clone()
        self.f_sum, self.image_count = state[k2].clone(), state[k2 + 1].clone()
        self._fresh = False

    def merge(self, other: "FScoreMeter") -> None:
        """Fold another meter's counts into this one (e.g. from another process)."""
        self.load_state(self.state() + other.state().to(self.confusion.device))

    def compute(self) -> dict:
        confusion = self.confusion.cpu()
        tp = confusion.diagonal()
        fp = confusion.sum(dim=0) - tp
        fn = confusion.sum(dim=1) - tp
        occurs = (tp + fp + fn) > 0
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=EPS)
        iou = tp / (tp + fp + fn).clamp(min=EPS)
        return {
            "f_score": float(self.f_sum) / max(self.images, 1),
            "miou": float(iou[occurs].mean()) if occurs.any() else 0.0,
            "per_class_f1": {name: float(f1[c]) for c, name in enumerate(self.class_names) if occurs[c]},
            "per_class_iou": {name: float(iou[c]) for c, name in enumerate(self.class_names) if occurs[c]},
            "pixel_accuracy": float(tp.sum() / confusion.sum().clamp(min=1)),
            "images": self.images,
        }
