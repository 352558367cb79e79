"""Input pipelines: which samples form each batch, and two ways of turning them into tensors.

Batch plans (`train_plan`, `eval_plan`) are pure functions of (data set size, batch size, seed,
epoch, rank, world): the shuffle order comes from a generator seeded by (seed, epoch), and a
process of a multi-process run takes its contiguous share of every *global* batch, so N processes
with batch B/N see, together, exactly the batches one process with batch B sees.

Two pipelines turn a plan into (normalised images, int64 masks) on the training device: float32
images, except `DeviceBatches`' training batches under autocast, which come in its 16-bit dtype:

- `LoaderBatches`: the per-sample CPU path (a `torch.utils.data.DataLoader` over the data set,
  worker processes decoding and augmenting each sample). For CPU training.
- `DeviceBatches`: the data set decoded once into a uint8 cache (`load_uint8_cache`: on disk,
  then on the device; 900 images at 512² are 0.94 GB with masks), batches gathered there and
  augmented there in one call per batch (`msf.data.augment_batch`: colour jitter, one affine grid
  per sample, bilinear images, nearest masks, left/right id swap). On CUDA each batch is built on a
  side stream one step ahead, so it overlaps the previous step's compute.

Both draw every sample's augmentation from `msf.data.sample_params_for(seed, epoch, index)`, so
for the same plan they produce the same batches (up to the float rounding of where the warp runs).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from msf.data import (AugmentConfig, DataError, FaceParsingDataset, augment_batch, index_params, normalize,
                      sample_params_for)

Plan = list[list[int]]  # the batches of one epoch, as lists of data set indices
Batch = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Batch plans
# ----------------------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of n samples in `epoch` (the same in every process)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def train_plan(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> Plan:
    """This process's share of each shuffled global batch of `batch_size`.

    The last incomplete batch is dropped, unless the data set is smaller than one batch (then
    the one batch is the whole set, single-process only). With `world` processes every global
    batch splits into `world` equal contiguous slices: the caller checks divisibility.
    """
    if world > 1 and (batch_size % world or n < batch_size):
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the {world} processes and at most "
                         f"the {n} training images")
    order = epoch_order(n, seed, epoch)
    full = max(n // batch_size, 1)
    per_rank = min(batch_size, n) // world
    return [order[b * batch_size + rank * per_rank: b * batch_size + (rank + 1) * per_rank] for b in range(full)]


def eval_plan(n: int, batch_size: int, rank: int = 0, world: int = 1) -> Plan:
    """The samples in order, this process's contiguous share of them, in batches of `batch_size`."""
    lo, hi = n * rank // world, n * (rank + 1) // world
    return [list(range(i, min(i + batch_size, hi))) for i in range(lo, hi, batch_size)]


class EpochBatches:
    """One pass over a plan: iterable once per `iter`, with a length (for progress bars)."""

    def __init__(self, length: int, make_iter: Callable[[], Iterator[Batch]]):
        self.length, self.make_iter = length, make_iter

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Batch]:
        return self.make_iter()


# ----------------------------------------------------------------------------------------------
# The CPU pipeline
# ----------------------------------------------------------------------------------------------

class LoaderBatches:
    """Per-sample decoding and augmentation in DataLoader workers, batches copied to `device`."""

    def __init__(self, dataset: FaceParsingDataset, plan: Callable[[int], Plan], device: torch.device,
                 num_workers: int = 0):
        self.dataset, self.plan, self.device, self.num_workers = dataset, plan, device, num_workers

    def epoch(self, epoch: int = 0) -> EpochBatches:
        self.dataset.set_epoch(epoch)  # before the loader starts its workers, which copy the data set
        plan = self.plan(epoch)
        # The loader draws its workers' base seed from `generator`: given one, it leaves the global
        # RNG (the dropout masks' stream) alone, so scoring between epochs cannot shift training.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=plan, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(epoch))

        def batches() -> Iterator[Batch]:
            for images, masks in named_worker_errors(loader):
                yield images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)
        return EpochBatches(len(plan), batches)


