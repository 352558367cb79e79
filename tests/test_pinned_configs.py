"""The configurations the GPUs run, run here, and the kernels' invariants checked at launch
(issue 23, item 6, for the kernels that exist).

The interpreter's own configurations (kernels/configs.json, device kind "interpreter") are small
tiles that keep the parity tests cheap, so the tiles an H100 or A100 launches (BLOCK_X = 128 rows
of the head loss, LMSA's 16-pixel wgrad strips, the attention tiles of each head dim) were never
executed anywhere. Here every op runs through the interpreter with the sm_90 and the sm_80 entries
of configs.json (`configs.for_device`), at a small shape in the model's dtype class, forward and
every gradient against the float64 references of the op's own parity tests; a recorder checks
that each launch really took the pinned GPU entry. The model-level tests (test_backends.py,
test_compile.py) run the whole triton model at the sm_90 entries the same way
(`conftest.model_at_gpu_tiles`), so the pinned tiles also run at the model's own composition.
"""
import pytest
import torch

from conftest import gpu_geometry, kernel_device, poison_new_buffers
from msf.kernels import configs

import test_attention as t_attn  # noqa: E402  (the parity helpers of each op)
import test_attention_sublayer as t_sub  # noqa: E402
import test_decoder_mlp as t_dec  # noqa: E402
import test_ffn_sublayer as t_ffn  # noqa: E402
import test_head_loss as t_hl  # noqa: E402
import test_lmsa as t_lmsa  # noqa: E402

pytestmark = pytest.mark.parity
KINDS = ("sm_90", "sm_80")


@pytest.fixture(params=KINDS)
def gpu_kind(request, monkeypatch):
    """Launches look their configuration up as on `kind`; every launch's (kernel, class, config) is
    recorded, and every buffer the kernels allocate starts as NaN."""
    kernel_device("cpu")  # the interpreter (skips where TRITON_INTERPRET=1 is not set)
    poison_new_buffers(monkeypatch, t_attn.attn_mod, t_sub.sub_mod, t_lmsa.lmsa_mod,  # head_loss: POISON_OUTPUTS
                       t_ffn.ffn_mod, t_dec.dec_mod)
    launched = []
    original = configs.PinnedKernel.config

    def recording(self, args, kwargs):
        cfg = original(self, args, kwargs)
        launched.append((self.name, self.shape_class(self.named_args(args, kwargs)), configs.to_entry(cfg)))
        return cfg
    monkeypatch.setattr(configs.PinnedKernel, "config", recording)
    with gpu_geometry(request.param):
        yield request.param, launched


def assert_pinned(kind: str, launched: list, expected_kernels: set[str]) -> int:
    """Each launch took configs.json's `kind` entry, and all of `expected_kernels` launched;
    returns how many launches ran a tile other than the interpreter's own."""
    assert {name for name, _, _ in launched} >= expected_kernels, sorted({n for n, _, _ in launched})
    for name, cls, entry in launched:
        assert entry == configs.to_entry(configs.lookup(name, cls, kind)), (name, cls)
    return sum(entry != configs.to_entry(configs.lookup(name, cls, "interpreter")) for name, cls, entry in launched)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lmsa_at_the_gpu_tiles(gpu_kind, dtype):
    kind, launched = gpu_kind
    if dtype == torch.float32 and kind == "sm_80":
        pytest.skip("fp32 runs its sm_90 tiles here; one fp32 architecture keeps the CPU suite short")
    # C = 128 (the model's): the channel blocks are the GPU's; W = 17 spans one whole 16-pixel
    # wgrad strip and a ragged one, H = 8 > 7 separate border and interior statistics cells
    chunks = []
    wgrad_chunk = t_lmsa.lmsa_mod._wgrad_chunk
    spy = lambda *a: chunks.append(wgrad_chunk(*a)) or chunks[-1]  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(t_lmsa.lmsa_mod, "_wgrad_chunk", spy)
        x, go = t_lmsa._inputs(1, 128, 8, 17, dtype, "cpu", seed=5, layout="channels_last")
        t_lmsa._run_case(x, t_lmsa._params(128, dtype, "cpu", seed=5), go)
    assert_pinned(kind, launched, {"lmsa.stats", "lmsa.fwd", "lmsa.gram", "lmsa.wgrad", "lmsa.dx"})
    # the GPU's host geometry ran (`_wgrad_chunk` for the SM count; the interpreter's own is a fixed
    # 32 strips): one chunk covering all 8 × 2 strips of the image
    assert chunks and chunks[0] >= 8 * 2, chunks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lmsa_classifier_at_the_gpu_tiles(gpu_kind, dtype):
    """The model's path: the classifier's 19 classes inside (its own forward, dL, correlation and dx
    kernels) at C = 128."""
    kind, launched = gpu_kind
    if dtype == torch.float32 and kind == "sm_80":
        pytest.skip("fp32 runs its sm_90 tiles here; one fp32 architecture keeps the CPU suite short")
    x, _ = t_lmsa._inputs(1, 128, 8, 9, dtype, "cpu", seed=6, layout="channels_last")
    go = t_lmsa._inputs(1, 19, 8, 9, dtype, "cpu", seed=7, layout="channels_last")[0].detach()
    t_lmsa._run_case(x, t_lmsa._params(128, dtype, "cpu", seed=6), go,
                     head=t_lmsa._classifier(19, 128, dtype, "cpu", seed=8))
    assert_pinned(kind, launched, {"lmsa.stats", "lmsa.fwd_head", "lmsa.dl_head", "lmsa.corr_head", "lmsa.dx_head"})
    assert {cls for name, cls, _ in launched if name == "lmsa.fwd_head"} == {"fp32" if dtype == torch.float32
                                                                              else "half"}


