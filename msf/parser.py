"""`FaceParser`: face parsing from Python. Images in, 19-class id masks out, at each image's own size.

    from msf import FaceParser
    parser = FaceParser.from_pretrained()               # the committed reference model
    mask = parser("face.jpg")                           # H×W uint8 class ids, names in parser.class_names
    masks = parser([pil_image, hwc_uint8_array, chw_tensor], tta="flip")
    picture = parser.overlay(image, mask)               # the image with the parts painted and a legend

Every image is resized to the model's training size inside (antialiased), parsed, and its logits
upsampled back to the image's own size before the argmax (`msf.export.ParsingGraph`). Engines:

- "torch": the model in PyTorch (backend "eager" or "triton", fp32 or bf16 autocast).
- "onnxruntime": the same graph exported to ONNX (`msf export --onnx`, or exported on first use and
  cached, `msf.export.cached_onnx`) and run by ONNX Runtime's CPU provider.
- "auto" (the default): the fastest the environment has, by this project's measurements
  (bench/results/measured/cpu/inference.md): onnxruntime on a CPU when it is installed, torch otherwise;
  on CUDA, torch with bf16 autocast (and the triton backend when Triton is installed).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from msf.data import (CLASS_NAMES, OVERLAY_PALETTE, PALETTE, normalize, overlay as blend, read_image,
                      with_legend)
from msf.export import OnnxParsingSession, cached_onnx, resize_to_model
from msf.model import TTA_MODES, MicroSegFormer, mirror_average

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
ENGINES = ("auto", "torch", "onnxruntime")
DTYPES = ("auto", "float32", "bfloat16")
PALETTES = {"celebamask": PALETTE, "readable": OVERLAY_PALETTE}
# the committed reference model: models/ beside msf/ in a checkout, msf/models/ in an install
REFERENCE_MODEL = next((p for p in (Path(__file__).resolve().parent / "models" / "reference.safetensors",
                                    Path(__file__).resolve().parents[1] / "models" / "reference.safetensors")
                        if p.is_file()), Path(__file__).resolve().parents[1] / "models" / "reference.safetensors")


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """H×W×3 uint8 RGB of a path, a PIL image (any mode), an H×W×3 / H×W×4 / H×W uint8 array (PIL's
    layout), or a 3×H×W tensor (torchvision's layout: uint8, or float in [0, 1]); a clear
    ValueError for anything else."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be 3×H×W (torchvision's layout), got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.permute(1, 2, 0).cpu().numpy()
        if not image.is_floating_point():
            raise ValueError(f"a tensor image must be uint8 or float in [0, 1], got {image.dtype}")
        return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"an array image must be uint8 (H×W×3, PIL's layout), got {image.dtype}")
        if image.ndim == 2:
            return np.repeat(image[..., None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return np.ascontiguousarray(image[..., :3])
        raise ValueError(f"an array image must be H×W×3 (or H×W, H×W×4), got shape {image.shape}")
    raise ValueError(f"cannot read an image from a {type(image).__name__}: give a path, a PIL image, an H×W×3 uint8 "
                     "array or a 3×H×W tensor")


def _importable(*modules: str) -> bool:
    """Whether every module imports here (onnxruntime and onnxscript for the onnxruntime engine and
    its export on first use; triton for the triton backend)."""
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


class FaceParser:
    """A face parser: `parser(images)` gives each image's H×W uint8 mask of class ids.

    Build one with `FaceParser.from_pretrained(path)`. Masks index `class_names` (CelebAMask-HQ's
    19 classes, SPEC §3). `colorize` paints a mask, `overlay` blends it over its image with a legend.
    """

    def __init__(self, model: MicroSegFormer | None, input_size: int, *, engine: str = "torch",
                 device: str | torch.device = "cpu", dtype: str = "float32", tta: str = "none",
                 batch_size: int = 8, onnx_path: str | Path | None = None, threads: int | None = None,
                 channels_last: bool = False, compile: bool = False):
        if engine not in ("torch", "onnxruntime"):
            raise ValueError(f"engine must be torch or onnxruntime here (FaceParser.from_pretrained resolves auto), "
                             f"got {engine!r}")
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.engine, self.tta, self.batch_size = engine, tta, batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.input_size = input_size
        self.model = model
        self.session = None
        self.channels_last = channels_last
        self.compile_seconds: float | None = None
        if (channels_last or compile) and engine != "torch":
            raise ValueError("channels_last and compile apply to the torch engine")
        if engine == "onnxruntime":
            if onnx_path is None:
                raise ValueError("engine='onnxruntime' needs onnx_path (FaceParser.from_pretrained exports one)")
            self.session = OnnxParsingSession(onnx_path, threads)
            self.input_size = self.session.input_size
            self.class_names = self.session.class_names
        else:
            if model is None:
                raise ValueError("engine='torch' needs a model")
            self.model = model.eval().to(self.device)
            if channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
            self.class_names = CLASS_NAMES[:model.config.num_classes]
            if compile:  # one graph with dynamic shapes, compiled now (its time apart from any parse)
                from msf.train.evaluate import compile_for_inference
                self.compile_seconds = compile_for_inference(self.model, batch_size, input_size, self.device,
                                                             "bf16" if dtype == "bfloat16" else "off")

    # --- building ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, engine: str = "auto", device: str = "auto",
                        backend: str = "auto", dtype: str = "auto", tta: str = "none", batch_size: int = 8,
                        input_size: int | None = None, threads: int | None = None, channels_last: bool = False,
                        compile: bool = False) -> "FaceParser":
        """A parser of the model at `path`: a `.safetensors` release or `.pt` checkpoint (`msf
        export`, `msf train`), or an `.onnx` export (`msf export --onnx`, engine onnxruntime).
        Default: the committed reference model (models/reference.safetensors).

        engine: "auto" | "torch" | "onnxruntime" (see the module's docstring for what auto picks).
        device: "auto" (CUDA when there is one) | "cpu" | "cuda[:N]"; onnxruntime runs on the CPU.
        backend: the torch engine's kernels, "auto" (triton on CUDA when installed, else eager) |
        "eager" | "triton". dtype: "auto" (bfloat16 autocast on CUDA, float32 on a CPU) |
        "float32" | "bfloat16". input_size: the size the model sees (default: its training size).
        threads: onnxruntime's intra-op threads (default: its own choice). channels_last, compile:
        the torch engine's model in channels-last memory format, under torch.compile (compiled
        when the parser is built; `compile_seconds` says how long it took).
        """
        from msf.train.checkpoint import load_model  # checkpoint reading lives with training
        path = Path(path) if path is not None else REFERENCE_MODEL
        for name, value, allowed in (("engine", engine, ENGINES), ("dtype", dtype, DTYPES),
                                     ("backend", backend, ("auto", "eager", "triton"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                              ("cpu" if device == "auto" else device))
        if path.suffix == ".onnx":
            if engine == "torch":
                raise ValueError(f"{path}: an ONNX file runs with engine='onnxruntime' (or 'auto')")
            engine = "onnxruntime"
        elif engine == "auto":  # the triton backend, channels-last or compile asked for by name run in torch
            engine = ("onnxruntime" if device.type == "cpu" and backend != "triton" and not (channels_last or compile)
                      and _importable("onnxruntime", "onnxscript") else "torch")
        if engine == "onnxruntime" and device.type != "cpu":
            raise ValueError("engine='onnxruntime' runs on the CPU here; give device='cpu'")
        if path.suffix == ".onnx":
            return cls(None, 0, engine="onnxruntime", tta=tta, batch_size=batch_size, onnx_path=path, threads=threads)
        if backend == "auto":
            backend = "triton" if device.type == "cuda" and _importable("triton") else "eager"
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        model, train_config = load_model(path, backend if engine == "torch" else "eager")
        size = input_size or train_config.get("image_size") or 512
        if size % MicroSegFormer.STRIDE:
            raise ValueError(f"input_size must be a multiple of {MicroSegFormer.STRIDE}, got {size}")
        if engine == "onnxruntime":
            return cls(None, size, engine="onnxruntime", tta=tta, batch_size=batch_size,
                       onnx_path=cached_onnx(model, size, path), threads=threads)
        return cls(model, size, engine="torch", device=device, dtype=dtype, tta=tta, batch_size=batch_size,
                   channels_last=channels_last, compile=compile)

    def __repr__(self) -> str:
        where = (f"onnxruntime, {self.session.path.name}" if self.engine == "onnxruntime" else
                 f"torch, backend {self.model.backend}, {self.dtype}, {self.device}")
        return f"FaceParser({where}, input {self.input_size}², tta {self.tta})"

    # --- parsing ----------------------------------------------------------------------------------
    def __call__(self, images: ImageLike | Sequence[ImageLike], tta: str | None = None
                 ) -> np.ndarray | list[np.ndarray]:
        """H×W uint8 class ids of one image, or a list of them for a list of images, each at its own
        size. `tta="flip"` averages the logits of each image and its mirror (left/right parts
        swapped back); default: the parser's `tta`."""
        single = not isinstance(images, (list, tuple))
        arrays = [as_rgb_array(image) for image in ([images] if single else images)]
        masks = self.parse_arrays(arrays, self.tta if tta is None else tta)
        return masks[0] if single else masks

    def parse_arrays(self, arrays: list[np.ndarray], tta: str) -> list[np.ndarray]:
        """Masks of H×W×3 uint8 images: those of one size go through the model together, up to
        `batch_size` at a time."""
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        masks: list[np.ndarray | None] = [None] * len(arrays)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, array in enumerate(arrays):
            by_size.setdefault(array.shape[:2], []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batch = torch.from_numpy(np.stack([arrays[i] for i in chunk])).permute(0, 3, 1, 2)
                for i, ids in zip(chunk, self._parse_batch(normalize(batch.float().div_(255)), tta)):
                    masks[i] = ids
        return masks

    @torch.no_grad()
    def _parse_batch(self, images: torch.Tensor, tta: str) -> np.ndarray:
        """B×H×W uint8 ids of normalised B×3×H×W float32 images (on the CPU)."""
        if self.engine == "onnxruntime":
            if tta == "none":
                return self.session.ids(images.numpy())
            logits = torch.from_numpy(self.session.logits(images.numpy()))
            of_mirror = torch.from_numpy(self.session.logits(images.flip(-1).numpy()))
            # max(1).indices: argmax's first-maximum rule, ~7x faster than argmax(1) over channels on a CPU
            return mirror_average(logits, of_mirror).max(1).indices.byte().numpy()
        x = resize_to_model(images.to(self.device), self.input_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")
        with autocast:
            ids = self.model.predict_variants(x, tuple(images.shape[-2:]), (tta,))[tta]
        return ids.byte().cpu().numpy()

    # --- pictures ---------------------------------------------------------------------------------
    @staticmethod
    def colorize(mask: np.ndarray, palette: str = "celebamask") -> np.ndarray:
        """H×W×3 uint8 colours of an id mask: "celebamask", the data set's own palette (its colour
        masks look like this), or "readable", colours a person tells apart (`overlay` uses them)."""
        if palette not in PALETTES:
            raise ValueError(f"palette must be one of {', '.join(PALETTES)}, got {palette!r}")
        return PALETTES[palette][np.asarray(mask)]

    @staticmethod
    def overlay(image: ImageLike, mask: np.ndarray, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        """H×W×3 uint8: the image with the mask's parts painted over it (readable palette,
        background left as is) and, with `legend`, a column naming each part painted."""
        array = as_rgb_array(image)
        mask = np.asarray(mask)
        if mask.shape != array.shape[:2]:
            raise ValueError(f"mask is {mask.shape[1]}×{mask.shape[0]} but the image is "
                             f"{array.shape[1]}×{array.shape[0]}")
        painted = blend(array, mask, alpha)
        return with_legend(painted, np.unique(mask).tolist()) if legend else painted
