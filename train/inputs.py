"""The batches a training run reads: augmented training batches, the validation split, and the
un-augmented training images scored each epoch, from either input pipeline (`msf.pipeline`).

`--pipeline auto` takes the device pipeline (the data set decoded once into a uint8 cache, kept in
the device's memory, augmented there in whole batches) on CUDA, and on the CPU for real data whose
cache takes at most a quarter of the available RAM (measured at 256², B=16 on 2 cores: 9.9 img/s
against 8.6–9.5 with the DataLoader, bench/results/measured/cpu/train-speed.md); otherwise, and for
the synthetic default, the DataLoader. Either can be forced. Both give
the same batches for the same seed and epoch, so a run may switch between them on resume.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from msf.data import AugmentConfig, open_dataset
from msf.pipeline import DeviceBatches, LoaderBatches, UInt8Cache, eval_plan, load_uint8_cache, train_plan
from msf.train.config import TrainConfig
from msf.train.distributed import DistContext
from msf.train.evaluate import amp_dtype

PIPELINES = ("auto", "loader", "device")


@dataclass
class RunInputs:
    train: LoaderBatches | DeviceBatches       # augmented, shuffled; `.epoch(e)` per epoch
    val: LoaderBatches | DeviceBatches         # the validation split at its native size
    train_eval: LoaderBatches | DeviceBatches  # the first `train_eval_images` training images, not augmented
    train_images: int
    val_images: int
    pipeline: str                              # "loader" or "device"
    steps_per_epoch: int


CPU_CACHE_SHARE = 0.25   # of the available RAM, the most a CPU run's uint8 cache may take under auto


def resolve_pipeline(name: str, device: torch.device, cache_bytes: int | None = None) -> str:
    """`cache_bytes`: the uint8 cache's size estimate for real data (None for synthetic data)."""
    if name not in PIPELINES:
        raise ValueError(f"--pipeline must be one of {', '.join(PIPELINES)}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "device"
    ram = available_ram()
    fits = cache_bytes is not None and ram is not None and cache_bytes <= CPU_CACHE_SHARE * ram
    return "device" if fits else "loader"


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cache_bytes_estimate(n_train: int, n_val: int, image_size: int) -> int:
    """Image (3 bytes) + mask (1 byte) per pixel; validation images at their native size, bounded
    here by 1024² (CelebAMask-HQ's largest)."""
    return 4 * (n_train * image_size ** 2 + n_val * 1024 ** 2)


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    return min(8, cores - 1) if device.type == "cuda" else min(1, cores - 1)


def build_inputs(cfg: TrainConfig, device: torch.device, ctx: DistContext = DistContext()) -> RunInputs:
    train_set = open_dataset(cfg.data, cfg.train_split, cfg.image_size, augment=True, seed=cfg.seed,
                             synthetic_images=cfg.synthetic_train_images, limit=cfg.limit)
    val_set = open_dataset(cfg.data, cfg.val_split, None if cfg.data else cfg.image_size, seed=cfg.seed,
                           synthetic_images=cfg.synthetic_val_images, limit=cfg.limit)
    train_set.check_headers()  # before the first step: a bad file is named now, not partway through epoch 1
    val_set.check_headers()
    n_train, n_val = len(train_set), len(val_set)
    pipeline = resolve_pipeline(cfg.pipeline, device,
                                cache_bytes_estimate(n_train, n_val, cfg.image_size) if cfg.data else None)
    n_train_eval = min(cfg.train_eval_images, n_train)
    plans = {
        "train": lambda epoch: train_plan(n_train, cfg.batch_size, cfg.seed, epoch, ctx.rank, ctx.world),
        "val": lambda epoch: eval_plan(n_val, cfg.batch_size, ctx.rank, ctx.world),
        "train_eval": lambda epoch: eval_plan(n_train_eval, cfg.batch_size, ctx.rank, ctx.world),
    }
    if pipeline == "loader":
        workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
        train_eval_set = open_dataset(cfg.data, cfg.train_split, cfg.image_size, seed=cfg.seed,
                                      synthetic_images=cfg.synthetic_train_images, limit=cfg.limit)
        batches = {"train": LoaderBatches(train_set, plans["train"], device, workers),
                   "val": LoaderBatches(val_set, plans["val"], device, workers),
                   "train_eval": LoaderBatches(train_eval_set, plans["train_eval"], device, workers)}
    else:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(cfg)
        progress = cfg.progress and ctx.is_main
        train_cache = _shared_cache(train_set, cache_dir, progress, ctx)
        val_cache = _shared_cache(val_set, cache_dir, progress, ctx)
        check_fits(train_cache.nbytes + val_cache.nbytes, device)
        train_cache, val_cache = train_cache.to(device), val_cache.to(device)
        # training batches in autocast's dtype, as the first convolution would cast them (evaluation
        # keeps float32: native-size images are resized to the model's first)
        image_dtype = amp_dtype(device, cfg.amp) or torch.float32
        batches = {"train": DeviceBatches(train_cache, plans["train"], AugmentConfig(), cfg.seed, image_dtype),
                   "val": DeviceBatches(val_cache, plans["val"]),
                   "train_eval": DeviceBatches(train_cache, plans["train_eval"])}
    return RunInputs(train=batches["train"], val=batches["val"], train_eval=batches["train_eval"],
                     train_images=n_train, val_images=n_val, pipeline=pipeline,
                     steps_per_epoch=len(plans["train"](0)))


def default_cache_dir(cfg: TrainConfig) -> Path:
    """`<out>/.cache`: beside the run folders, hidden, so it is not mistaken for one."""
    return Path(cfg.out) / ".cache"


def check_fits(cache_bytes: int, device: torch.device, share: float = 0.5) -> None:
    """Refuse a cache that would take more than `share` of the GPU's free memory: training needs
    the rest, and an out-of-memory error mid-epoch says less than this."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if cache_bytes > share * free:
        raise ValueError(f"--pipeline device: the uint8 cache needs {cache_bytes / 2**30:.1f} GiB, more than half "
                         f"of the {free / 2**30:.1f} GiB free on {device}; use --pipeline loader or a smaller "
                         "--image-size")


def _shared_cache(dataset, cache_dir: Path, progress: bool, ctx: DistContext) -> UInt8Cache:
    """Rank 0 decodes and writes the cache; the other processes wait, then read it."""
    if ctx.is_main:
        cache = load_uint8_cache(dataset, cache_dir, progress)
        ctx.barrier()
        return cache
    ctx.barrier()
    return load_uint8_cache(dataset, cache_dir, progress)