def test_head_loss_and_argmax_at_the_gpu_tiles(gpu_kind, monkeypatch):
    kind, launched = gpu_kind
    # the row kernels (K = 19, scale 4, bf16 channels-last: the model's) take their tile from
    # `_rows_block`, not from configs.json: 128 lanes and 4 warps on a GPU, 32 and 1 here
    assert hl_rows_tile(kind) == (128, 4)
    # w = 40: one whole 128-column strip and a ragged one; h = 5: bands of more than one cell row
    cases = {"pinned_rows_k19_s4_bf16": (1, 19, 5, 40, 4, 4, torch.bfloat16, "nhwc", torch.uint8, False, 1.0, 3),
             "k25_s2_fp32_generic_kernels": t_hl.LOSS_CASES["k25_s2_fp32_generic_kernels"]}
    monkeypatch.setitem(t_hl.LOSS_CASES, "pinned_rows_k19_s4_bf16", cases["pinned_rows_k19_s4_bf16"])
    monkeypatch.setitem(t_hl.ARGMAX_CASES, "pinned_rows_k19_x4_bf16", (1, 19, 5, 40, 20, 160, torch.bfloat16, "nhwc"))
    monkeypatch.setattr(t_hl.hl_mod, "POISON_OUTPUTS", True)
    for case in cases:
        t_hl.test_head_loss_matches_float64_reference(case, "cpu")
    for case in ("pinned_rows_k19_x4_bf16", "k5_fractional_up_fp32_transposed"):
        t_hl.test_upsample_argmax_matches_eager(case, "cpu")
    assert_pinned(kind, launched, {"head_loss.fwd", "head_loss.bwd", "upsample_argmax"})


def hl_rows_tile(kind: str) -> tuple[int, int]:
    """(BLOCK_X, num_warps) of the row kernels at the model's size on `kind` (they are not in
    configs.json: `head_loss._rows_block` picks them by device kind)."""
    block_x, warps, _ = t_hl.hl_mod._rows_block(32 * 128 * 128)
    assert t_hl.hl_mod._rows_path(19, 4, 4, block_x), "the model's head would not take the row kernels"
    return block_x, warps


# N = 128 at d32: one whole 128-row chunk of the dK/dV kernel (EVEN_N: its loop without a row mask)
@pytest.mark.parametrize("n,m,d", [(128, 32, 32), (33, 20, 64), (17, 12, 128), (9, 8, 192)],
                         ids=["d32", "d64", "d128", "d192"])
def test_attention_and_sublayer_at_the_gpu_tiles(gpu_kind, n, m, d):
    kind, launched = gpu_kind
    q, k, v, do, _ = t_attn._inputs(2, n, m, d, torch.bfloat16, "cpu", packed=True)
    t_attn._check_all(q, k, v, do, torch.bfloat16)
    vals, _ = t_sub._inputs(2, n, m, d, torch.bfloat16, "cpu", seed=d + n)
    ours, ref = t_sub._leaves(vals, "cpu", torch.bfloat16), t_sub._leaves(vals, "cpu", torch.float64)
    out, out_ref = t_sub._run(ours, t_sub.sub_mod.attention_sublayer), t_sub._run(ref, t_sub.sub_mod.attention_sublayer_eager)
    tol = t_sub.TOL[torch.bfloat16]
    t_sub.assert_close(out, out_ref, tol, f"sublayer out (d={d})")
    out.backward(ours["g"])
    out_ref.backward(ref["g"])
    for name in ("x", "residual", "kv", "wq", "bq", "wo", "bo"):
        t_sub.assert_close(ours[name].grad, ref[name].grad, tol, f"sublayer d{name} (d={d})")
    assert_pinned(kind, launched, {"attention.fwd", "attention.dq", "attention.dkdv", "attention_sublayer.fwd",
                                   "attention_sublayer.dq", "attention_sublayer.wgrad"})


