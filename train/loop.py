"""The training loop (SPEC §5), top to bottom: data, model, optimiser and schedule, then epochs of
train → score → log → checkpoint, with early stopping and exact resume.

Run directory layout:
    config.json      the resolved TrainConfig
    last.pt / best.pt  full checkpoints (weights, optimiser, scheduler, scaler, epoch, RNG states)
    metrics.jsonl    one line per epoch
    curves.png       loss, train/val F-score and learning rate, redrawn every epoch
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from msf.data import open_dataset
from msf.model import MicroSegFormer
from msf.nvtx import nvtx_range
from train.checkpoint import atomic_save, read_checkpoint
from train.config import TrainConfig
from train.evaluate import autocast_for, constant_prediction_scores, evaluate, majority_class
from train.plots import plot_curves


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def warmup_cosine(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """LR multiplier: linear warm-up over warmup_epochs, then cosine to 0 at the planned end."""
    t = step / steps_per_epoch  # in epochs, fractional
    if t < cfg.warmup_epochs:
        return (t + 1 / steps_per_epoch) / cfg.warmup_epochs  # first step already gets a non-zero LR
    progress = (t - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def make_loader(dataset, cfg: TrainConfig, shuffle: bool, epoch: int, device: torch.device):
    # The shuffle order is a function of (seed, epoch), so a resumed epoch sees the same batches.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=shuffle, drop_last=shuffle and len(dataset) >= cfg.batch_size,
        num_workers=workers, generator=generator, pin_memory=device.type == "cuda",
        persistent_workers=False)


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    return min(8, cores - 1) if device.type == "cuda" else min(1, cores - 1)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.out) / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    if (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another --run-name (nothing was overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: TrainConfig, resume: str | Path | None = None) -> Path:
    """Train to the end of the schedule or to early stopping; returns the run directory."""
    # --- run directory and config -----------------------------------------------------------
    if resume is not None:
        run_dir = Path(resume)
        ckpt = read_checkpoint(run_dir / "last.pt")
        saved = TrainConfig(**ckpt["config"])
        # A resumed run keeps its recipe; only where it runs and how it reports may change.
        cfg = dataclasses.replace(saved, device=cfg.device, progress=cfg.progress, num_workers=cfg.num_workers,
                                  backend=cfg.backend, threads=cfg.threads)
    else:
        cfg = cfg.resolve()
        run_dir = prepare_run_dir(cfg)
        ckpt = None
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # --- data ---------------------------------------------------------------------------------
    train_set = open_dataset(cfg.data, cfg.train_split, cfg.image_size, augment=True, seed=cfg.seed,
                             synthetic_images=cfg.synthetic_train_images)
    val_set = open_dataset(cfg.data, cfg.val_split, None if cfg.data else cfg.image_size, seed=cfg.seed,
                           synthetic_images=cfg.synthetic_val_images)
    train_eval_set = torch.utils.data.Subset(
        open_dataset(cfg.data, cfg.train_split, cfg.image_size, seed=cfg.seed,
                     synthetic_images=cfg.synthetic_train_images),
        range(min(cfg.train_eval_images, len(train_set))))
    steps_per_epoch = len(make_loader(train_set, cfg, True, 0, device))

    # --- model, optimiser, schedule ---------------------------------------------------------
    model = MicroSegFormer(lmsa=cfg.lmsa, backend=cfg.backend, dice_eps=cfg.dice_eps,
                           paper_head_order=cfg.paper_head_order).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps_per_epoch, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
    start_epoch, best_f, since_best = 0, -1.0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_f, since_best = ckpt["epoch"] + 1, ckpt["best_f_score"], ckpt["epochs_since_best"]
        restore_rng_states(ckpt["rng"])
        truncate_log(run_dir / "metrics.jsonl", last_epoch=ckpt["epoch"])
    print(f"run {run_dir}: {len(train_set)} train / {len(val_set)} val images at {cfg.image_size}², "
          f"{cfg.epochs} epochs × {steps_per_epoch} steps, device {device}, backend {cfg.backend}"
          + (f", resuming at epoch {start_epoch + 1}" if ckpt is not None else ""), flush=True)

    # The floor to beat: every pixel given the most common class of the training images.
    floor_class = majority_class(train_eval_set)
    floor = constant_prediction_scores(floor_class, make_loader(val_set, cfg, False, 0, device))
    print(f"constant prediction ({floor_class}) scores val F {floor['f_score']:.4f}", flush=True)
    started_run = time.perf_counter()

    # --- epochs -------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        if since_best >= cfg.patience:
            print(f"early stop: no better val F-score for {cfg.patience} epochs", flush=True)
            break
        model.train()
        train_set.set_epoch(epoch)
        loss_sum, seen, started = 0.0, 0, time.perf_counter()
        bar = tqdm(make_loader(train_set, cfg, True, epoch, device), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        batches = iter(bar)
        while True:
            with nvtx_range("data"):
                batch = next(batches, None)
                if batch is None:
                    break
                images, masks = (t.to(device, non_blocking=True) for t in batch)
            with nvtx_range("forward+loss"), autocast_for(device, cfg.amp):
                loss = model.loss(images, masks)
            with nvtx_range("backward"):
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            with nvtx_range("optimizer"):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
            loss_sum += loss.item() * len(images)
            seen += len(images)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / (time.perf_counter() - started):.1f}")
        train_seconds = time.perf_counter() - started

        val = evaluate(model, make_loader(val_set, cfg, False, 0, device), device, cfg.image_size, cfg.amp,
                       cfg.progress, desc="val")
        train_scores = evaluate(model, make_loader(train_eval_set, cfg, False, 0, device), device,
                                cfg.image_size, cfg.amp, cfg.progress, desc="train F")
        improved = val["f_score"] > best_f
        best_f, since_best = (val["f_score"], 0) if improved else (best_f, since_best + 1)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_f_score": train_scores["f_score"],
                  "val_f_score": val["f_score"], "val_miou": val["miou"], "lr": optimizer.param_groups[0]["lr"],
                  "images_per_s": seen / train_seconds, "epoch_seconds": time.perf_counter() - started,
                  "best_val_f_score": best_f}
        with open(run_dir / "metrics.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  train F {record['train_f_score']:.4f}  "
              f"val F {val['f_score']:.4f}  mIoU {val['miou']:.4f}  {record['images_per_s']:.1f} img/s"
              + ("  *best*" if improved else ""), flush=True)

        state = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                 "config": dataclasses.asdict(cfg), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                 "best_f_score": best_f, "epochs_since_best": since_best, "rng": rng_states(), "metrics": record}
        if improved:
            atomic_save(state, run_dir / "best.pt")
        atomic_save(state, run_dir / "last.pt")

    write_summary(run_dir, floor_class, floor["f_score"], time.perf_counter() - started_run)
    return run_dir


def write_summary(run_dir: Path, floor_class: int, floor_f: float, seconds: float) -> None:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    best = max(rows, key=lambda r: r["val_f_score"])
    summary = {"best_val_f_score": best["val_f_score"], "best_epoch": best["epoch"], "epochs_run": len(rows),
               "constant_prediction_class": floor_class, "constant_prediction_val_f_score": floor_f,
               "seconds_this_session": round(seconds, 1)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"best val F-score {best['val_f_score']:.4f} at epoch {best['epoch']} "
          f"(constant prediction: {floor_f:.4f})", flush=True)


def truncate_log(path: Path, last_epoch: int) -> None:
    """Drop log lines past the checkpoint being resumed (an epoch logged but not checkpointed)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["epoch"] <= last_epoch + 1]
    path.write_text("".join(ln + "\n" for ln in kept))


