"""The training loop (SPEC §5), top to bottom: data, model, optimiser and schedule, then epochs of
train → score → log → checkpoint, with early stopping and exact resume.

Run directory layout:
    config.json      the resolved TrainConfig
    last.pt / best.pt  full checkpoints (weights, optimiser, scheduler, scaler, epoch, RNG states)
    metrics.jsonl    one line per epoch
    curves.png       loss, train/val F-score and learning rate (redrawn at most every 20 s, and at the end)
    summary.json     best score, why the session ended, throughput

Launched by `torchrun`, the same loop trains data-parallel (`msf.train.distributed`): each process
takes its slice of every global batch, and rank 0 alone writes the run directory.

The step never waits on the GPU: the loss is summed on the device and read every
`LOG_EVERY` steps and at the end of the epoch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from msf.backend import interpreted, require_runnable
from msf.model import MicroSegFormer
from msf.nvtx import nvtx_range
from msf.train import distributed
from msf.train.checkpoint import BackgroundCheckpointer, read_checkpoint, remove_stale_temp_files
from msf.train.config import TrainConfig, flag
from msf.train.distributed import DistContext
from msf.train.evaluate import autocast_for, class_pixel_counts, constant_prediction_meter, evaluate_meter
from msf.train.inputs import build_inputs
from msf.train.plots import plot_curves

FUSED_ADAMW_DEVICES = ("cuda", "cpu")
LOG_EVERY = 20           # steps between progress-bar loss reads (each one waits for the GPU)
PLOT_EVERY_S = 20.0      # curves.png is redrawn at most this often, and after the last epoch
# Fields a resumed run may change: where and how it runs, not what it computes.
SESSION_FIELDS = ("device", "progress", "num_workers", "backend", "compile", "threads", "pipeline",
                  "cache_dir", "max_minutes", "stop_after_epochs")
# Fields that place a new run; a resumed run stays where --resume says (changing them is refused).
PLACEMENT_FIELDS = ("out", "run_name")
# A CPU run whose schedule is estimated to take longer than this is warned about at its start.
CPU_WARN_HOURS = 2.0
# Files a run writes besides its checkpoints (removed again when its start fails).
RUN_FILES = ("config.json", "metrics.jsonl", "curves.png", "summary.json")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the last checkpoint is."""


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
        # a checkpoint from a machine with more GPUs holds more states than this one has devices
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """(the new run's directory, whether this call created it)."""
    run_dir = Path(cfg.out) / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    if (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another --run-name (nothing was overwritten)")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, created


def shared_run_dir(cfg: TrainConfig, ctx: DistContext) -> tuple[Path, bool]:
    """Rank 0 creates the run directory (or refuses); every process gets its answer."""
    answer = None
    if ctx.is_main:
        try:
            run_dir, created = prepare_run_dir(cfg)
            answer = ("ok", (str(run_dir), created))
        except ValueError as exc:
            answer = ("error", str(exc))
    kind, value = ctx.broadcast(answer)
    if kind == "error":
        raise ValueError(value)
    return Path(value[0]), value[1]


def discard_failed_start(run_dir: Path, created: bool) -> None:
    """Remove what a run that never wrote a checkpoint left: its files, and the folder if this run
    made it and nothing else is in it."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    remove_stale_temp_files(run_dir)
    if created and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def resumed_config(saved: TrainConfig, requested: TrainConfig, given: set[str], allow_changes: set[str]
                   ) -> TrainConfig:
    """The saved run's config with this session's SESSION_FIELDS, and the recipe fields given on
    the command line (`given`) that differ from the saved ones, if `allow_changes` names them all;
    otherwise a one-line ValueError listing the changes."""
    moved = [flag(k) for k in PLACEMENT_FIELDS if k in given and getattr(requested, k) != getattr(saved, k)]
    if moved:
        raise ValueError(f"{' and '.join(moved)} place a new run; a resumed run stays in its own folder "
                         "(leave them out, or start a new run)")
    changed = {k: (getattr(saved, k), getattr(requested, k)) for k in sorted(given)
               if k not in SESSION_FIELDS + PLACEMENT_FIELDS and getattr(requested, k) != getattr(saved, k)}
    refused = [k for k in changed if k not in allow_changes]
    if refused:
        listed = ", ".join(f"{flag(k)} {changed[k][0]} -> {changed[k][1]}" for k in refused)
        raise ValueError(f"--resume keeps the run's recipe, and this would change it: {listed}; to change it anyway "
                         f"add --allow-changes {','.join(refused)} (nothing was changed)")
    if "lmsa" in changed:
        raise ValueError("--lmsa changes the architecture; a resumed run cannot change it")
    cfg = dataclasses.replace(saved, **{k: getattr(requested, k) for k in SESSION_FIELDS},
                              **{k: new for k, (_, new) in changed.items()})
    cfg.validate()
    return cfg


def finished_reason(cfg: TrainConfig, ckpt: dict) -> str:
    """Why a saved run has nothing left to train ("" when it has)."""
    done = ckpt["epoch"] + 1
    if done >= cfg.epochs:
        return f"all {cfg.epochs} epochs are done"
    if cfg.patience and ckpt["epochs_since_best"] >= cfg.patience:
        return f"it stopped early after epoch {done} ({ckpt['epochs_since_best']} epochs without a better val F-score)"
    return ""


def cpu_images_per_s(model: MicroSegFormer, cfg: TrainConfig) -> float:
    """Training images per second on this CPU, from one forward+backward of one image at the run's
    size, on a copy of the model with the RNG states restored after (the run is unchanged)."""
    probe = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[]):
        images = torch.randn(1, 3, cfg.image_size, cfg.image_size)
        masks = torch.zeros(1, cfg.image_size, cfg.image_size, dtype=torch.long)
        started = time.perf_counter()
        probe.loss(images, masks).backward()
        return 1.0 / (time.perf_counter() - started)


def cpu_schedule_warning(cfg: TrainConfig, images_per_epoch: int, images_per_s: float,
                         epochs_left: int) -> str:
    """A warning when a CPU run's schedule would take longer than CPU_WARN_HOURS ("" otherwise)."""
    epoch_s = images_per_epoch / images_per_s
    hours = epoch_s * epochs_left / 3600
    if hours <= CPU_WARN_HOURS:
        return ""
    return (f"warning: on this CPU an epoch of {images_per_epoch} images at {cfg.image_size}², batch "
            f"{cfg.batch_size}, takes about {epoch_s / 60:.0f} min ({images_per_s:.2f} img/s measured on one image), "
            f"{hours:.0f} h for the {epochs_left} epochs left; for a CPU run try --image-size 256 --epochs 14 "
            "--batch-size 16 (or a GPU: --device cuda)")


class LossObjective(torch.nn.Module):
    """`model.loss` as a module's forward, so DistributedDataParallel sees the call and syncs gradients;
    `compiled`: under torch.compile, in one graph (`--compile`)."""

    def __init__(self, model: MicroSegFormer, compiled: bool = False):
        super().__init__()
        self.model = model
        self.loss_fn = torch.compile(model.loss, fullgraph=True) if compiled else model.loss

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(images, masks)


def make_model(cfg: TrainConfig, device: torch.device) -> MicroSegFormer:
    """The model of a config resolved for `device` (`TrainConfig.for_device`)."""
    model = MicroSegFormer(lmsa=cfg.lmsa, backend=cfg.backend, dice_eps=cfg.dice_eps,
                           paper_head_order=cfg.paper_head_order, decoder_dropout=cfg.decoder_dropout).to(device)
    # channels-last convolutions skip the layout copies around each conv of the CPU step
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def make_optimisation(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, steps_per_epoch: int):
    """(AdamW, warm-up + cosine LR schedule stepped per step, GradScaler) of the recipe (SPEC §5)."""
    # the fused AdamW is one kernel for every parameter instead of a dozen per tensor (on CUDA), and
    # one pass per tensor instead of six on the CPU (82 → 14 ms a step here, 2026-11-29)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in FUSED_ADAMW_DEVICES)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps_per_epoch, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
    return optimizer, scheduler, scaler


def for_this_device(optimizer_state: dict, device: torch.device) -> dict:
    """A saved AdamW state whose implementation flags follow this run's device, not the saving
    run's (`load_state_dict` would otherwise keep, say, a CPU run's for-loop AdamW on a GPU)."""
    groups = [{**g, "fused": device.type in FUSED_ADAMW_DEVICES, "foreach": None} for g in optimizer_state["param_groups"]]
    return {**optimizer_state, "param_groups": groups}


def train_step(objective: torch.nn.Module, optimizer, scheduler, scaler, images: torch.Tensor,
               masks: torch.Tensor, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """One step of the recipe (SPEC §5): loss under AMP, backward, clip to 1.0, AdamW, LR schedule.
    Returns the detached loss without waiting for it."""
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with nvtx_range("forward+loss"), autocast_for(device, cfg.amp):
        loss = objective(images, masks)
    with nvtx_range("backward"):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    with nvtx_range("optimizer"):
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    return loss.detach()


def train(cfg: TrainConfig, resume: str | Path | None = None, given: set[str] = frozenset(),
          allow_changes: set[str] = frozenset()) -> Path:
    """Train to the end of the schedule, to early stopping or to a session limit; returns the run
    directory. Under torchrun, every process calls this. Process-wide settings it changes (CPU
    threads, cuDNN autotuning) are restored on the way out.

    Resuming, the saved recipe holds except for this session's SESSION_FIELDS; a recipe field in
    `given` (the flags on the command line) that differs from the saved value is refused unless
    `allow_changes` names it. A run that fails before its first checkpoint leaves no run folder;
    Ctrl-C raises `Interrupted` saying where the last checkpoint is."""
    started = time.perf_counter()  # --max-minutes counts from here: data and model set-up included
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    ctx, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, resume, ctx, device, started, set(given), set(allow_changes))
    finally:
        ctx.close()
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark


def _train(cfg: TrainConfig, resume: str | Path | None, ctx: DistContext, device: torch.device,
           started_session: float, given: set[str], allow_changes: set[str]) -> Path:
    log = print if ctx.is_main else (lambda *a, **k: None)
    # --- run directory and config -----------------------------------------------------------
    created = False
    if resume is not None:
        run_dir = Path(resume)
        ckpt = read_checkpoint(run_dir / "last.pt")
        if ctx.is_main:
            remove_stale_temp_files(run_dir)  # a write killed mid-way (the checkpoint it was replacing is intact)
        cfg = resumed_config(TrainConfig(**ckpt["config"]), cfg, given, allow_changes).for_device(device)
        finished = finished_reason(cfg, ckpt)
        if finished:
            log(f"{run_dir}: the run is finished ({finished}); nothing to do. To train longer: --resume {run_dir} "
                "--epochs N --allow-changes epochs", flush=True)
            return run_dir
        require_runnable(cfg.backend, device)
    else:
        cfg = cfg.resolve().for_device(device)
        require_runnable(cfg.backend, device)
        run_dir, created = shared_run_dir(cfg, ctx)
        ckpt = None
    if interpreted(cfg.backend, device):
        log("note: --backend triton on a CPU runs the kernels through Triton's interpreter, a correctness tool: "
            "expect minutes a step and img/s near 0 (a GPU runs them compiled: --device cuda)", flush=True)
    checkpointer = BackgroundCheckpointer()
    try:
        return _session(cfg, run_dir, ckpt, ctx, device, started_session, checkpointer)
    except BaseException as exc:
        try:
            checkpointer.wait()  # a checkpoint being written is finished: the one on disk is whole
        except Exception:
            pass
        kept = (run_dir / "last.pt").exists()
        if ctx.is_main and not kept:
            discard_failed_start(run_dir, created)
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted; last checkpoint {run_dir / 'last.pt'} (continue with --resume {run_dir})"
                              if kept else "interrupted before the first checkpoint; nothing kept"
                              + cache_note(cfg)) from None
        raise


