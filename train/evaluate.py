"""Scoring and prediction with a trained model.

A model trained at S×S sees every image resized to S×S; its H/4×W/4 logits are upsampled straight
to the mask's native size and scored there (`msf eval` always scores at the data's resolution,
512×512 for CelebAMask-HQ, whatever size the model was trained at).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from msf.data import CLASS_NAMES, OVERLAY_PALETTE, DataError, normalize, overlay, read_header, read_image, write_mask
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


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast for `amp` ("auto" resolved by `resolve_amp`): bf16/fp16 on CUDA, bf16 on the CPU."""
    amp = resolve_amp(amp, device)
    if amp == "off" or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


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
    x = images
    if size != (input_size, input_size):
        x = F.interpolate(images, size=(input_size, input_size), mode="bilinear", align_corners=False,
                          antialias=input_size < size[0])
    with autocast_for(images.device, amp):
        return model.predict_variants(x, size, ttas)


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


def prediction_paths(inputs: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """(id mask, overlay) paths in `out_dir` for each input: `<stem>.png` and `<stem>_overlay.png`.

    Inputs whose names would collide (the same stem in two folders, or `a.jpg` beside
    `a_overlay.jpg`) are renamed deterministically: the later input in the list gets `<stem>-2`,
    `-3`, ... . Refused with a DataError: an `--out` that is a file, and any output that would
    replace one of the inputs (a `.png` input inside `--out`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: is a file; give a folder for the masks and overlays")
    taken: set[Path] = set()
    pairs = []
    for path in inputs:
        stem, n = path.stem, 1
        while {out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png"} & taken:
            n += 1
            stem = f"{path.stem}-{n}"
        pair = (out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png")
        taken.update(pair)
        pairs.append(pair)
    def file_id(path: Path) -> tuple[int, int]:  # the same file under any name (links included)
        st = path.stat()
        return st.st_dev, st.st_ino
    input_ids = {file_id(path): path for path in inputs}
    for output in sorted(taken):
        hit = input_ids.get(file_id(output)) if output.exists() else None
        if hit is not None:
            raise DataError(f"{hit}: predicting into --out {out_dir} would overwrite this input with "
                            f"{output.name}; choose another --out (nothing was written)")
    return pairs


def with_legend(panel: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """`panel` (H×W×3 uint8) with a white column on its right naming each class of `class_ids` that
    the overlay paints (background is not painted, so not listed) beside its `OVERLAY_PALETTE`
    swatch. Text and swatches scale with the panel's height (about 1/32 of it a row, 12 px at
    least), so the legend stays readable on a 1024² image; the column grows taller when the list
    needs more room than H."""
    painted = [c for c in class_ids if c != 0]
    row = max(12, panel.shape[0] // 32)
    font = ImageFont.load_default(size=max(10, round(row * 0.8)))
    pad, swatch = max(2, row // 6), row - 2 * max(2, row // 6)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((measure.textlength(CLASS_NAMES[c], font=font) for c in painted), default=0)
    width = int(3 * pad + swatch + text_width + 2 * pad)
    height = max(panel.shape[0], row * len(painted) + 2 * pad)
    legend = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(legend)
    for k, class_id in enumerate(painted):
        top = pad + k * row
        draw.rectangle([pad, top + pad, pad + swatch, top + pad + swatch],
                       fill=tuple(int(c) for c in OVERLAY_PALETTE[class_id]), outline="black")
        draw.text((2 * pad + swatch + pad, top + row / 2), CLASS_NAMES[class_id], fill="black", font=font, anchor="lm")
    canvas = np.full((height, panel.shape[1] + width, 3), 255, dtype=np.uint8)
    canvas[:panel.shape[0], :panel.shape[1]] = panel
    canvas[:, panel.shape[1]:] = np.asarray(legend)
    return canvas


@torch.no_grad()
def check_images(paths: list[Path]) -> None:
    """Every input exists and opens as an image, from its header alone (no pixels decoded): run
    before anything is written, so a bad input in the list leaves --out as it was."""
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: image not found (nothing was written)")
        try:
            read_header(path, "image")
        except DataError as exc:
            raise DataError(f"{exc} (nothing was written)") from None


def predict_files(model: MicroSegFormer, paths: list[Path], out_dir: Path, input_size: int,
                  device: torch.device, amp: str = "off", tta: str = "none") -> list[Path]:
    """For each image: `<stem>.png` (palette id mask, the data set's format) and `<stem>_overlay.png`
    (the image, the mask's colours over it, and a legend of the classes found); names as
    `prediction_paths` gives them; `tta` as in `predict_batch`. Returns the files written.

    Every input is checked (`check_images`) before the first write; an image whose pixels turn out
    unreadable later (a truncated file) stops the run with an error that says what was written."""
    check_images(paths)
    pairs = prediction_paths(paths, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, (mask_path, overlay_path) in tqdm(list(zip(paths, pairs)), desc="predict", disable=len(paths) < 4,
                                                leave=False):
        try:
            image = read_image(path)
        except DataError as exc:
            done = len(written) // 2
            raise DataError(f"{exc}; stopped after {done} of {len(paths)} images"
                            + (f" (their masks and overlays are in {out_dir})" if done else " (nothing was written)")
                            ) from None
        x = normalize(torch.from_numpy(image).permute(2, 0, 1).float().div(255))[None].to(device)
        # any image size works: the model sees it resized to input_size², the ids come back at h×w
        ids = predict_batch(model, x, input_size, amp, tta)[0].cpu().numpy().astype(np.uint8)
        write_mask(mask_path, ids)
        side_by_side = np.concatenate([image, overlay(image, ids)], axis=1)
        Image.fromarray(with_legend(side_by_side, np.unique(ids).tolist())).save(overlay_path)
        written += [mask_path, overlay_path]
    return written
