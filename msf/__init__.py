"""MicroSegFormer face parsing: the `FaceParser` API, model, data, loss and metric (eager PyTorch
references).

    from msf import FaceParser
    mask = FaceParser.from_pretrained()("face.jpg")   # H×W class ids, names in msf.CLASS_NAMES

The fused Triton kernels live in `kernels/` and are selected with `backend="triton"`.
"""
from pathlib import Path as _Path

# In a checkout, the repository's other top-level packages (kernels/, train/, bench/, profiling/,
# checking/) are this package's subpackages, msf.kernels and so on: the folder above msf/ joins
# msf's search path. An install (pyproject's package-dir) puts them inside msf/ instead, and there
# is nothing to add. Only `msf` is ever importable at the top level from the project.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "kernels" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

from msf.backend import BACKENDS, fused_op_names, get_ops  # noqa: E402
from msf.data import CLASS_NAMES, NUM_CLASSES, DataError, MiniFaceDataset, SyntheticFaces, open_dataset  # noqa: E402
from msf.losses import ce_dice_loss  # noqa: E402
from msf.metrics import FScoreMeter  # noqa: E402
from msf.model import MicroSegFormer, ModelConfig, count_parameters  # noqa: E402
from msf.parser import FaceParser  # noqa: E402

__all__ = [
    "BACKENDS", "CLASS_NAMES", "NUM_CLASSES", "DataError", "FScoreMeter", "FaceParser", "MicroSegFormer",
    "MiniFaceDataset", "ModelConfig", "SyntheticFaces", "ce_dice_loss", "count_parameters", "fused_op_names",
    "get_ops", "open_dataset",
]
