"""Scoring and prediction with a trained model.

A model trained at S×S sees every image resized to S×S; its H/4×W/4 logits are upsampled straight
to the mask's native size and scored there (`msf eval` always scores at the data's resolution,
512×512 for CelebAMask-HQ, whatever size the model was trained at).
"""
from __future__ import annotations

import contextlib
import time

import torch
from tqdm import tqdm

from msf.export import resize_to_model
from msf.metrics import FScoreMeter, count_ids
from msf.model import MicroSegFormer


def native_cpu_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX, as oneDNN sees it;
    ONEDNN_MAX_CPU_ISA=AVX2 hides it). Without it CPU bf16 is emulated and slower than fp32."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast dtype a run really uses: "auto" is bf16 on CUDA and on CPUs with native bf16,
    "off" (fp32) elsewhere; fp16 autocast is refused on the CPU."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16()) else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"--amp fp16 needs a CUDA device (this run is on {device.type}); use bf16 or off")
    return amp


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The 16-bit dtype autocast runs in for `amp` ("auto" resolved by `resolve_amp`), None without autocast."""
    amp = resolve_amp(amp, device)
    if amp == "off" or device.type not in ("cuda", "cpu"):
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast for `amp` ("auto" resolved by `resolve_amp`): bf16/fp16 on CUDA, bf16 on the CPU."""
    dtype = amp_dtype(device, amp)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def compile_for_inference(model: MicroSegFormer, batch: int, input_size: int, device: torch.device,
                          amp: str = "off") -> float:
    """Put the model's low-resolution logits (every forward of `predict_variants`) under
    torch.compile, one graph with dynamic shapes (any batch, any input size, no recompile), and
    compile it now on a batch of zeros: returns the compile time in seconds, so that scoring
    times are reported without it (`msf eval/predict --compile`)."""
    model.low_res_logits = torch.compile(model.low_res_logits, fullgraph=True, dynamic=True)
    # Not a batch of 3: Dynamo gives equal sizes one symbol ("duck sizing"), so a batch of 3 would
    # share the image channels' symbol, be fixed at 3 with it, and every other batch would recompile.
    warm_batch = 2 if batch == 3 else batch
    started = time.perf_counter()
    with torch.no_grad(), autocast_for(device, amp):
        model.low_res_logits(torch.zeros(warm_batch, 3, input_size, input_size, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


@torch.no_grad()
def predict_batch_variants(model: MicroSegFormer, images: torch.Tensor, input_size: int, amp: str = "off",
                           ttas: tuple[str, ...] = ("none",)) -> dict[str, torch.Tensor]:
    """B×H×W ids for B×3×H×W normalised images, the model run at input_size×input_size, for each
    test-time augmentation in `ttas` ("none", "flip"; `MicroSegFormer.predict_variants`)."""
    size = tuple(images.shape[-2:])
    with autocast_for(images.device, amp):
        return model.predict_variants(resize_to_model(images, input_size), size, ttas)


def predict_batch(model: MicroSegFormer, images: torch.Tensor, input_size: int, amp: str = "off",
                  tta: str = "none") -> torch.Tensor:
    return predict_batch_variants(model, images, input_size, amp, (tta,))[tta]


@torch.no_grad()
def evaluate_meters(model: MicroSegFormer, batches, device: torch.device, input_size: int, amp: str = "off",
                    progress: bool = False, desc: str = "eval", ttas: tuple[str, ...] = ("none",)) -> dict[str, FScoreMeter]:
    """The scores' running sums, one meter per test-time augmentation in `ttas`, over an iterable of
    (normalised image, mask) batches; a multi-process run sums the meters of its processes before
    `compute()`."""
    was_training = model.training
    model.eval()
    meters = {tta: FScoreMeter(model.config.num_classes) for tta in ttas}
    for images, masks in tqdm(batches, desc=desc, disable=not progress, leave=False):
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        for tta, ids in predict_batch_variants(model, images, input_size, amp, ttas).items():
            meters[tta].update(ids, masks)
    model.train(was_training)
    return meters


def evaluate_meter(model: MicroSegFormer, batches, device: torch.device, input_size: int, amp: str = "off",
                   progress: bool = False, desc: str = "eval") -> FScoreMeter:
    return evaluate_meters(model, batches, device, input_size, amp, progress, desc)["none"]


def evaluate(model: MicroSegFormer, batches, device: torch.device, input_size: int, amp: str = "off",
             progress: bool = False, desc: str = "eval", tta: str = "none") -> dict:
    """F-score, per-class F1 and mIoU over an iterable of (normalised image, mask) batches, without
    test-time augmentation; with `tta="flip"` the same scores with it under "tta_flip"."""
    ttas = ("none",) if tta == "none" else ("none", tta)
    meters = evaluate_meters(model, batches, device, input_size, amp, progress, desc, ttas)
    scores = meters["none"].compute()
    if tta != "none":
        scores[f"tta_{tta}"] = meters[tta].compute()
    return scores


@torch.no_grad()
def constant_prediction_meter(class_id: int, batches) -> FScoreMeter:
    """The scores of predicting `class_id` at every pixel: the floor a trained model must beat."""
    meter = FScoreMeter()
    for _, masks in batches:
        meter.update(torch.full_like(masks, class_id), masks)
    return meter


@torch.no_grad()
def class_pixel_counts(batches, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixels of each class id 0..num_classes-1 over the masks of an iterable of batches (float64)."""
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for _, masks in batches:
        counts += count_ids(masks.to(counts.device), num_classes)
    return counts
