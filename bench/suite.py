"""`msf bench`: fused ops and the whole training step, eager against torch.compile against Triton.

    msf bench [--preset paper|smoke|cpu] [--suite ops|step|all]
              [--providers eager,compile,triton,triton+compile,sdpa] [--interleave]
              [--out bench/out] [--name NAME] [--budget-s 300]

`paper` is SPEC §6's shapes (B=32, 512×512, bf16 AMP) and needs CUDA; `smoke` runs the same code at
a small size on whatever is there (on a CPU the Triton provider needs TRITON_INTERPRET=1): it
proves the commands work, it is no timing claim. `cpu` is the CPU training recipe (B=16, 256²,
bf16 autocast, classifier at H/4) for eager against compile on a CPU. Each row: the median ms of
its timed calls (CUDA events; `msf.bench.harness.STATISTIC`, the one figure console, JSON and Markdown
all show), images/s, peak memory, computed bytes moved, achieved GB/s and its share of the
device-to-device copy bandwidth measured in the same run; per case, each provider's speed-up over
eager as the ratio of the two medians shown.

A CPU times eager and torch.compile (the default providers there); the Triton kernels run on a CPU
only through the interpreter, which is no speed. Beside each CPU row the cost model's predicted
GPU speed-up for the same op is printed, labelled as a prediction (`msf.bench.predicted`). A provider
that ran the eager code for a case (fp32 attention at head dim 192) is labelled "(eager fallback)".
Results go to the git-ignored bench/out/ unless --out says otherwise.

Providers: `eager` (plain PyTorch), `compile` (torch.compile of eager), `triton` (the fused
kernels), `triton+compile` (torch.compile around the fused kernels: they enter the graph as the
`msf::` operators of kernels/ops.py), `sdpa` (attention only). A compiled provider's first call
compiles; its time is reported in a `compile_time` row of its own, never in the step times.
`--interleave` times the providers of a case in turns (one call each, the order alternating),
so that a machine shared with other work slows them alike; otherwise each runs its repeats in a row.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from msf.bench.plots import plot_bench
from msf.bench.harness import (STATISTIC, copy_bandwidth_gbs, environment, measure_interleaved, measure_ms, median,
                               row, write_results)
from msf.backend import (LMSAParams, eager_attention, eager_lmsa, eager_lmsa_classifier, eager_upsample_argmax,
                         get_ops)
from msf.losses import ce_dice_loss
from msf.nvtx import nvtx_range

PRESETS = {
    "paper": {"batch": 32, "size": 512, "dtype": torch.bfloat16, "reps": 30, "warmup": 5},
    "smoke": {"batch": 2, "size": 64, "dtype": torch.float32, "reps": 2, "warmup": 1},
    "cpu": {"batch": 16, "size": 256, "dtype": torch.bfloat16, "reps": 10, "warmup": 2, "paper_head_order": False},
}
COMPILED = ("compile", "triton+compile")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "bench/out"  # git-ignored: committing a result is a deliberate --out under bench/results/
CPU_NOTE = ("On a CPU this measures eager PyTorch and torch.compile; the Triton kernels run here only through "
            "Triton's interpreter, a correctness tool whose times say nothing about GPU speed. The GPU speed-up "
            "the project claims is the cost model's prediction, shown beside each op and labelled as such.")
STAGES = [(1, 32, 8), (2, 64, 4), (3, 128, 2), (4, 192, 1)]  # (stage, channels, SR ratio)


@dataclass
class Case:
    op: str
    size: str
    images: int
    passes: dict[str, dict[str, Callable[[], Callable[[], object]]]]  # pass -> provider -> builder of the call
    bytes_moved: dict[str, int]                          # provider -> bytes of fwd+bwd (or fwd) pass
    fallbacks: dict[str, str] = field(default_factory=dict)  # provider -> why it runs the eager code here


def _randn(*shape, device, dtype, grad=True):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def call():
        out = fn()
        (out if out.dim() == 0 else out.float().square().mean()).backward()
    return call


def _builders(providers: dict[str, Callable[[], torch.Tensor]], backward: bool) -> dict[str, Callable]:
    """provider -> builder of the timed call; "compile" is torch.compile of the eager function,
    "triton+compile" of the triton one."""
    wrap = _fwd_bwd if backward else (lambda f: f)
    builders = {p: (lambda f=f: wrap(f)) for p, f in providers.items()}
    builders["compile"] = lambda: wrap(torch.compile(providers["eager"], fullgraph=True))
    if "triton" in providers:
        builders["triton+compile"] = lambda: wrap(torch.compile(providers["triton"], fullgraph=True))
    return builders


def head_loss_case(batch, size, device, dtype) -> Case:
    h = size // 4
    feats = _randn(batch, 128, h, h, device=device, dtype=dtype)
    weight = _randn(19, 128, 1, 1, device=device, dtype=dtype)
    bias = _randn(19, device=device, dtype=dtype)
    targets = torch.randint(0, 19, (batch, size, size), device=device, dtype=torch.uint8)

    def paper_order():
        up = F.interpolate(feats, scale_factor=4, mode="bilinear", align_corners=False)
        return ce_dice_loss(F.conv2d(up, weight, bias), targets)

    def fused():
        return get_ops("triton").head_loss(F.conv2d(feats, weight, bias), targets)

    from msf.bench.bytes_head_loss import ops as head_ops, totals as head_totals
    e = dtype.itemsize
    eager_bytes = head_totals(head_ops("eager-paper", B=batch, H=size, W=size, act=e))["total"]
    fused_bytes = head_totals(head_ops("fused", B=batch, H=size, W=size, act=e))["total"]
    providers = {"eager": paper_order, "triton": fused}
    return Case("head+ce_dice", f"B={batch},{size}²", batch,
                {"fwd+bwd": _builders(providers, backward=True)},
                {"eager": eager_bytes, "compile": eager_bytes, "triton": fused_bytes, "triton+compile": fused_bytes})


def attention_cases(batch, size, device, dtype) -> list[Case]:
    from msf.bench.bytes_attention import totals as attn_totals
    cases = []
    for stage, d, ratio in STAGES:
        side = size // (4 * 2 ** (stage - 1))
        n, m = side * side, (side // ratio) ** 2
        q = _randn(batch, n, d, device=device, dtype=dtype)
        kv = _randn(batch, m, 2 * d, device=device, dtype=dtype)
        k, v = kv[..., :d], kv[..., d:]
        providers = {
            "eager": lambda q=q, k=k, v=v: eager_attention(q, k, v),
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            "triton": lambda q=q, k=k, v=v: get_ops("triton").attention(q, k, v),
        }
        e = dtype.itemsize
        bytes_moved = {p: sum(attn_totals(v_, batch, n, m, d, e)) for p, v_ in
                       (("eager", "eager"), ("compile", "eager"), ("sdpa", "sdpa"), ("triton", "fused"),
                        ("triton+compile", "fused"))}
        fallback = _attention_fallback(dtype, d)
        cases.append(Case(f"attention/stage{stage}", f"B={batch},N={n},M={m},d={d}", batch,
                          {"fwd+bwd": _builders(providers, backward=True)}, bytes_moved,
                          {p: fallback for p in ("triton", "triton+compile") if fallback}))
    return cases


def _attention_fallback(dtype: torch.dtype, d: int) -> str | None:
    """Why `get_ops("triton").attention` runs the eager formula at this dtype and head dim (None
    when it runs the kernels): the dispatch rule of kernels/ops.py, asked rather than copied."""
    try:
        from msf.kernels.attention import fused_supported
    except ImportError:  # no Triton: the triton provider fails on its own, with that error
        return None
    if fused_supported(dtype, d):
        return None
    return (f"{str(dtype).removeprefix('torch.')} at head dim {d} is not served by the kernels "
            "(msf.kernels.attention.fused_supported): the eager formula ran")


def ffn_cases(batch, size, device, dtype) -> list[Case]:
    """The block's FFN sublayer (LayerNorm, fc1, GELU, fc2, residual) at each stage's tokens and C,
    hidden 2C. Under the step's AMP the activations and parameters are fp32 (autocast's own
    policy); here both are in the preset's dtype, so the eager and fused paths see the same tensors."""
    from msf.backend import eager_ffn_sublayer
    cases = []
    for stage, c, _ in STAGES:
        side = size // (4 * 2 ** (stage - 1))
        n, hid = side * side, 2 * c
        args = [_randn(batch, n, c, device=device, dtype=dtype)] + \
            [_randn(*shape, device=device, dtype=dtype) for shape in ((c,), (c,), (hid, c), (hid,), (c, hid), (c,))]
        providers = {"eager": lambda args=args: eager_ffn_sublayer(*args),
                     "triton": lambda args=args: get_ops("triton").ffn_sublayer(*args)}
        cases.append(Case(f"ffn/stage{stage}", f"B={batch},N={n},C={c},H={hid}", batch,
                          {"fwd+bwd": _builders(providers, backward=True)}, {}))
    return cases


