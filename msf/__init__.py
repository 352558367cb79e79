"""MicroSegFormer face parsing: the `FaceParser` API, model, data, loss and metric (eager PyTorch
references).

    from msf import FaceParser
    mask = FaceParser.from_pretrained()("face.jpg")   # H×W class ids, names in msf.CLASS_NAMES

The fused Triton kernels live in `kernels/` and are selected with `backend="triton"`.
"""
from msf.backend import BACKENDS, fused_op_names, get_ops
from msf.data import CLASS_NAMES, NUM_CLASSES, DataError, MiniFaceDataset, SyntheticFaces, open_dataset
from msf.losses import ce_dice_loss
from msf.metrics import FScoreMeter
from msf.model import MicroSegFormer, ModelConfig, count_parameters
from msf.parser import FaceParser

__all__ = [
    "BACKENDS", "CLASS_NAMES", "NUM_CLASSES", "DataError", "FScoreMeter", "FaceParser", "MicroSegFormer",
    "MiniFaceDataset", "ModelConfig", "SyntheticFaces", "ce_dice_loss", "count_parameters", "fused_op_names",
    "get_ops", "open_dataset",
]