def _session(cfg: TrainConfig, run_dir: Path, ckpt: dict | None, ctx: DistContext, device: torch.device,
             started_session: float, checkpointer: BackgroundCheckpointer) -> Path:
    """Data, model and optimiser set-up, then the epochs of this session."""
    log = print if ctx.is_main else (lambda *a, **k: None)
    if ctx.is_main:
        # resolved for this device (`TrainConfig.for_device`): what the run really uses
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # --- data ---------------------------------------------------------------------------------
    inputs = build_inputs(cfg, device, ctx)
    steps_per_epoch = inputs.steps_per_epoch
    for note in cfg.warnings():  # after the data is found: an error in it is the first thing said
        log(f"warning: {note}", flush=True)

    # --- model, optimiser, schedule ---------------------------------------------------------
    model = make_model(cfg, device)
    objective = LossObjective(model, compiled=cfg.compile)
    if ctx.active:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # each process its own dropout masks
    optimizer, scheduler, scaler = make_optimisation(model, cfg, device, steps_per_epoch)
    start_epoch, best_f, since_best = 0, -1.0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(for_this_device(ckpt["optimizer"], device))
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when the saved run had no GradScaler (CPU, bf16): start a fresh one
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_f, since_best = ckpt["epoch"] + 1, ckpt["best_f_score"], ckpt["epochs_since_best"]
        by_rank = ckpt.get("rng_by_rank")
        restore_rng_states(by_rank[ctx.rank] if by_rank and len(by_rank) == ctx.world else ckpt["rng"])
        if ctx.is_main:
            truncate_log(run_dir / "metrics.jsonl", last_epoch=ckpt["epoch"])
    if device.type == "cpu" and inputs.train_images * cfg.image_size ** 2 > 64 * 256 ** 2:
        epochs_left = cfg.epochs - start_epoch
        warning = cpu_schedule_warning(cfg, steps_per_epoch * cfg.batch_size, cpu_images_per_s(model, cfg), epochs_left)
        if warning:
            log(warning, flush=True)
    log(f"run {run_dir}: {inputs.train_images} train / {inputs.val_images} val images at {cfg.image_size}², "
        f"{cfg.epochs} epochs × {steps_per_epoch} steps, device {device}"
        + (f" × {ctx.world} processes" if ctx.active else "") + f", backend {cfg.backend}, "
        f"amp {cfg.amp}, " + ("compiled, " if cfg.compile else "") +
        f"{inputs.pipeline} pipeline" + (f", resuming at epoch {start_epoch + 1}" if ckpt is not None else ""),
        flush=True)

    # The floor to beat: every pixel given the most common class of the training images.
    floor_class = int(ctx.sum_(class_pixel_counts(inputs.train_eval.epoch(), model.config.num_classes, device)).argmax())
    floor = ctx.reduce_meter(constant_prediction_meter(floor_class, inputs.val.epoch())).compute()
    log(f"constant prediction ({floor_class}) scores val F {floor['f_score']:.4f}", flush=True)
    last_plot = time.perf_counter()
    epoch_seconds, stop_reason = 0.0, "schedule complete"
    to_compile = cfg.compile  # the session's first step compiles: timed apart from the steps

    # --- epochs -------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        stop_reason = session_limit(cfg, epoch - start_epoch, time.perf_counter() - started_session,
                                    epoch_seconds, since_best, ctx)
        if stop_reason:
            log(stop_reason, flush=True)
            break
        objective.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen, started = 0, time.perf_counter()
        compile_seconds, compile_images = None, 0
        batches = inputs.train.epoch(epoch)
        batch_iter = iter(batches)
        # closed however the epoch ends, so an error message starts on a line of its own
        with tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                  disable=not (cfg.progress and ctx.is_main), leave=False) as bar:
            for step in range(len(batches)):
                with nvtx_range("data"):
                    images, masks = next(batch_iter)
                step_started = time.perf_counter()
                loss = train_step(objective, optimizer, scheduler, scaler, images, masks, cfg, device)
                if to_compile:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    compile_seconds, compile_images = time.perf_counter() - step_started, len(images)
                    to_compile = False
                    log(f"compiled the training step in {compile_seconds:.1f} s (that first step is left out of "
                        "img/s)", flush=True)
                loss_sum += loss.double() * len(images)
                seen += len(images)
                bar.update()
                if (step + 1) % LOG_EVERY == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                    img_s=rate(seen * ctx.world / (time.perf_counter() - started)))
        loss_and_count = ctx.sum_(torch.stack([loss_sum, torch.tensor(float(seen), device=device).double()]))
        train_loss = (loss_and_count[0] / loss_and_count[1].clamp(min=1)).item()  # waits for the last step
        train_seconds = time.perf_counter() - started - (compile_seconds or 0.0)

        val = ctx.reduce_meter(evaluate_meter(model, inputs.val.epoch(), device, cfg.image_size, cfg.amp,
                                              cfg.progress and ctx.is_main, desc="val")).compute()
        train_scores = ctx.reduce_meter(evaluate_meter(model, inputs.train_eval.epoch(), device, cfg.image_size,
                                                       cfg.amp, cfg.progress and ctx.is_main,
                                                       desc="train F")).compute()
        improved = val["f_score"] > best_f
        best_f, since_best = (val["f_score"], 0) if improved else (best_f, since_best + 1)
        epoch_seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "train_loss": train_loss, "train_f_score": train_scores["f_score"],
                  "val_f_score": val["f_score"], "val_miou": val["miou"], "lr": optimizer.param_groups[0]["lr"],
                  "images_per_s": (seen - compile_images) * ctx.world / max(train_seconds, 1e-9),
                  "epoch_seconds": epoch_seconds, "best_val_f_score": best_f}
        if compile_seconds is not None:
            record["compile_seconds"] = round(compile_seconds, 2)
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  train F {record['train_f_score']:.4f}  "
            f"val F {val['f_score']:.4f}  mIoU {val['miou']:.4f}  {rate(record['images_per_s'])} img/s"
            + ("  *best*" if improved else ""), flush=True)

        rng_by_rank = ctx.gather(rng_states())
        if ctx.is_main:
            with open(run_dir / "metrics.jsonl", "a") as metrics_log:
                metrics_log.write(json.dumps(record) + "\n")
            state = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "config": dataclasses.asdict(cfg), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "best_f_score": best_f, "epochs_since_best": since_best, "rng": rng_by_rank[0],
                     "rng_by_rank": rng_by_rank, "metrics": record}
            if improved:  # one write: last.pt becomes a second name of the new best.pt
                checkpointer.save(state, run_dir / "best.pt", also=(run_dir / "last.pt",))
            else:
                checkpointer.save(state, run_dir / "last.pt")
            if time.perf_counter() - last_plot > PLOT_EVERY_S:
                plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
                last_plot = time.perf_counter()

    checkpointer.wait()
    if ctx.is_main and (run_dir / "metrics.jsonl").exists():  # (a session that ended before any epoch has none)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        write_summary(run_dir, floor_class, floor["f_score"], time.perf_counter() - started_session, stop_reason,
                      inputs.pipeline, ctx.world)
    ctx.barrier()  # no process leaves before rank 0 has written the run
    return run_dir