def _block_params(c: int, ratio: int, device, dtype):
    """An attention half's parameters (`AttentionBlockParams`) at C channels and SR ratio R, W_sr
    channels-last as the model keeps it (`msf.model.MicroSegFormer`: the weight cast reads it so)."""
    from msf.backend import AttentionBlockParams
    conv = ((c, c, ratio, ratio), (c,), (c,), (c,)) if ratio > 1 else ()
    shapes = ((c,), (c,), *conv, (2 * c, c), (2 * c,), (c, c), (c,), (c, c), (c,))
    ts = [_randn(*shape, device=device, dtype=dtype) for shape in shapes]
    if ratio == 1:
        ts[2:2] = [None] * 4
    else:
        ts[2] = ts[2].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return AttentionBlockParams(*ts)


def attention_block_cases(batch, size, device, dtype) -> list[Case]:
    """The block's attention half (LayerNorm, key/value path, attention sublayer, residual) at each
    stage's map, C and SR ratio, all tensors in the preset's dtype: the eager block against the
    fused op (which composes the eager pieces where the kernels do not serve: fp32 above C = 64).
    "attn_block_embed/stageN": a stage's first block, in the model's case whatever the preset's
    dtype (bf16 autocast, fp32 parameters): the convolution's bf16 map in (NCHW at stage 1,
    channels-last after, as the model's convolutions give it), the patch embedding's LayerNorm
    first (eager) or inside the block (triton)."""
    from msf.backend import EmbedNorm, eager_attention_block
    cases = []
    for stage, c, ratio in STAGES:
        side = size // (4 * 2 ** (stage - 1))
        x = _randn(batch, side * side, c, device=device, dtype=dtype)
        p = _block_params(c, ratio, device, dtype)
        providers = {"eager": lambda x=x, p=p, r=ratio, s=side: eager_attention_block(x, (s, s), r, p),
                     "triton": lambda x=x, p=p, r=ratio, s=side: get_ops("triton").attention_block(x, (s, s), r, p)}
        cases.append(Case(f"attn_block/stage{stage}", f"B={batch},{side}²,C={c},R={ratio}", batch,
                          {"fwd+bwd": _builders(providers, backward=True)}, {}))
        conv_map = _randn(batch, c, side, side, device=device, dtype=torch.bfloat16)
        if stage > 1:
            conv_map = conv_map.detach().to(memory_format=torch.channels_last).requires_grad_()
        p32 = _block_params(c, ratio, device, torch.float32)
        embed = EmbedNorm(_randn(c, device=device, dtype=torch.float32), _randn(c, device=device, dtype=torch.float32))
        providers = {name: _autocast(lambda name=name, m=conv_map, p=p32, e=embed, r=ratio, s=side:
                                     get_ops(name).attention_block(m, (s, s), r, p, embed_norm=e), device)
                     for name in ("eager", "triton")}
        cases.append(Case(f"attn_block_embed/stage{stage}", f"B={batch},{side}²,C={c},R={ratio}", batch,
                          {"fwd+bwd": _builders(providers, backward=True)}, {}))
    return cases


