"""Every training option in one dataclass; the command line is generated from it.

Fields left at None are filled by `resolve()`: the paper's recipe (SPEC §5) when a data folder is
given, a small run on the embedded synthetic faces when it is not (the README's main job, under
three minutes on a 2-core CPU). The resolved config is saved with the run.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Optional, get_args, get_origin, get_type_hints

# The paper's recipe (real data) and the synthetic demo's, for fields left unset.
PAPER_DEFAULTS = {"image_size": 512, "epochs": 200, "batch_size": 32, "warmup_epochs": 5.0}
SYNTHETIC_DEFAULTS = {"image_size": 64, "epochs": 10, "batch_size": 8, "warmup_epochs": 1.0}


@dataclass
class TrainConfig:
    # data
    data: Optional[str] = None            # data folder (mini or original layout); None: synthetic faces
    train_split: str = "train"
    val_split: str = "val"
    image_size: Optional[int] = None      # training resolution (multiple of 32); 512 real / 64 synthetic
    synthetic_train_images: int = 256
    synthetic_val_images: int = 64
    train_eval_images: int = 64           # un-augmented training images scored each epoch (train F-score)
    limit: Optional[int] = None           # only the first N images of each split (a quick run on a few images)
    pipeline: str = "auto"                # auto | loader | device: per-sample CPU DataLoader, or the data set
                                          # decoded once to a uint8 cache on the device and augmented there;
                                          # auto: device on CUDA, loader on CPU (same batches either way)
    cache_dir: Optional[str] = None       # where the device pipeline keeps its uint8 cache; None: <out>/cache
    num_workers: Optional[int] = None     # loader processes; None: 1 on a 2-core CPU, up to 8 on CUDA
    # model
    lmsa: bool = True
    backend: str = "eager"                # eager | triton
    dice_eps: float = 1.0
    decoder_dropout: float = 0.15         # SPEC §2; 0 makes a run independent of the dropout RNG stream
    paper_head_order: Optional[bool] = None  # eager: upsample features then classify (the paper); off: classify
                                          # at H/4 then upsample logits (same function, ~2× faster on CPU);
                                          # None: the paper's order on CUDA, H/4 on the CPU
    # optimisation (SPEC §5)
    epochs: Optional[int] = None          # planned epochs (cosine to 0 over them); 200 real / 10 synthetic
    batch_size: Optional[int] = None      # 32 real / 8 synthetic
    lr: float = 8e-4
    weight_decay: float = 1e-4
    warmup_epochs: Optional[float] = None  # linear warm-up; 5 real / 1 synthetic
    grad_clip: float = 1.0
    patience: int = 50                    # early stopping: epochs without a better val F-score
    amp: str = "auto"                     # auto | bf16 | fp16 | off; auto: bf16 on CUDA and on CPUs with native
                                          # bf16 (AVX512-BF16 / AMX), off (fp32) elsewhere; fp16 is CUDA only
    compile: bool = False                 # torch.compile(model.loss, fullgraph=True): one graph around the fused ops
    channels_last: bool = False           # model and images in channels-last memory format (measured no faster
                                          # on the 2-core CPU with bf16: bench/results/measured/cpu/train-speed.md)
    # run
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    seed: int = 0
    out: str = "runs"
    run_name: Optional[str] = None        # default: a timestamp
    progress: bool = True
    threads: Optional[int] = None         # torch CPU threads; None: torch's default
    max_minutes: Optional[float] = None   # end this session before an epoch would pass this wall time
                                          # (checkpointed; --resume continues the schedule)
    stop_after_epochs: Optional[int] = None  # end this session after this many epochs (resume continues)

    def resolve(self) -> "TrainConfig":
        defaults = SYNTHETIC_DEFAULTS if self.data is None else PAPER_DEFAULTS
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **filled)
        cfg.validate()
        return cfg

    def for_device(self, device) -> "TrainConfig":
        """The fields whose "auto" depends on the device (amp, paper_head_order)
        filled in for `device`; the training loop saves this resolved config with the run."""
        from msf.train.evaluate import resolve_amp  # torch-dependent; config stays importable without it
        on_cpu = device.type == "cpu"
        cfg = dataclasses.replace(
            self, amp=resolve_amp(self.amp, device),
            paper_head_order=not on_cpu if self.paper_head_order is None else self.paper_head_order)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % 32):
            raise ValueError(f"--image-size must be a positive multiple of 32, got {self.image_size}")
        if self.backend not in ("eager", "triton"):
            raise ValueError(f"--backend must be eager or triton, got {self.backend!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"--amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.pipeline not in ("auto", "loader", "device"):
            raise ValueError(f"--pipeline must be auto, loader or device, got {self.pipeline!r}")
        if not 0 <= self.decoder_dropout < 1:
            raise ValueError(f"--decoder-dropout must be in [0, 1), got {self.decoder_dropout}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"--max-minutes must be positive, got {self.max_minutes}")
        for name in ("epochs", "batch_size", "stop_after_epochs", "synthetic_train_images", "synthetic_val_images",
                     "train_eval_images", "threads", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{flag(name)} must be at least 1, got {value}")
        for name in ("num_workers", "patience", "weight_decay", "warmup_epochs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{flag(name)} must not be negative, got {value}")
        for name in ("lr", "grad_clip", "dice_eps"):
            if not getattr(self, name) > 0:  # (NaN fails too)
                raise ValueError(f"{flag(name)} must be positive, got {getattr(self, name)}")

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not what was meant (printed when a run starts)."""
        notes = []
        if self.epochs is not None and self.warmup_epochs is not None and self.epochs <= self.warmup_epochs:
            notes.append(f"--epochs {self.epochs} ends within the {self.warmup_epochs:g} warm-up epochs "
                         "(--warmup-epochs): the learning rate never reaches --lr nor decays")
        return notes


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--" + name.replace("_", "-")