def named_worker_errors(loader: torch.utils.data.DataLoader) -> Iterator[Batch]:
    """The loader's batches; a `DataError` raised in a worker process reaches the caller with its
    own message (the file's name and what is wrong with it). The DataLoader re-raises a worker's
    exception with its message replaced by "Caught DataError in DataLoader worker process N"
    and the worker's traceback, whose last line is the original `DataError: <message>`."""
    try:
        yield from loader
    except DataError as exc:
        text = str(exc).rstrip()
        if not text.startswith("Caught "):
            raise
        last_line = text.splitlines()[-1]
        raise DataError(last_line.split("DataError: ", 1)[-1]) from None


# ----------------------------------------------------------------------------------------------
# The uint8 cache
# ----------------------------------------------------------------------------------------------

@dataclass
class UInt8Cache:
    """A decoded data set: N×3×H×W uint8 RGB images and N×H×W uint8 class ids."""
    images: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> "UInt8Cache":
        return UInt8Cache(self.images.to(device), self.masks.to(device))

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.masks.nbytes


def cache_key(dataset: FaceParsingDataset) -> str:
    identity = json.dumps(dataset.identity(), sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def decode_dataset(dataset: FaceParsingDataset, progress: bool = False, threads: int | None = None) -> UInt8Cache:
    """Every `load_pair` of the data set, stacked (decoding in a thread pool: PIL releases the GIL)."""
    n = len(dataset)
    first_image, first_mask = dataset.load_pair(0)
    images = np.empty((n, 3, *first_mask.shape), dtype=np.uint8)
    masks = np.empty((n, *first_mask.shape), dtype=np.uint8)

    def decode(i: int) -> None:
        image, mask = (first_image, first_mask) if i == 0 else dataset.load_pair(i)
        if mask.shape != masks.shape[1:]:
            raise DataError(f"{describe_sample(dataset, i)}: {mask.shape[1]}×{mask.shape[0]} differs from the first "
                            f"sample's {masks.shape[2]}×{masks.shape[1]}; the device pipeline needs one size "
                            "(set --image-size, or use --pipeline loader)")
        images[i] = image.transpose(2, 0, 1)
        masks[i] = mask

    workers = threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in tqdm(pool.map(decode, range(n)), total=n, desc="decoding", disable=not progress, leave=False):
            pass
    return UInt8Cache(torch.from_numpy(images), torch.from_numpy(masks))


def describe_sample(dataset: FaceParsingDataset, index: int) -> str:
    paths = getattr(dataset, "images", None)
    return str(paths[index]) if isinstance(paths, list) else f"sample {index} of {type(dataset).__name__}"


def load_uint8_cache(dataset: FaceParsingDataset, cache_dir: str | Path | None, progress: bool = False) -> UInt8Cache:
    """The data set's uint8 cache: read from `cache_dir` when a cache with the data set's identity
    (files, sizes, modification times, resolution) is there, else decoded and written there.

    Written as `<key>.images.npy`, `<key>.masks.npy` and, last, `<key>.json`; each renamed into
    place, so an interrupted write leaves no file that looks complete. A cache that fails to
    read is decoded again (and overwritten), never trusted.
    """
    if cache_dir is None:
        return decode_dataset(dataset, progress)
    cache_dir = Path(cache_dir)
    key = cache_key(dataset)
    paths = {part: cache_dir / f"{key}.{part}.npy" for part in ("images", "masks")}
    meta_path = cache_dir / f"{key}.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            images, masks = (np.load(paths[part]) for part in ("images", "masks"))
            if [list(images.shape), list(masks.shape)] == meta["shapes"] and images.dtype == masks.dtype == np.uint8:
                return UInt8Cache(torch.from_numpy(images), torch.from_numpy(masks))
            print(f"{meta_path}: cache arrays do not match their description; decoding again", flush=True)
        except (OSError, ValueError, KeyError) as exc:
            print(f"{meta_path}: unreadable cache ({exc}); decoding again", flush=True)
    cache = decode_dataset(dataset, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for part, tensor in (("images", cache.images), ("masks", cache.masks)):
        _write_replacing(paths[part], lambda f, tensor=tensor: np.save(f, tensor.numpy()))
    identity = dataset.identity()
    meta = {"shapes": [list(cache.images.shape), list(cache.masks.shape)], "layout": identity["layout"],
            "root": identity.get("root"), "size": identity.get("size"), "samples": len(cache)}
    _write_replacing(meta_path, lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
    return cache


def _write_replacing(path: Path, write: Callable[[object], None]) -> None:
    """`write(file)` into a temp file renamed onto `path`; a write that fails or is interrupted
    (Ctrl-C mid-way through a gigabyte) removes its temp file instead of leaving it behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# The device pipeline
# ----------------------------------------------------------------------------------------------

class DeviceBatches:
    """Batches gathered from a uint8 cache on the device and augmented there.

    `augment` None: the samples as they are (evaluation). Otherwise each sample's parameters are
    `sample_params_for(seed, epoch, index, augment)`, drawn on the host once per epoch and copied
    to the device in one transfer. `image_dtype`: the images' dtype, computed in float32 and rounded
    once by the normalisation (training under autocast takes them in its 16-bit dtype: the first
    convolution would cast them to it anyway, inside the step).
    """

    def __init__(self, cache: UInt8Cache, plan: Callable[[int], Plan], augment: AugmentConfig | None = None,
                 seed: int = 0, image_dtype: torch.dtype = torch.float32):
        self.cache, self.plan, self.augment, self.seed = cache, plan, augment, seed
        self.image_dtype = image_dtype
        self.device = cache.images.device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def epoch(self, epoch: int = 0) -> EpochBatches:
        plan = self.plan(epoch)
        return EpochBatches(len(plan), lambda: self._batches(plan, epoch))

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _epoch_inputs(self, plan: Plan, epoch: int) -> Callable[[int], Batch]:
        """Uploads every index of the epoch and, when augmenting, every sample's parameters (one
        transfer each); returns the function that assembles batch k of the plan from them."""
        flat = [i for batch in plan for i in batch]
        rows = self._upload(torch.tensor(flat, dtype=torch.long))
        params = None
        if self.augment is not None:
            params = {k: self._upload(v) for k, v in sample_params_for(self.seed, epoch, flat, self.augment).items()}
        bounds = np.cumsum([0] + [len(b) for b in plan]).tolist()

        def batch(k: int) -> Batch:
            part = slice(bounds[k], bounds[k + 1])
            return self.assemble(rows[part], None if params is None else index_params(params, part))
        return batch

    def assemble(self, rows: torch.Tensor, params: dict | None) -> Batch:
        """(normalised B×3×H×W images in `image_dtype`, int64 B×H×W masks) for cache rows `rows`."""
        images = self.cache.images.index_select(0, rows).float().div_(255)
        masks = self.cache.masks.index_select(0, rows).long()
        if params is not None:
            images, masks = augment_batch(images, masks, params)
        return normalize(images, self.image_dtype), masks

    def _batches(self, plan: Plan, epoch: int) -> Iterator[Batch]:
        if self.stream is None:
            batch = self._epoch_inputs(plan, epoch)
            yield from (batch(k) for k in range(len(plan)))
        else:
            yield from self._overlapped(plan, epoch)

    def _overlapped(self, plan: Plan, epoch: int) -> Iterator[Batch]:
        """Batch k+1 is queued on the side stream before batch k is handed out, so the GPU builds it
        while the caller's step k runs; the caller's stream waits for a batch only when it takes it."""
        consumer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(consumer)  # the cache and anything the caller wrote are ready
        with torch.cuda.stream(self.stream):
            batch = self._epoch_inputs(plan, epoch)

        def launch(k: int) -> tuple[Batch, torch.cuda.Event]:
            with torch.cuda.stream(self.stream):
                made = batch(k)
                ready = torch.cuda.Event()
                ready.record(self.stream)
            return made, ready

        upcoming = launch(0) if plan else None
        for k in range(len(plan)):
            (images, masks), ready = upcoming
            if k + 1 < len(plan):
                upcoming = launch(k + 1)
            consumer.wait_event(ready)
            # made on the side stream, used on the caller's: keep the allocator from reusing them early
            images.record_stream(consumer)
            masks.record_stream(consumer)
            yield images, masks
