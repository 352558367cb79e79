"""The whole parse of an image as one graph, and its ONNX export and runtime.

`ParsingGraph` is what both inference engines compute, from a normalised B×3×H×W image of any size
to B×K×H×W class logits at that size:

    resize to S×S (bilinear, antialiased)  →  MicroSegFormer features  →  1×1 classifier at S/4
    →  bilinear upsample to H×W

S is the size the model was trained at. The classifier runs at H/4 before the upsample (the same
function as the paper's order, SPEC §2, a sixteenth of the work). `export_onnx` writes it (with the argmax, the
ids, as a second output) with dynamic batch, height and width (opset `OPSET`, torch.export-based exporter), the model's size
and class names in the file's metadata; `OnnxParsingSession` runs such a file with ONNX Runtime's
CPU provider. `msf.parser.FaceParser` is the user-facing API over both.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from msf.data import CLASS_NAMES
from msf.model import MicroSegFormer

OPSET = 20
INPUT_NAME, LOGITS, IDS = "images", "logits", "ids"
GRAPH_VERSION = 2  # 2: the ids output (ArgMax in the graph) beside the logits
METADATA_KEY = "msf"  # JSON: input_size, class_names, checkpoint digest, what the graph computes


def resize_to_model(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """B×3×H×W images at the model's S×S (bilinear, antialiased, so a large image is averaged down
    rather than sampled); unchanged when already that size."""
    if tuple(images.shape[-2:]) == (input_size, input_size):
        return images
    return F.interpolate(images, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)


class ParsingGraph(nn.Module):
    """Normalised B×3×H×W images (any H, W) → (B×K×H×W logits, B×H×W uint8 ids): resize to the
    model's size, the model with its classifier at S/4, bilinear upsample back to H×W, argmax.

    The argmax is in the graph because it is the slowest step outside it: over the 19 channels of a
    512² map, torch's `argmax(1)` takes ~45 ms on this project's CPU, ONNX Runtime's ArgMax ~2 ms
    (2026-12-04). A caller that needs only the ids fetches only them."""

    def __init__(self, model: MicroSegFormer, input_size: int):
        super().__init__()
        self.model = model.eval()
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        # always the resize, no shortcut at S×S: a branch on the shape would fix the exported
        # graph's height and width (at S×S the antialiased bilinear resize is the identity)
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True)
        logits = F.interpolate(self.model.low_res_logits(x), size=size, mode="bilinear", align_corners=False)
        return logits, logits.argmax(1).to(torch.uint8)


def export_onnx(model: MicroSegFormer, input_size: int, path: str | Path, checkpoint_digest: str = "") -> Path:
    """Write `model` as an ONNX `ParsingGraph` (dynamic batch, height, width), atomically. The
    eager backend is exported whatever `model.backend` is: the graph holds standard ops only."""
    try:
        import onnxscript  # noqa: F401  (the exporter's translator; a clear error beats its ImportError)
    except ImportError as exc:
        raise RuntimeError(f"ONNX export needs the `onnxscript` package ({exc})") from exc
    if model.backend != "eager":
        eager = MicroSegFormer.from_config(model.config, "eager")
        eager.load_state_dict(model.state_dict())
        model = eager
    path = Path(path)
    graph = ParsingGraph(model.float().cpu(), input_size).eval()
    example = torch.zeros(2, 3, input_size + 32, input_size + 64)  # no size the graph could specialise on
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(graph, (example,), dynamic_shapes={INPUT_NAME: {0: batch, 2: height, 3: width}},
                                        input_names=[INPUT_NAME], output_names=[LOGITS, IDS], opset_version=OPSET,
                                        dynamo=True, verbose=False)
        meta = {"input_size": input_size, "class_names": list(CLASS_NAMES[:model.config.num_classes]),
                "checkpoint_sha256": checkpoint_digest, "opset": OPSET, "graph_version": GRAPH_VERSION,
                "computes": "normalised B×3×H×W images -> B×K×H×W logits (resize to input_size, "
                            "classifier at input_size/4, bilinear upsample to H×W) and their B×H×W uint8 argmax"}
        program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
        program.save(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notes that say nothing about this graph (torchvision's ops not registered,
    deprecations inside torch.export) kept off the user's terminal; its errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_cache_dir() -> Path:
    """Where `cached_onnx` keeps its exports: $MSF_CACHE, else $XDG_CACHE_HOME/msf, else ~/.cache/msf."""
    root = os.environ.get("MSF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msf"
    return Path(root) / "onnx"


def cached_onnx(model: MicroSegFormer, input_size: int, checkpoint: str | Path) -> Path:
    """The ONNX export of `checkpoint` at `input_size`, exported on first use (about 10 s) and kept
    under `onnx_cache_dir()`, named by the checkpoint's digest, the size, the opset and torch's
    version (any of them changed: a new export)."""
    digest = file_digest(checkpoint)
    name = f"{digest[:20]}-s{input_size}-g{GRAPH_VERSION}-opset{OPSET}-torch{torch.__version__.split('+')[0]}.onnx"
    path = onnx_cache_dir() / name
    if not path.is_file():
        export_onnx(model, input_size, path, digest)
    return path


class OnnxParsingSession:
    """An exported `ParsingGraph` run by ONNX Runtime's CPU execution provider."""

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError(f"engine='onnxruntime' needs the `onnxruntime` package ({exc})") from exc
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            raise ValueError(f"{path}: not an ONNX model ONNX Runtime can load ({type(exc).__name__})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise ValueError(f"{path}: an ONNX file without msf metadata (write one with `msf export --onnx`)")
        self.metadata = json.loads(meta)
        if self.metadata.get("graph_version") != GRAPH_VERSION:
            raise ValueError(f"{path}: exported by another version of msf (graph {self.metadata.get('graph_version', 1)},"
                             f" this one reads {GRAPH_VERSION}); export it again with `msf export --onnx`")
        self.input_size = int(self.metadata["input_size"])
        self.class_names = tuple(self.metadata["class_names"])

    def logits(self, images: np.ndarray) -> np.ndarray:
        """B×K×H×W float32 logits of normalised B×3×H×W float32 images."""
        return self._run(LOGITS, images)

    def ids(self, images: np.ndarray) -> np.ndarray:
        """B×H×W uint8 class ids (the logits' argmax, computed in the graph) of normalised images."""
        return self._run(IDS, images)

    def _run(self, output: str, images: np.ndarray) -> np.ndarray:
        return self.session.run([output], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})[0]
