"""Checkpoints: written atomically, read back with a one-line error for anything that is not one.

A training checkpoint (`.pt`) holds the weights, the model and training configs, optimizer,
scheduler and grad-scaler state, the epoch, the best score so far and every RNG state, so a run
resumes exactly where it stopped. A released model (`.safetensors`) holds the weights (fp16 to
keep it small) with the model and training configs in its metadata; both load through
`load_model`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from msf.model import MicroSegFormer, ModelConfig


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message names it."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename over it: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed process left in a run directory (`.last.pt.<random>`
    from `atomic_save`, `.last.pt.<pid>.link` from `atomic_link`, `.best.pt.*` alike); returns them."""
    stale = [p for name in ("last.pt", "best.pt") for p in Path(run_dir).glob(f".{name}.*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_link(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src` (a hard link; a copy where links are not supported),
    replacing any old `dst` atomically."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def host_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to the host: a snapshot later training steps cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class BackgroundCheckpointer:
    """Writes checkpoints on a thread while training goes on (each save costs ~80 ms of
    serialisation and fsync for this model, 10% of a GPU epoch).

    `save` snapshots the state to the host first, so the next steps cannot change what is
    written; it waits for the previous write, so at most one is in flight and files are written in
    order. A write error surfaces at the next `save` or at `wait`. Each file is still written
    atomically: a crash mid-write leaves the previous checkpoint in place.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, path: Path, also: tuple[Path, ...] = ()) -> None:
        """Write `state` to `path`, then make every path in `also` name the same file."""
        self.wait()
        snapshot = host_copy(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot, Path(path), also), name="checkpoint")
        self._thread.start()

    def _write(self, state: dict, path: Path, also: tuple[Path, ...]) -> None:
        try:
            atomic_save(state, path)
            for other in also:
                atomic_link(path, Path(other))
        except BaseException as exc:  # handed to the training thread at its next save / wait
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint as a dict, or CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a checkpoint ({type(exc).__name__})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path}: not a MicroSegFormer checkpoint (no model weights and config)")
    return ckpt


def _model_config(raw: dict, path: Path) -> ModelConfig:
    try:
        cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except TypeError as exc:
        raise CheckpointError(f"{path}: checkpoint of another architecture ({exc})") from exc
    return cfg


def build_model(state: dict, model_config: dict, path: Path, backend: str = "eager",
                expected_classes: int | None = None) -> MicroSegFormer:
    cfg = _model_config(model_config, path)
    if expected_classes is not None and cfg.num_classes != expected_classes:
        raise CheckpointError(f"{path}: checkpoint predicts {cfg.num_classes} classes, the data has {expected_classes}")
    model = MicroSegFormer.from_config(cfg, backend)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: checkpoint of another architecture ({first})") from exc
    return model


def read_model_file(path: str | Path) -> dict:
    """{"model": weights, "model_config", "config": the training config, "metrics"} of a .pt
    checkpoint or a .safetensors release (a release's metrics: those it was exported with)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, meta = read_release(path)
        return {"model": state, "model_config": meta["model_config"], "config": meta.get("train_config", {}),
                "metrics": meta.get("metrics", {})}
    ckpt = read_checkpoint(path)
    return {**ckpt, "config": ckpt.get("config", {}), "metrics": ckpt.get("metrics", {})}


def load_model(path: str | Path, backend: str = "eager", expected_classes: int | None = None
               ) -> tuple[MicroSegFormer, dict]:
    """(model in eval mode, training config dict) from a .pt checkpoint or a .safetensors release."""
    saved = read_model_file(path)
    model = build_model(saved["model"], saved["model_config"], Path(path), backend, expected_classes)
    return model.eval(), saved["config"]


def write_release(model: MicroSegFormer, train_config: dict, path: Path, extra: dict | None = None) -> None:
    """fp16 weights + configs in safetensors metadata, written atomically."""
    from safetensors.torch import save_file
    meta = {"model_config": json.dumps(model.config.__dict__), "train_config": json.dumps(train_config),
            **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_release(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({type(exc).__name__})") from exc
    if "model_config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without a MicroSegFormer model config")
    return state, {k: json.loads(v) for k, v in meta.items()}
