"""msf.bench.eager_bytes: the meta-tensor byte counter (hand-computed cases, views free), the CUDA
autocast emulation against torch's own AutocastCUDA kernels, and the three training-step variants
at a small shape."""
import pytest
import torch
import torch.nn.functional as F

from msf.bench import eager_bytes as eb


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def nbytes(t):
    return t.numel() * t.element_size()


def test_one_linear_counts_its_inputs_and_output_exactly():
    x, w, b = meta(4, 8), meta(16, 8), meta(16)
    with eb.ByteCounter() as counter:
        y = F.linear(x, w, b)
    assert counter.total() == nbytes(x) + nbytes(w) + nbytes(b) + nbytes(y) == 4 * (32 + 128 + 16 + 64)
    assert {name for (_, name) in counter.rows} == {"addmm"}  # the weight's transpose is a free view


def test_views_are_free_and_copies_are_not():
    x = meta(2, 3, 4, 5)
    with eb.ByteCounter() as counter:
        v = x.view(6, 20).t().unsqueeze(0).expand(3, 20, 6)[:, 1:, :].detach()
        x.reshape(2, 12, 5).chunk(3, dim=-1)
        x.as_strided((10,), (2,)).narrow(0, 1, 4)
    assert counter.total() == 0 and not counter.rows
    assert v.shape == (3, 19, 6)
    for copy in (lambda: x.transpose(1, 2).contiguous(), lambda: x.permute(0, 2, 1, 3).reshape(2, 4, 15)):
        with eb.ByteCounter() as counter:
            copy()  # a real copy (the reshape of a permuted tensor clones, then views the clone)
        assert counter.total() == 2 * nbytes(x), dict(counter.rows)


def test_broadcast_reads_count_once_and_inplace_ops_read_and_write():
    y, row = meta(64, 32), meta(1, 32)
    with eb.ByteCounter() as counter:
        z = y + row.expand(64, 32)  # the expanded row is 32 distinct elements
        y.add_(z)
    assert counter.rows[("forward", "add")] == [nbytes(y) + 32 * 4 + nbytes(z), 1]
    assert counter.rows[("forward", "add_")] == [3 * nbytes(y), 1]