def _autocast(fn: Callable[[], torch.Tensor], device) -> Callable[[], torch.Tensor]:
    def call():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return fn()
    return call


def stage_norm_cases(batch, size, device, dtype) -> list[Case]:
    """The LayerNorms between stages, in the model's case whatever the preset's dtype: under bf16
    autocast, fp32 γ, β. "map_norm/stageN": the patch embedding's norm of the convolution's bf16
    NCHW map. "stage_output/stageN": the stage-final norm of the fp32 tokens, with (stages 1-3) the
    bf16 map the next convolution reads; eager's convolution would cast it, so the eager provider
    does the cast it implies (what the fused op absorbs) and both sum the two maps' gradients.
    "ffn_stage/stageN": the same norm after the stage's last FFN sublayer, as the model runs it."""
    from msf.backend import StageNorm, eager_map_layer_norm
    cases = []
    for stage, c, _ in STAGES:
        side = size // (4 * 2 ** (stage - 1))
        conv_map = _randn(batch, c, side, side, device=device, dtype=torch.bfloat16)
        tokens = _randn(batch, side * side, c, device=device, dtype=torch.float32)
        w, b = _randn(c, device=device, dtype=torch.float32), _randn(c, device=device, dtype=torch.float32)
        providers = {"eager": lambda x=conv_map, w=w, b=b: eager_map_layer_norm(x, w, b),
                     "triton": lambda x=conv_map, w=w, b=b: get_ops("triton").map_layer_norm(x, w, b, 1e-5)}
        cases.append(Case(f"map_norm/stage{stage}", f"B={batch},{side}²,C={c}", batch,
                          {"fwd+bwd": _builders({k: _autocast(f, device) for k, f in providers.items()},
                                                backward=True)}, {}))
        feeds_next, decoder_linear = stage < len(STAGES), True  # as msf.model.Stage calls it

        def both(ops_name, t=tokens, w=w, b=b, s=side, nxt=feeds_next, lin=decoder_linear):
            return _maps_loss(*get_ops(ops_name).stage_output(t, (s, s), w, b, 1e-5, nxt, lin), nxt, lin)
        providers = {"eager": lambda f=both: f("eager"), "triton": lambda f=both: f("triton")}
        cases.append(Case(f"stage_output/stage{stage}", f"B={batch},{side}²,C={c}", batch,
                          {"fwd+bwd": _builders({k: _autocast(f, device) for k, f in providers.items()},
                                                backward=True)}, {}))
        # "ffn_stage/stageN": the stage's last FFN sublayer with that norm (what the model runs at a
        # stage's end: on triton the norm inside the FFN's forward kernel), fp32 tokens and parameters
        hid = 2 * c
        ffn_args = [tokens] + [_randn(*shape, device=device, dtype=torch.float32)
                               for shape in ((c,), (c,), (hid, c), (hid,), (c, hid), (c,))]

        def stage_end(ops_name, args=ffn_args, w=w, b=b, s=side, nxt=feeds_next, lin=decoder_linear):
            norm = StageNorm(w, b, 1e-5, (s, s), nxt, lin)
            return _maps_loss(*get_ops(ops_name).ffn_sublayer(*args, 1e-5, norm), nxt, lin)
        providers = {"eager": lambda f=stage_end: f("eager"), "triton": lambda f=stage_end: f("triton")}
        cases.append(Case(f"ffn_stage/stage{stage}", f"B={batch},{side}²,C={c},H={hid}", batch,
                          {"fwd+bwd": _builders({k: _autocast(f, device) for k, f in providers.items()},
                                                backward=True)}, {}))
    return cases


