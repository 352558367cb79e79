"""The CPU training path: bf16 autocast where the CPU has native bf16 (fp32 where it has not) and the
classifier at H/4; its loss and gradients track the fp32 paper-order step, channels-last or not."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_close, assert_grads_close
from msf.train import evaluate
from msf.train.config import TrainConfig
from msf.train.loop import make_model, train

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_auto_settings_follow_the_cpu(monkeypatch, native):
    monkeypatch.setattr(evaluate, "native_cpu_bf16", lambda: native)
    cfg = TrainConfig().resolve().for_device(CPU)
    assert cfg.amp == ("bf16" if native else "off")
    assert cfg.channels_last is False and cfg.paper_head_order is False
    explicit = TrainConfig(amp="off", channels_last=True, paper_head_order=True).resolve().for_device(CPU)
    assert (explicit.amp, explicit.channels_last, explicit.paper_head_order) == ("off", True, True)
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        TrainConfig(amp="fp16").resolve().for_device(CPU)


@pytest.mark.parametrize("amp, want", [("bf16", torch.bfloat16), ("off", torch.float32)])
def test_device_pipeline_hands_training_batches_in_the_autocast_dtype(tmp_path, amp, want):
    """Under autocast the training images come in its dtype (the first convolution would cast them to
    it inside the step); evaluation images stay float32 (resized to the model's size first)."""
    from msf.train.inputs import build_inputs
    cfg = TrainConfig(image_size=32, synthetic_train_images=8, synthetic_val_images=4, train_eval_images=4,
                      batch_size=4, num_workers=0, progress=False, pipeline="device", amp=amp,
                      cache_dir=str(tmp_path)).resolve().for_device(CPU)
    inputs = build_inputs(cfg, CPU)
    (images, masks), *_ = list(inputs.train.epoch(0))
    (val_images, _), *_ = list(inputs.val.epoch(0))
    assert images.dtype == want and masks.dtype == torch.int64 and val_images.dtype == torch.float32


def test_auto_pipeline_takes_the_device_cache_on_a_cpu_only_where_it_fits(monkeypatch):
    """The uint8 cache is the fastest CPU input pipeline (bench/results/measured/cpu/train-speed.md)
    but holds the whole data set in RAM: auto takes it for real data up to a quarter of MemAvailable."""
    from msf.train import inputs
    monkeypatch.setattr(inputs, "available_ram", lambda: 8 * 2**30)
    mini = inputs.cache_bytes_estimate(800, 100, 256)               # celebamask-hq-mini: < 1 GiB
    full = inputs.cache_bytes_estimate(28_000, 2_000, 512)          # CelebAMask-HQ: ~37 GiB
    assert inputs.resolve_pipeline("auto", CPU, mini) == "device"
    assert inputs.resolve_pipeline("auto", CPU, full) == "loader"
    assert inputs.resolve_pipeline("auto", CPU, 2 * 2**30 + 1) == "loader"   # just over a quarter
    assert inputs.resolve_pipeline("auto", CPU, None) == "loader"             # synthetic data
    assert inputs.resolve_pipeline("auto", torch.device("cuda"), full) == "device"
    assert inputs.resolve_pipeline("loader", CPU, mini) == "loader"
    monkeypatch.setattr(inputs, "available_ram", lambda: None)             # no /proc/meminfo
    assert inputs.resolve_pipeline("auto", CPU, mini) == "loader"
    with pytest.raises(ValueError, match="--pipeline must be one of"):
        inputs.resolve_pipeline("gpu", CPU, mini)


def test_autocast_for_the_cpu():
    with evaluate.autocast_for(CPU, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with evaluate.autocast_for(CPU, "off"):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_channels_last_step_tracks_fp32():
    """Loss and every gradient of bf16 autocast, channels-last, classifier at H/4
    against the fp32 step in the paper's order, judged at the whole gradient's scale. bf16 rounding
    apart, measured 2026-11-29 (AMD EPYC, native AVX512-BF16 and with it disabled by
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2): loss 1e-6 relative, whole gradient 1.4e-2,
    every tensor within 4% of its own norm."""
    cfg = TrainConfig(amp="bf16", channels_last=True, paper_head_order=False, decoder_dropout=0.0,
                      image_size=64).resolve()
    reference_cfg = TrainConfig(amp="off", channels_last=False, paper_head_order=True, decoder_dropout=0.0,
                                image_size=64).resolve()
    g = torch.Generator().manual_seed(5)
    images, masks = torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 19, (2, 64, 64), generator=g)
    results = []
    for c in (reference_cfg, cfg):
        torch.manual_seed(0)
        model = make_model(c, CPU)
        x = images.contiguous(memory_format=torch.channels_last) if c.channels_last else images
        with evaluate.autocast_for(CPU, c.amp):
            loss = model.loss(x, masks)
        loss.backward()
        results.append((loss.float(), {n: p.grad for n, p in model.named_parameters()}))
    assert_close(results[1][0], results[0][0], 1e-4, "bf16 channels-last loss")
    assert_grads_close(results[1][1], results[0][1], 4e-2, 1e-2, "bf16 channels-last grads")


def test_config_json_records_what_the_run_used(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "native_cpu_bf16", lambda: False)
    run = train(TrainConfig(out=str(tmp_path), run_name="r", image_size=32, epochs=1, warmup_epochs=0.5,
                            synthetic_train_images=8, synthetic_val_images=4, train_eval_images=4, batch_size=4,
                            num_workers=0, progress=False))
    saved = json.loads((run / "config.json").read_text())
    assert (saved["amp"], saved["channels_last"], saved["paper_head_order"]) == ("off", False, False)
