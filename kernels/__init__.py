"""Hand-written Triton kernels (forward and backward) for MicroSegFormer's hot paths.

One fused op per module: its Triton kernels, its `torch.autograd.Function`, its eager reference and
its `AOT_SPECS` for `python -m msf.profiling.report`. `TRITON_OPS` maps the op names of
`msf.backend.Ops` to each module's public entry (its autograd Function). `msf.backend` takes the
triton backend's table from `msf.kernels.ops.REGISTRY`, which pairs each of these entries (run
eagerly) with the same op as a `torch.library` operator (run under torch.compile); ops missing
there keep their eager version.
"""
from __future__ import annotations

from msf.kernels import attention as _attention  # the submodule stays reachable as msf.kernels.attention
from msf.kernels import attention_sublayer as _attention_sublayer
from msf.kernels import decoder_mlp as _decoder_mlp
from msf.kernels import ffn_sublayer as _ffn_sublayer
from msf.kernels import head_loss as _head_loss
from msf.kernels import lmsa as _lmsa
from msf.kernels import upsample_argmax as _upsample_argmax

TRITON_OPS: dict = {
    "attention": _attention.attention,
    "attention_sublayer": _attention_sublayer.attention_sublayer_for_model,
    "decoder_mlp": _decoder_mlp.decoder_mlp,
    "ffn_sublayer": _ffn_sublayer.ffn_sublayer,
    "head_loss": _head_loss.head_loss,
    "lmsa": _lmsa.lmsa,
    "upsample_argmax": _upsample_argmax.upsample_argmax,
}