def test_upsample_argmax_bytes_by_hand():
    """bf16 logits under CUDA autocast: cast to fp32 (the upsample is on autocast's fp32 list),
    upsample in fp32, argmax to int64; no backward."""
    b, k, size = 2, 19, 64
    low = b * k * (size // 4) ** 2
    full = b * k * size * size
    got = eb.eager_op_bytes("upsample_argmax", batch=b, size=size)
    assert got == {"forward": low * (2 + 4) + low * 4 + full * 4 + full * 4 + b * size * size * 8, "backward": 0}


def test_every_autocast_cuda_op_has_a_policy():
    """The emulation's lists hold every aten op torch registers an AutocastCUDA kernel for (every op
    the dispatcher knows: `dir(torch.ops.aten)` lists only the ops loaded so far, which depends on
    what ran before)."""
    every_op = {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                if name.startswith("aten::")}
    registered = {name for name in every_op if eb.has_autocast_cuda_kernel(name)}
    assert registered, "no AutocastCUDA kernels found: cannot check the lists"
    missing = registered - eb._BANNED - {n for n in registered if eb.autocast_policy(n)}
    assert not missing, f"ops CUDA autocast casts that msf.bench.eager_bytes does not: {sorted(missing)}"


PROBES = {
    "linear": lambda x, w: F.linear(x, w),
    "matmul": lambda x, w: x @ w.t(),
    "softmax": lambda x, w: x.softmax(-1),
    "layer_norm": lambda x, w: F.layer_norm(x, (8,)),
    "sum": lambda x, w: x.sum(dim=1),
    "mean": lambda x, w: x.mean(dim=1),
    "gelu": lambda x, w: F.gelu(x),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_emulation_gives_real_cuda_autocast_dtypes(name):
    """Real CUDA autocast runs on fake CUDA tensors without autograd: its output dtypes must be the
    emulation's on meta tensors (bf16 activations, fp32 weights, as in the model)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fn = PROBES[name]
    fake = FakeTensorMode()
    with fake:
        x, w = torch.empty(3, 4, 8, device="cuda", dtype=torch.bfloat16), torch.empty(8, 8, device="cuda")
    previous = torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.set_autocast_enabled("cuda", True)
    try:
        with torch.no_grad(), fake:
            expected = fn(x, w).dtype
    finally:
        torch.set_autocast_enabled("cuda", False)
        torch.set_autocast_dtype("cuda", previous)
    with eb.CudaAutocastEmulation():
        got = fn(meta(3, 4, 8, dtype=torch.bfloat16), meta(8, 8)).dtype
    assert got == expected


def test_weight_casts_are_cached_within_a_region():
    w = meta(8, 8).requires_grad_()
    with eb.ByteCounter() as counter, eb.CudaAutocastEmulation():
        F.linear(meta(4, 8), w)
        F.linear(meta(4, 8), w)
    assert counter.rows[("forward", "_to_copy")][1] == 2 + 1  # two activations, the weight once


def test_a_region_with_autocast_off_is_not_cast():
    """As on a GPU: `torch.autocast("cuda", enabled=False)` inside the emulation runs fp32 products
    in fp32 (the decoder's fold), and the flag is restored on the way out."""
    x, w = meta(4, 8), meta(8, 8)
    with eb.ByteCounter() as counter, eb.CudaAutocastEmulation():
        with torch.autocast("cuda", enabled=False):
            inside = x @ w
        outside = x @ w
    assert inside.dtype == torch.float32 and outside.dtype == torch.bfloat16
    assert counter.rows[("forward", "_to_copy")][1] == 2  # the second product's two casts only
    assert not torch.is_autocast_enabled("cuda")


def test_launches_are_the_ops_that_move_bytes():
    x = meta(4, 8)
    with eb.ByteCounter() as counter:
        y = (x + 1).view(32).t()  # one kernel; the views launch nothing
        torch.promote_types(y.dtype, torch.bfloat16)
        z = y.clone()
    assert counter.launches == {"forward": 2} and z.shape == (32,)


def test_step_variants_are_ordered_and_triton_rest_drops_the_fused_ops():
    paper, h4, rest = (eb.count_step(v, batch=2, size=64) for v in eb.STEP_VARIANTS)
    assert paper.total() > h4.total() > rest.total() > 0
    assert rest.total("backward") > 0
    ops = {row["op"] for row in rest.by_op()}
    # attention (bmm, softmax) and the loss (nll) live only inside the fused ops
    assert not ops & {"bmm", "_softmax", "_softmax_backward_data", "nll_loss2d_forward"}
    assert {"bmm", "_softmax", "nll_loss2d_forward"} <= {row["op"] for row in h4.by_op()}
    # every weight gradient arrives in its parameter's layout: no copy into it (the convolutions that
    # read channels-last maps have channels-last weights, `MicroSegFormer.__init__`)
    assert "copy_" not in {row["op"] for row in paper.by_op() + h4.by_op()}
    assert eb.eager_step_bytes("h4", batch=2, size=64) == h4.total()
    launches = [eb.eager_step_launches(v, batch=2, size=64) for v in eb.STEP_VARIANTS]
    assert launches[0] >= launches[1] > launches[2] > 0, launches


def test_triton_rest_holds_no_fold_and_no_weight_selects():
    """What a triton step keeps eager: the convolutions and the projections (mm), the convolutions'
    weights cast together (one cat and one cast each way, `msf.precision`) and the blocks' (one cat and
    one cast, forward only), not the decoder's fold (its
    mv / add / select backward ops are two kernels of the fused op) nor a zeros + copy a pointwise
    weight of LMSA (handed over as views), nor a copy of a weight gradient into its parameter's layout."""
    rest = eb.count_step("triton_rest", batch=2, size=64)
    ops = {row["op"]: row["calls"] for row in rest.by_op()}
    assert not ops.keys() & {"mv", "add", "select_backward", "zeros", "mul", "copy_", "clone"}, ops
    assert ops["mm"] == 3 * 3  # stages 2-4's projections: one forward, two backward
    assert ops["convolution"] == ops["convolution_backward"] == 4  # the patch embeddings (the classifier: in LMSA)
    # the convolutions' weight copies and their gradients, the blocks' weight copies (`weight_copies`:
    # no backward); no cast of the images (the step takes them in bf16)
    assert ops["cat"] == 3 and ops["_to_copy"] == 3


def test_emulation_sets_and_restores_cuda_autocast_dtype():
    before = torch.get_autocast_dtype("cuda")
    with eb.CudaAutocastEmulation(torch.bfloat16):
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16 and torch.is_autocast_enabled("cuda")
    assert torch.get_autocast_dtype("cuda") == before and not torch.is_autocast_enabled("cuda")


def test_op_bytes_cover_every_op_and_reject_bad_arguments():
    for op, stage in eb._op_cases():
        got = eb.eager_op_bytes(op, stage=stage, batch=2, size=64)
        assert got["forward"] > 0 and (got["backward"] > 0) == (op != "upsample_argmax")
    with pytest.raises(ValueError, match="stage"):
        eb.eager_op_bytes("attention_sublayer", batch=2, size=64)
    with pytest.raises(ValueError, match="op must be"):
        eb.eager_op_bytes("softmax")


def test_command_prints_tables_and_json(tmp_path, capsys):
    out = tmp_path / "eager.json"
    assert eb.main(["--batch", "2", "--size", "64", "--top", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "triton_rest" in text and "attention_sublayer stage 4" in text and "top aten ops, paper" in text
    import json
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows["steps"]] == list(eb.STEP_VARIANTS)
    assert len(rows["top_ops"]["paper"]) == 3


def test_the_hand_count_of_lmsa_agrees_on_what_the_classifier_adds():
    """msf.bench.bytes_lmsa counts LMSA's eager path by hand (the bench suite's bytes moved); this
    counter counts its aten ops. The two counts of what the 1×1 classifier adds (its convolution and
    that convolution's backward) agree up to the weights, which the hand count leaves out."""
    from msf.bench import bytes_lmsa
    batch, size, classes, channels = 2, 64, 19, 128
    h = size // 4
    hand = {k: bytes_lmsa.totals(bytes_lmsa.ops("eager", B=batch, C=channels, H=h, W=h, classes=n))
            for k, n in (("plain", 0), ("head", classes))}
    meta_count = {k: eb.eager_op_bytes(op, batch=batch, size=size) for k, op in (("plain", "lmsa"),
                                                                                  ("head", "lmsa_classifier"))}
    weights = classes * (channels + 1) * 4  # W_c and b_c in fp32
    for hand_pass, meta_pass in (("fwd", "forward"), ("bwd", "backward")):
        by_hand = hand["head"][hand_pass] - hand["plain"][hand_pass]
        counted = meta_count["head"][meta_pass] - meta_count["plain"][meta_pass]
        assert by_hand > 10 * weights, by_hand  # the activations dominate: the comparison below means something
        assert 0 <= counted - by_hand <= 4 * weights, (hand_pass, by_hand, counted)
