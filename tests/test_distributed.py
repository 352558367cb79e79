"""Data-parallel training (torchrun, gloo, 2 CPU processes) against one process with the same
global batch; session limits and resume; pipelines that must give the same run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msf.train.checkpoint import read_checkpoint
from msf.train.config import TrainConfig
from msf.train.distributed import DistContext
from msf.train.loop import session_limit, train

from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
# Dropout 0: the processes draw their own dropout masks, which one process cannot reproduce. fp32:
# bf16 autocast (the default on CPUs with native bf16) would round the two reduction orders apart.
RUN = ["--amp", "off", "--image-size", "32", "--synthetic-train-images", "16", "--synthetic-val-images", "6",
       "--train-eval-images", "6", "--batch-size", "4", "--num-workers", "0", "--threads", "1", "--no-progress",
       "--decoder-dropout", "0", "--epochs", "3", "--warmup-epochs", "1"]


def config(out, **kw):
    cfg = dict(amp="off", image_size=32, synthetic_train_images=16, synthetic_val_images=6, train_eval_images=6, batch_size=4,
               num_workers=0, threads=1, progress=False, decoder_dropout=0.0, epochs=3, warmup_epochs=1.0,
               out=str(out), run_name="r")
    cfg.update(kw)
    return TrainConfig(**cfg)


def torchrun(*args, processes=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", "-m", "msf", "train", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def compare_weights(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    worst = max(expected, key=lambda k: float((got[k].double() - expected[k].double()).abs().max()))
    err = float((got[worst].double() - expected[worst].double()).abs().max())
    assert err <= atol, f"{worst}: max |Δ| {err:.3g} > {atol}"


def test_two_processes_with_a_resume_match_one_uninterrupted_process(tmp_path):
    single = train(config(tmp_path / "single"))
    # two processes, each taking half of every batch of 4; the session ends after one epoch and a
    # second torchrun resumes it
    out = torchrun(*RUN, "--out", str(tmp_path / "ddp"), "--run-name", "r", "--stop-after-epochs", "1")
    assert "× 2 processes" in out and "--resume continues" in out
    run_dir = tmp_path / "ddp" / "r"
    assert read_checkpoint(run_dir / "last.pt")["epoch"] == 0
    torchrun("--resume", str(run_dir), "--no-progress", "--threads", "1", "--num-workers", "0")

    compare_weights(read_checkpoint(run_dir / "last.pt")["model"], read_checkpoint(single / "last.pt")["model"],
                    atol=5e-5)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # rank 0 alone wrote the log, once per epoch
    for got, want in zip(rows, expected):
        # scores are summed over both processes' halves of the validation set
        assert got["val_f_score"] == pytest.approx(want["val_f_score"], abs=2e-3)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs_run"] == 3
    ckpt = read_checkpoint(run_dir / "last.pt")
    assert len(ckpt["rng_by_rank"]) == 2


def test_a_batch_the_processes_cannot_split_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "msf", "train", *RUN, "--batch-size", "3", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode != 0
    assert "--batch-size 3 must be a multiple of the 2 processes" in proc.stderr


def test_stop_after_epochs_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = train(config(tmp_path / "ref", decoder_dropout=0.15))
    run_dir = train(config(tmp_path / "split", decoder_dropout=0.15, stop_after_epochs=2))
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 2
    train(config(tmp_path / "ignored"), resume=run_dir)
    compare_weights(read_checkpoint(run_dir / "last.pt")["model"], read_checkpoint(reference / "last.pt")["model"],
                    atol=0.0)


@pytest.mark.parametrize("elapsed, last_epoch, ends", [(40.0, 15.0, False), (50.0, 15.0, True), (0.0, 0.0, False)])
def test_max_minutes_ends_the_session_before_an_epoch_would_overrun(elapsed, last_epoch, ends):
    cfg = config("unused", max_minutes=1.0)
    reason = session_limit(cfg, epochs_this_session=3, elapsed=elapsed, last_epoch_seconds=last_epoch, since_best=0,
                           ctx=DistContext())
    assert bool(reason) == ends and (not ends or "--max-minutes 1" in reason)


def test_patience_and_stop_after_epochs_end_the_session():
    assert "early stop" in session_limit(config("u", patience=5), 1, 0.0, 0.0, since_best=5, ctx=DistContext())
    assert session_limit(config("u", patience=5), 1, 0.0, 0.0, since_best=4, ctx=DistContext()) == ""
    assert "--stop-after-epochs" in session_limit(config("u", stop_after_epochs=2), 2, 0.0, 0.0, 0, DistContext())


def test_a_budget_smaller_than_the_set_up_trains_nothing_and_writes_no_checkpoint(tmp_path, capsys):
    run_dir = train(config(tmp_path, epochs=50, max_minutes=1e-6))  # 60 µs: less than the set-up takes
    assert "--max-minutes" in capsys.readouterr().out
    assert not (run_dir / "last.pt").exists() and not (run_dir / "summary.json").exists()


def test_device_and_loader_pipelines_train_the_same_model_on_cpu(tmp_path):
    runs = {p: train(config(tmp_path / p, pipeline=p, epochs=2, decoder_dropout=0.15)) for p in ("loader", "device")}
    compare_weights(read_checkpoint(runs["device"] / "last.pt")["model"],
                    read_checkpoint(runs["loader"] / "last.pt")["model"], atol=1e-6)
    assert (tmp_path / "device" / ".cache").is_dir() and not (tmp_path / "loader" / ".cache").exists()
    summary = json.loads((runs["device"] / "summary.json").read_text())
    assert summary["pipeline"] == "device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_with_the_device_pipeline_learns(tmp_path):
    run_dir = train(config(tmp_path, device="cuda", pipeline="device", image_size=64, epochs=4,
                           synthetic_train_images=64, batch_size=16, decoder_dropout=0.15))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pipeline"] == "device"
    assert summary["best_val_f_score"] > summary["constant_prediction_val_f_score"]


def test_a_resumed_optimizer_takes_this_devices_implementation():
    from msf.train.loop import for_this_device
    param = torch.nn.Parameter(torch.zeros(3))
    saved = torch.optim.AdamW([param], foreach=True).state_dict()
    fresh = torch.optim.AdamW([param])
    fresh.load_state_dict(for_this_device(saved, torch.device("cpu")))
    # both devices have a fused AdamW (one pass per tensor on the CPU); a saved foreach flag is dropped
    assert fresh.param_groups[0]["foreach"] is None and fresh.param_groups[0]["fused"] is True
    assert for_this_device(saved, torch.device("cuda"))["param_groups"][0]["fused"] is True
    assert for_this_device(saved, torch.device("meta"))["param_groups"][0]["fused"] is False
    assert saved["param_groups"][0]["foreach"] is True  # the checkpoint's own dict is left alone