@pytest.mark.parametrize("shape", ["C32", "C64", "C128", "C192"])
def test_ffn_sublayer_at_the_gpu_tiles(gpu_kind, shape):
    """The model's class ("amp": fp32 tokens and master weights under bf16 autocast) at each stage's C."""
    kind, launched = gpu_kind
    t_ffn.test_autocast_matches_eager_autocast(shape, "cpu", poisoned=None)  # (buffers poisoned by gpu_kind)
    assert {cls for name, cls, _ in launched if name.startswith("ffn_sublayer")} == \
        {f"amp_c{t_ffn.ffn_mod._block_c(t_ffn.SHAPES[shape][2])}"}
    _, _, c, h = t_ffn.SHAPES[shape]
    wgrad = "attention_sublayer.wgrad" if t_ffn.ffn_mod.stash_pays(c, h) else "ffn_sublayer.wgrad"
    assert_pinned(kind, launched, {"ffn_sublayer.fwd", "ffn_sublayer.dx", wgrad})


@pytest.mark.parametrize("shape,feeds_next", [("C32", True), ("C64", True), ("C192", False)],
                         ids=["C32-stage1", "C64-stage2", "C192-stage4"])
def test_ffn_stage_norm_at_the_gpu_tiles(gpu_kind, shape, feeds_next):
    """A stage's last FFN sublayer with the stage's final norm in its forward and, on the recompute
    route (C ≤ 64), in its dx kernel (each its own shape class, "amp_c*_stage"), under bf16 autocast,
    against the two ops apart and float64."""
    kind, launched = gpu_kind
    t_ffn.test_stage_norm_under_autocast_is_the_two_ops(shape, feeds_next, True, "cpu", poisoned=None)
    _, _, _, c, hid = t_ffn.STAGE_SHAPES[shape]
    block_c = t_ffn.ffn_mod._block_c(c)
    assert f"amp_c{block_c}_stage" in {cls for name, cls, _ in launched if name == "ffn_sublayer.fwd"}
    dx_class = f"amp_c{block_c}" + ("" if t_ffn.ffn_mod.stash_pays(c, hid) else "_stage")
    assert dx_class in {cls for name, cls, _ in launched if name == "ffn_sublayer.dx"}  # (and the two ops' apart)
    assert_pinned(kind, launched, {"ffn_sublayer.fwd", "ffn_sublayer.dx"})


def test_decoder_mlp_at_the_gpu_tiles(gpu_kind):
    """The model's class (fp32 maps and master weights under bf16 autocast, E = 128)."""
    kind, launched = gpu_kind
    t_dec.test_autocast_matches_eager_autocast("cpu", poisoned=None)  # (buffers poisoned by gpu_kind)
    assert {(name, cls) for name, cls, _ in launched if name.startswith("decoder_mlp")} == {
        ("decoder_mlp.fwd", "amp_e128"), ("decoder_mlp.bwd", "amp_e128"),
        ("decoder_mlp.pyramid", "16_e128")}  # (the model's stages: exact halvings, one adjoint launch)
    # (the weight gradients: the attention sublayer's GEMM kernel, two groups in one launch)
    assert_pinned(kind, launched, {"decoder_mlp.fwd", "decoder_mlp.bwd", "decoder_mlp.pyramid",
                                   "attention_sublayer.wgrad"})


