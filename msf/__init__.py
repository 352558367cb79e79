"""MicroSegFormer face parsing: the `FaceParser` API, model, data, loss and metric (eager PyTorch
references).

    from msf import FaceParser
    mask = FaceParser.from_pretrained()("face.jpg")   # H×W class ids, names in msf.CLASS_NAMES

The fused Triton kernels live in `kernels/` and are selected with `backend="triton"`.
"""
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

# In a checkout, the repository's other top-level packages are this package's subpackages:
# msf.kernels is kernels/, and so for each of _FOLDERS. An install (pyproject's package-dir) puts
# them inside msf/ and has nothing to map. Only these names are mapped: `msf.run` or `msf.msf`
# stay unimportable, so no file of the project is ever a module under two names.
_FOLDERS = ("kernels", "train", "bench", "profiling", "checking")
_CHECKOUT = _Path(__file__).resolve().parent.parent


class _CheckoutFolders(_abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        parent, _, child = name.partition(".")
        init = _CHECKOUT / child / "__init__.py"
        if parent != "msf" or child not in _FOLDERS or not init.is_file():
            return None
        return _util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


if (_CHECKOUT / "pyproject.toml").is_file() and not any(isinstance(f, _CheckoutFolders) for f in _sys.meta_path):
    _sys.meta_path.append(_CheckoutFolders())

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