def _maps_loss(feature, next_input, feeds_next: bool, decoder_linear: bool) -> torch.Tensor:
    """A scalar of a stage's two output maps for the timed backward, after the casts eager's readers
    would make (the next convolution's, the decoder projection's), which the fused op absorbs."""
    if feeds_next and next_input.dtype == torch.float32:
        next_input = next_input.to(torch.bfloat16)
    if decoder_linear and feature.dtype == torch.float32:
        feature = feature.to(torch.bfloat16)
    return feature.float().square().mean() + next_input.float().square().mean()


def decoder_mlp_case(batch, size, device, dtype) -> Case:
    """The decoder up to LMSA (unify, upsample, concat, fuse MLP with dropout 0.15 in training) on the
    four stages' maps, E = 128: eager's concat form against the fused fold."""
    from msf.backend import DecoderParams, eager_decoder_mlp
    from msf.model import ModelConfig
    cfg, e = ModelConfig(), 128
    sides = [size // 4 // 2 ** i for i in range(4)]
    features = [_randn(batch, c, s, s, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                for c, s in zip(cfg.channels, sides)]
    params = DecoderParams(tuple(_randn(e, c, device=device, dtype=dtype) for c in cfg.channels),
                           tuple(_randn(e, device=device, dtype=dtype) for _ in cfg.channels),
                           _randn(e, 4 * e, device=device, dtype=dtype), _randn(e, device=device, dtype=dtype),
                           _randn(e, e, device=device, dtype=dtype), _randn(e, device=device, dtype=dtype))
    args = (features, params, cfg.decoder_dropout, True)
    providers = {"eager": lambda: eager_decoder_mlp(*args), "triton": lambda: get_ops("triton").decoder_mlp(*args)}
    fallback = "fp32 at E = 128: eager ran" if dtype == torch.float32 else None
    return Case("decoder_mlp", f"B={batch},E={e},{sides[0]}²", batch, {"fwd+bwd": _builders(providers, backward=True)},
                {}, {p: fallback for p in ("triton", "triton+compile") if fallback})


def _lmsa_inputs(batch, size, device, dtype) -> tuple[torch.Tensor, LMSAParams]:
    """LMSA's input at the decoder's resolution (C = 128, size/4 square) and its parameters."""
    h, c = size // 4, 128
    x = _randn(batch, c, h, h, device=device, dtype=dtype)
    params = LMSAParams(
        dw_weights=tuple(_randn(c, 1, k, k, device=device, dtype=dtype) for k in (3, 5, 7)),
        pw_weights=tuple(_randn(c, c, device=device, dtype=dtype) for _ in range(3)),
        pw_biases=tuple(_randn(c, device=device, dtype=dtype) for _ in range(3)),
        fc1_weight=_randn(48, 3 * c, device=device, dtype=dtype), fc1_bias=_randn(48, device=device, dtype=dtype),
        fc2_weight=_randn(3 * c, 48, device=device, dtype=dtype), fc2_bias=_randn(3 * c, device=device, dtype=dtype))
    return x, params


def _lmsa_bytes(x: torch.Tensor, classes: int = 0) -> dict[str, int]:
    """Each provider's bytes of one fwd+bwd (`msf.bench.bytes_lmsa`: compile counted as eager)."""
    from msf.bench.bytes_lmsa import ops as lmsa_ops, totals as lmsa_totals
    b, c, h, w = x.shape

    def total(variant: str) -> int:
        return sum(lmsa_totals(lmsa_ops(variant, B=b, C=c, H=h, W=w, e=x.element_size(), classes=classes)).values())
    return {"eager": total("eager"), "compile": total("eager"), "triton": total("fused"),
            "triton+compile": total("fused")}


def lmsa_case(batch, size, device, dtype) -> Case:
    x, params = _lmsa_inputs(batch, size, device, dtype)
    providers = {"eager": lambda: eager_lmsa(x, params), "triton": lambda: get_ops("triton").lmsa(x, params)}
    return Case("lmsa", f"B={batch},C={x.shape[1]},{x.shape[2]}²", batch,
                {"fwd+bwd": _builders(providers, backward=True)}, _lmsa_bytes(x))


def lmsa_classifier_case(batch, size, device, dtype, classes: int = 19) -> Case:
    """LMSA with the decoder's 1×1 classifier on its output (what the model's step runs: on triton the
    classifier is inside LMSA's kernels)."""
    x, params = _lmsa_inputs(batch, size, device, dtype)
    weight = _randn(classes, x.shape[1], device=device, dtype=dtype)
    bias = _randn(classes, device=device, dtype=dtype)
    args = (x, params, weight, bias)
    providers = {"eager": lambda: eager_lmsa_classifier(*args),
                 "triton": lambda: get_ops("triton").lmsa_classifier(*args)}
    return Case("lmsa_classifier", f"B={batch},C={x.shape[1]},K={classes},{x.shape[2]}²", batch,
                {"fwd+bwd": _builders(providers, backward=True)}, _lmsa_bytes(x, classes))


def upsample_argmax_case(batch, size, device, dtype) -> Case:
    logits = torch.randn(batch, 19, size // 4, size // 4, device=device, dtype=dtype)
    e = dtype.itemsize
    low, full = logits.numel() * e, batch * size * size
    providers = {"eager": lambda: eager_upsample_argmax(logits, (size, size)),
                 "triton": lambda: get_ops("triton").upsample_argmax(logits, (size, size))}
    # eager writes and re-reads full-res logits, then writes int64 ids; fused reads z, writes int64 ids
    return Case("upsample+argmax", f"B={batch},{size}²", batch, {"fwd": _builders(providers, backward=False)},
                {"eager": low + 2 * 19 * full * e + 8 * full, "compile": low + 8 * full, "triton": low + 8 * full,
                 "triton+compile": low + 8 * full})


def train_step_case(batch, size, device, dtype, paper_head_order: bool = True) -> Case:
    """The whole training step of `msf.profiling.step` (forward, loss, backward, clip, AdamW)."""
    from msf.profiling.step import build_step
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")

    def builder(backend, compiled):
        return lambda: build_step(backend, batch, size, amp, device, compiled=compiled,
                                  paper_head_order=paper_head_order)
    builders = {"eager": builder("eager", False), "compile": builder("eager", True),
                "triton": builder("triton", False), "triton+compile": builder("triton", True)}
    return Case("train_step", f"B={batch},{size}²", batch, {"step": builders}, {})


def build_cases(suite: str, preset: dict, device: torch.device) -> list[Case]:
    """The cases of `suite` (ops, step or all) at the preset's batch, size and dtype."""
    batch, size, dtype = preset["batch"], preset["size"], preset["dtype"]
    cases = []
    if suite in ("ops", "all"):
        # LMSA with the classifier first: the step's largest fused op (a --budget-s run cut short still has it)
        cases += [lmsa_classifier_case(batch, size, device, dtype), head_loss_case(batch, size, device, dtype),
                  *attention_cases(batch, size, device, dtype),
                  *attention_block_cases(batch, size, device, dtype), *ffn_cases(batch, size, device, dtype),
                  *stage_norm_cases(batch, size, device, dtype),
                  decoder_mlp_case(batch, size, device, dtype), lmsa_case(batch, size, device, dtype),
                  upsample_argmax_case(batch, size, device, dtype)]
    if suite in ("step", "all"):
        cases.append(train_step_case(batch, size, device, dtype, preset.get("paper_head_order", True)))
    return cases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _repo_path(path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


SLOW_CALL_S = 2.0  # a call at least this long gets a progress line of its own


def _say(text: str) -> None:
    print(text, flush=True)


def _call_progress(label: str) -> Callable[[int, int, float], None]:
    """`measure_ms`'s `on_call`: a line per call once calls take seconds (a CPU step takes ~45 s,
    a preset minutes), nothing for fast ones."""
    def on_call(done: int, total: int, ms: float) -> None:
        if ms >= SLOW_CALL_S * 1e3:
            _say(f"    {label}: call {done}/{total} took {ms / 1e3:.1f} s")
    return on_call


def _prepare(builders: dict, provider: str, device: torch.device, label: str
             ) -> tuple[Callable[[], object], float | None]:
    """The timed call of `provider`, and for a compiled provider its first call's time (the compile)."""
    fn = builders[provider]()
    compile_s = None
    if provider in COMPILED:  # the first call compiles; time it apart from the runs
        _say(f"    {label}: compiling (torch.compile, the first call) ...")
        started = time.perf_counter()
        fn()
        _sync(device)
        compile_s = time.perf_counter() - started
        _say(f"    {label}: compiled in {compile_s:.1f} s (not in the timings)")
    return fn, compile_s


def provider_label(case: Case, provider: str) -> str:
    """The provider as a row names it: a provider that ran the eager code for this case says so."""
    return f"{provider} (eager fallback)" if provider in case.fallbacks else provider


def _rows(case: Case, provider: str, pass_: str, ms: list[float], compile_s: float | None, device, env: dict,
          copy_gbs: float, **notes) -> list[dict]:
    label = provider_label(case, provider)
    if provider in case.fallbacks:
        notes["fallback"] = case.fallbacks[provider]
    extra = dict(notes)
    if device.type == "cuda":
        extra["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 1e6
    rows = [row(case.op, label, pass_, "time", "ms", case.size, ms, env, **extra),
            row(case.op, label, pass_, "throughput", "images/s", case.size,
                [case.images / (t * 1e-3) for t in ms], env, **notes)]
    if "peak_memory_mb" in extra:
        rows.append(row(case.op, label, pass_, "peak_memory", "MB", case.size, extra["peak_memory_mb"], env))
    if compile_s is not None:
        rows.append(row(case.op, label, pass_, "compile_time", "s", case.size, compile_s, env, **notes))
    nbytes = case.bytes_moved.get(provider)
    if nbytes and provider not in case.fallbacks:
        gbs = nbytes / (median(ms) * 1e-3) / 1e9
        rows.append(row(case.op, label, pass_, "bytes_moved", "MB", case.size, nbytes / 1e6, env))
        rows.append(row(case.op, label, pass_, "achieved_bandwidth", "GB/s", case.size, gbs, env,
                        copy_bandwidth_gbs=copy_gbs, percent_of_copy=100 * gbs / copy_gbs))
    _say(f"  {case.op:22s} {label:24s} {pass_:8s} {rows[0]['p50']:10.3f} ms {STATISTIC} of {len(ms)}"
         + (f"  (compile {compile_s:.1f} s)" if compile_s is not None else "")
         + (f"  [{case.fallbacks[provider]}]" if provider in case.fallbacks else ""))
    return rows


def speedup_rows(case: Case, pass_: str, medians: dict[str, float], env: dict, **notes) -> list[dict]:
    """Each provider's speed-up over eager (else the first provider timed), computed from the
    medians printed just above it: baseline median ÷ provider median (> 1: faster)."""
    if len(medians) < 2:
        return []
    base = "eager" if "eager" in medians else next(iter(medians))
    rows = []
    for provider, ms in medians.items():
        if provider == base:
            continue
        label, base_label = provider_label(case, provider), provider_label(case, base)
        ratio = medians[base] / ms
        rows.append(row(case.op, label, pass_, f"speedup_vs_{base}", "x", case.size, ratio, env,
                        computed_as=f"{STATISTIC} {base_label} ms / {STATISTIC} {label} ms",
                        baseline_ms=medians[base], provider_ms=ms, **notes))
        _say(f"  {case.op:22s} {label:24s} {pass_:8s} {ratio:10.3f} x {base_label} "
             f"(= {medians[base]:.3f} / {ms:.3f} ms, the {STATISTIC}s above)")
    return rows


def _failed(case: Case, provider: str, pass_: str, exc: Exception, env: dict) -> dict:
    _say(f"  {case.op} {provider}: failed ({type(exc).__name__}: {str(exc)[:200]})")
    return row(case.op, provider, pass_, "error", "", case.size, 0.0, env, error=str(exc)[:500])


def run_case(case: Case, providers: list[str], device: torch.device, preset: dict, env: dict, copy_gbs: float,
             deadline: float, on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The case's rows; `on_rows(rows so far)` after each provider (a run cut short keeps them)."""
    rows = []
    for pass_, builders in case.passes.items():
        medians = {}
        for provider in [p for p in providers if p in builders]:
            if time.monotonic() > deadline:
                _say(f"  {case.op} {provider}: skipped (time budget spent)")
                continue
            label = f"{case.op} {provider_label(case, provider)} {pass_}"
            _say(f"    {label}: {preset['warmup']} warm-up + {preset['reps']} timed calls ...")
            try:
                fn, compile_s = _prepare(builders, provider, device, label)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with nvtx_range(f"bench/{case.op}/{provider}"):
                    ms = measure_ms(fn, device, preset["warmup"], preset["reps"], on_call=_call_progress(label))
            except Exception as exc:  # one broken provider must not hide the others' figures
                rows.append(_failed(case, provider, pass_, exc, env))
                continue
            rows += _rows(case, provider, pass_, ms, compile_s, device, env, copy_gbs)
            medians[provider] = median(ms)
            if on_rows:
                on_rows(rows)
        rows += speedup_rows(case, pass_, medians, env)
    return rows


def run_case_interleaved(case: Case, providers: list[str], device: torch.device, preset: dict, env: dict,
                         copy_gbs: float) -> list[dict]:
    """`run_case` with the providers timed in turns (`--interleave`); peak memory is not split by
    provider here, so it is left out."""
    rows = []
    for pass_, builders in case.passes.items():
        fns, compile_s = {}, {}
        for provider in [p for p in providers if p in builders]:
            label = f"{case.op} {provider_label(case, provider)} {pass_}"
            try:
                fns[provider], compile_s[provider] = _prepare(builders, provider, device, label)
            except Exception as exc:  # one broken provider must not hide the others' figures
                rows.append(_failed(case, provider, pass_, exc, env))
        _say(f"    {case.op} {pass_}: {preset['warmup']} warm-up + {preset['reps']} timed rounds of "
             f"{', '.join(fns)} in turns ...")
        times = measure_interleaved(fns, device, preset["warmup"], preset["reps"], case.op, SLOW_CALL_S)
        for provider, ms in times.items():
            rows += _rows(case, provider, pass_, ms, compile_s[provider], torch.device("cpu"), env, copy_gbs,
                          timing="interleaved")
        rows += speedup_rows(case, pass_, {p: median(ms) for p, ms in times.items()}, env, timing="interleaved")
    return rows


def prediction_rows(cases: list[Case], env: dict) -> tuple[list[dict], dict[str, str], str]:
    """The cost model's GPU prediction for each case: rows labelled as predictions, op -> the line
    that shows it, and a line naming the table (or why there is none)."""
    from msf.bench.predicted import CURRENT_COST_TABLE, load_predictions, no_prediction_reason
    try:
        predictions = load_predictions()
    except (OSError, ValueError) as exc:
        return [], {}, f"no GPU predictions to show ({exc})"
    rows, lines = [], {}
    for case in cases:
        pred = predictions.get(case.op)
        if pred is None:
            lines[case.op] = f"no prediction: {no_prediction_reason(case.op)}"
            continue
        pass_ = next(iter(case.passes))
        size = "B=32,512x512,bf16-autocast"
        predicted_env = {**env, "device": f"{pred.device.upper()} (cost model {pred.model_version}, predicted)"}
        fields = dict(model_version=pred.model_version, error_band=list(pred.error_band), covers=pred.what,
                      source=_repo_path(pred.source))
        rows += [row(case.op, "triton", pass_, "predicted_time", "ms", size, pred.triton_s * 1e3, predicted_env,
                     **fields),
                 row(case.op, "eager floor", pass_, "predicted_time", "ms", size, pred.eager_floor_s * 1e3,
                     predicted_env, **fields),
                 row(case.op, "triton", pass_, "predicted_speedup_vs_eager_floor", "x", size, pred.speedup,
                     predicted_env, **fields)]
        lines[case.op] = pred.line()
    return rows, lines, (f"Predictions from {_repo_path(CURRENT_COST_TABLE)} (`python -m msf.profiling.cost --json` "
                         "rebuilds it from the compiled kernels).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msf bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="paper (CUDA) or smoke (default on a CPU)")
    parser.add_argument("--suite", choices=["ops", "step", "all"], default="all")
    parser.add_argument("--providers", default=None, help="comma list of eager,compile,triton,triton+compile,sdpa")
    parser.add_argument("--interleave", action="store_true",
                        help="time a case's providers in turns, one call each (fair on a shared machine)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"results folder (default {DEFAULT_OUT}, git-ignored; to commit a result, give "
                             "--out bench/results/measured/...)")
    parser.add_argument("--name", default=None, help="results file stem (default: bench-<preset>-<device>)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new measurements after this")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per provider (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: the preset's)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    preset_name = args.preset or ("paper" if device.type == "cuda" else "smoke")
    preset = dict(PRESETS[preset_name])
    preset.update({k: getattr(args, k) for k in ("reps", "warmup") if getattr(args, k) is not None})
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    if args.providers:
        providers = args.providers.split(",")
    elif device.type == "cuda":
        providers = ["eager", "sdpa", "compile", "triton", "triton+compile"]
    else:
        providers = ["eager", "sdpa", "compile"] + (["triton"] if interpreter else [])
    if device.type != "cuda":
        _say(CPU_NOTE + (" TRITON_INTERPRET=1 is set: triton rows time the interpreter." if interpreter else ""))
    env = environment(device)
    copy_gbs = copy_bandwidth_gbs(device)
    _say(f"{env['device']}: device copy {copy_gbs:.0f} GB/s; preset {preset_name} "
         f"(B={preset['batch']}, {preset['size']}², {str(preset['dtype']).removeprefix('torch.')}); "
         f"providers {', '.join(providers)}; each time is the {STATISTIC} of {preset['reps']} calls")
    deadline = time.monotonic() + args.budget_s
    rows = [row("device_copy", "torch", "copy", "bandwidth", "GB/s", "1 GiB" if device.type == "cuda" else "64 MiB",
                copy_gbs, env)]

    cases = build_cases(args.suite, preset, device)
    # a CPU cannot time the kernels: show the GPU figure the project claims, labelled as a prediction
    predicted, predicted_lines, predicted_source = (prediction_rows(cases, env) if device.type != "cuda"
                                                    else ([], {}, ""))
    name = args.name or f"bench-{preset_name}-{device.type}"
    for i, case in enumerate(cases, 1):
        _say(f"[{i}/{len(cases)}] {case.op} ({case.size})")
        if args.interleave:
            rows += run_case_interleaved(case, providers, device, preset, env, copy_gbs)
        else:
            done = list(rows)
            rows += run_case(case, providers, device, preset, env, copy_gbs, deadline,
                             on_rows=lambda case_rows: write_results(
                                 done + case_rows, Path(args.out), name,
                                 ["partial: written while the run was going; the finished run rewrites it"]))
        if case.op in predicted_lines:
            _say(f"  {case.op}: {predicted_lines[case.op]}")
    if predicted_source:
        _say(predicted_source)
    rows += predicted
    notes = [f"Each time is the {STATISTIC} of the timed calls (p50, linear interpolation; the same figure the "
             "console prints); a `speedup_vs_*` row is the baseline's median ÷ this provider's median, both shown "
             "in this table."]
    if any("fallback" in r for r in rows):
        notes.append("A provider marked `(eager fallback)` ran the eager code for that case (the reason is in the "
                     "JSON row's `fallback`); its time is not the kernels'.")
    if device.type != "cuda":
        notes += [CPU_NOTE, *[f"{op}: {line}" for op, line in predicted_lines.items()], predicted_source]
    json_path, md_path = write_results(rows, Path(args.out), name, notes)
    png_path = md_path.with_suffix(".png")
    plot_bench(rows, png_path, f"msf bench {preset_name}: {env['device']}, {env['date']}")
    _say(f"wrote {json_path}, {md_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