def test_the_kernels_invariants_are_checked_at_launch():
    """What the kernels rely on and cannot check themselves, refused at launch with a message."""
    hl, lm = t_hl.hl_mod, t_lmsa.lmsa_mod
    assert hl._flush_classes(19, 128 // 4, 4) == 4 and hl._flush_classes(19, 32 // 4, 1) == 4  # GPU, interpreter
    with pytest.raises(RuntimeError, match="one element per thread"):
        hl._flush_classes(19, 64, 1)          # a 64-cell strip on one warp
    with pytest.raises(RuntimeError, match="one element per thread"):
        hl._flush_classes(19, 24, 4)          # a strip that is not a power of two
    words = torch.zeros(4, 128, dtype=torch.bfloat16)
    lm._require_words(128, words)
    for bad, c in ((words.flatten()[1:129], 128),                       # a base off the 4-byte words
                   (words.float(), 128),                                # fp32: not bf16 pairs
                   (words[:, ::2], 64),                                 # channels strided
                   (words, 127)):                                       # an odd channel count
        with pytest.raises(RuntimeError, match="int32 channel-pair words"):
            lm._require_words(c, bad)


def test_a_configuration_allowed_on_one_architecture_is_pinned_only_there():
    """`kernels/ffn_sublayer.py: _SM90_ONLY` holds tiles that build without spills on sm_90 and spill
    on sm_80: their AOT specs build for sm_90 alone, and configs.json names them for sm_90 only (the
    sm_80 and default entries, which any other GPU falls back to, take tiles clean on both)."""
    ffn = t_ffn.ffn_mod
    assert ffn._SM90_ONLY, "nothing to check: drop this test with the last one-architecture entry"
    table = configs.load_table()
    for (kernel, block_c), only in ffn._SM90_ONLY.items():
        assert only <= set(ffn._ALLOWED[kernel]["amp"][block_c])
        for mode in ("16", "amp"):
            for kind, entry in table[f"ffn_sublayer.{kernel}"].get(f"{mode}_c{block_c}", {}).items():
                kw = entry["kwargs"]
                cfg = (kw["BLOCK_N"], kw["BLOCK_H"], entry["num_warps"], entry["num_stages"])
                assert cfg not in only or kind == "sm_90", f"{kernel} {mode}_c{block_c} {kind}: {cfg} is sm_90 only"
    restricted = [s for s in ffn.AOT_SPECS if s.archs]
    assert restricted and all(s.archs == (90,) and s.builds_on(90) and not s.builds_on(80) for s in restricted)


def test_a_sublayer_configuration_allowed_on_one_architecture_is_pinned_only_there():
    """The same for `kernels/attention_sublayer.py: _SM90_ONLY` (keyed by kernel, dtype class and d
    block): listed, built for sm_90 alone, and never the sm_80 or default entry of configs.json."""
    sub = t_sub.sub_mod
    assert sub._SM90_ONLY, "nothing to check: drop this test with the last one-architecture entry"
    table = configs.load_table()
    for (kernel, mode, block_d), only in sub._SM90_ONLY.items():
        assert only <= set(sub._ALLOWED[kernel][mode][block_d])
        for kind, entry in table[f"attention_sublayer.{kernel}"].get(f"{mode}_d{block_d}", {}).items():
            kw = entry["kwargs"]
            cfg = (kw["BLOCK_N"], kw["BLOCK_M"], entry["num_warps"], entry["num_stages"])
            assert cfg not in only or kind == "sm_90", f"{kernel} {mode}_d{block_d} {kind}: {cfg} is sm_90 only"
        prefix = f"attention_sublayer.{kernel}_{'amp_' if mode == 'amp' else ''}{sub._AOT_DTYPES[mode]}_d{block_d}"
        built = [s for s in sub.AOT_SPECS if any(s.name == f"{prefix}_n{c[0]}_m{c[1]}_w{c[2]}_s{c[3]}" for c in only)]
        assert len(built) == len(only) and all(s.archs == (90,) and not s.builds_on(80) for s in built)


def test_tables_from_the_lists_pin_a_one_architecture_tile_only_there():
    """`python -m msf.profiling.tune --from-lists` takes, per class, the first allowed tile that builds
    clean where the entry applies (`PinnedKernel.first_allowed`): an sm_90-only tile (`archs`) may be
    the sm_90 entry, never the sm_80 one nor the "default" one other GPUs fall back to. Checked on a
    table made from the lists alone (--reset) and on the committed table, which the command, keeping
    the entries it finds, writes again unchanged."""
    from msf.profiling import tune
    fresh, committed = tune.table_from_lists(reset=True), configs.load_table()
    assert tune.table_from_lists(committed) == committed, "tune --from-lists would rewrite the committed table"
    for label, table in (("from the lists", fresh), ("committed", committed)):
        for name, pk in configs.REGISTRY.items():
            for cls in pk.classes:
                for kind, entry in table[name].get(cls, {}).items():
                    only = pk.archs(cls, configs.to_config(entry))
                    assert only is None or (kind.startswith("sm_") and int(kind[3:]) in only), \
                        f"{label}: {name} {cls} {kind} pins {entry}, allowed on sm_{only} only"
    # the rule has something to do: the FFN wgrad's C 64 list starts with an sm_90-only tile
    head = t_ffn.ffn_mod._AMP["wgrad"][64][0]
    assert head in t_ffn.ffn_mod._SM90_ONLY[("wgrad", 64)]
    entries = {kind: fresh["ffn_sublayer.wgrad"]["amp_c64"][kind] for kind in ("sm_90", "sm_80", "default")}
    tile = {kind: (e["kwargs"]["BLOCK_N"], e["kwargs"]["BLOCK_H"], e["num_warps"], e["num_stages"])
            for kind, e in entries.items()}
    assert tile["sm_90"] == head and tile["sm_80"] != head and tile["default"] != head, tile