# `msf train --help` text of every field (tests/test_cli_reliability.py checks none is missing).
FIELD_HELP = {
    "data": "data folder, mini layout (<split>/images + <split>/masks) or the original CelebAMask-HQ; "
            "default: the embedded synthetic faces",
    "train_split": "split folder to train on",
    "val_split": "split folder scored after each epoch (best.pt follows its F-score)",
    "image_size": "training resolution, a multiple of 32; default 512 with --data, 64 on synthetic faces",
    "synthetic_train_images": "training images drawn when there is no --data",
    "synthetic_val_images": "validation images drawn when there is no --data",
    "train_eval_images": "training images scored without augmentation each epoch (the train F-score)",
    "limit": "train and validate on only the first N images of each split (in file-name order; synthetic "
             "faces too): a quick run on a few images",
    "pipeline": "auto | loader | device: per-sample DataLoader on the CPU, or the data decoded once into a uint8 "
                "cache kept on the device and augmented there; auto: device on CUDA, and on the CPU for real "
                "data whose cache fits in a quarter of the available RAM, else loader",
    "cache_dir": "where --pipeline device keeps its decoded cache; default <out>/.cache",
    "num_workers": "DataLoader worker processes; default 1 on a 2-core CPU, up to 8 with CUDA; 0: in the main process",
    "lmsa": "the decoder's multi-scale attention (LMSA) block (SPEC §2)",
    "backend": "eager | triton: the fused Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1, very slow)",
    "dice_eps": "smoothing term of the Dice loss",
    "decoder_dropout": "dropout before the classifier (SPEC §2); 0 makes the run independent of the dropout RNG",
    "paper_head_order": "upsample the features, then classify (the paper); --no-paper-head-order classifies at H/4 "
                        "and upsamples the logits: the same function, about twice as fast on a CPU; default: the "
                        "paper's order on CUDA, H/4 on the CPU (the triton backend always classifies at H/4)",
    "epochs": "planned epochs (the cosine schedule ends at 0 after them); default 200 with --data, 10 synthetic",
    "batch_size": "global batch (split over torchrun processes); default 32 with --data, 8 synthetic",
    "lr": "peak AdamW learning rate, reached after the warm-up",
    "weight_decay": "AdamW weight decay",
    "warmup_epochs": "linear warm-up length in epochs (fractions allowed); default 5 with --data, 1 synthetic",
    "grad_clip": "gradient-norm clip",
    "patience": "early stopping: end after this many epochs without a better val F-score; 0 turns it off",
    "amp": "auto | bf16 | fp16 | off: autocast dtype; auto is bf16 on CUDA and on CPUs with native bf16 "
           "(AVX512-BF16 / AMX), fp32 on other CPUs; fp16 (CUDA only) adds a GradScaler; config.json records "
           "what the run used",
    "compile": "run the forward and loss under torch.compile (one graph, fullgraph=True; the triton backend's "
               "fused kernels enter it as msf:: operators); the first step compiles (minutes on a CPU): its time "
               "is logged as compile_seconds and left out of img/s",
    "channels_last": "model and images in channels-last memory format (on the 2-core CPU measured no faster than "
                     "contiguous with bf16, within noise in fp32)",
    "device": "auto | cpu | cuda | cuda:N",
    "seed": "seed of the weights, the shuffles, the augmentation and dropout",
    "out": "folder that holds the run folders",
    "run_name": "this run's folder name under --out; default: a timestamp",
    "progress": "progress bars",
    "threads": "torch CPU threads; default: torch's own choice",
    "max_minutes": "end this session before an epoch would pass this wall time (checkpointed; --resume continues)",
    "stop_after_epochs": "end this session after this many epochs (checkpointed; --resume continues)",
}


def _arg_type(hint: Any) -> tuple[Any, bool]:
    """(scalar type, is_optional) of a field's annotation."""
    if get_origin(hint) is not None and type(None) in get_args(hint):
        return next(a for a in get_args(hint) if a is not type(None)), True
    return hint, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig, help_texts: dict = FIELD_HELP,
                         with_defaults: bool = True) -> None:
    """One --flag per dataclass field, typed from its annotation; booleans get --x / --no-x.
    `with_defaults=False` leaves unset flags out of the parsed namespace (to see which were given)."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        kind, _ = _arg_type(hints[f.name])
        default = f.default if with_defaults else argparse.SUPPRESS
        text = help_texts.get(f.name, "")
        if kind is bool:
            parser.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=text)
        else:
            shown = "" if f.default is None or "default" in text else f" (default: {f.default})"
            parser.add_argument(flag(f.name), dest=f.name, type=kind, default=default, help=text + shown)


def given_fields(argv: list[str], cls: type = TrainConfig) -> set[str]:
    """The fields whose flags appear in `argv` (abbreviations and --no-x included)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser, cls, with_defaults=False)
    known, _ = parser.parse_known_args(argv)
    return set(vars(known))


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