def rate(images_per_s: float) -> str:
    """Images a second with three significant digits below 100 (the interpreter's 0.0123 is not 0.0)."""
    return f"{images_per_s:.1f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def cache_note(cfg: TrainConfig) -> str:
    """Where the decoded data cache of a run that kept nothing is, and its size ("" when none):
    it is kept for the next run on the same data, which then skips the decoding."""
    from msf.train.inputs import default_cache_dir
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(cfg)
    files = [f for f in cache.glob("*") if f.is_file()] if cache.is_dir() else []
    if not files:
        return ""
    size = sum(f.stat().st_size for f in files)
    return (f" (the decoded data cache, {size / 1e6:.0f} MB in {cache}, is kept for the next run on this data; "
            f"delete the folder to free the space)")


def session_limit(cfg: TrainConfig, epochs_this_session: int, elapsed: float, last_epoch_seconds: float,
                  since_best: int, ctx: DistContext) -> str:
    """Why this session should end before the next epoch ("" to go on). Rank 0's clock decides."""
    reason = ""
    if cfg.patience and since_best >= cfg.patience:  # patience 0: no early stopping
        reason = f"early stop: no better val F-score for {cfg.patience} epochs"
    elif cfg.stop_after_epochs is not None and epochs_this_session >= cfg.stop_after_epochs:
        reason = f"session ends after {cfg.stop_after_epochs} epochs (--stop-after-epochs); --resume continues"
    elif cfg.max_minutes is not None and elapsed + last_epoch_seconds > cfg.max_minutes * 60:
        reason = (f"session ends: another epoch would pass --max-minutes {cfg.max_minutes:g} "
                  f"({elapsed:.0f} s elapsed, last epoch {last_epoch_seconds:.1f} s); --resume continues")
    return ctx.broadcast(reason)


def write_summary(run_dir: Path, floor_class: int, floor_f: float, seconds: float, stop_reason: str,
                  pipeline: str, processes: int) -> None:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    if not rows:
        return
    best = max(rows, key=lambda r: r["val_f_score"])
    summary = {"best_val_f_score": best["val_f_score"], "best_epoch": best["epoch"], "epochs_run": len(rows),
               "constant_prediction_class": floor_class, "constant_prediction_val_f_score": floor_f,
               "seconds_this_session": round(seconds, 1), "ended": stop_reason or "schedule complete",
               "train_seconds_all_epochs": round(sum(r["epoch_seconds"] for r in rows), 1),
               "median_images_per_s": float(np.median([r["images_per_s"] for r in rows])),
               "pipeline": pipeline, "processes": processes}
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


