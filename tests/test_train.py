"""Training, resume, eval, predict and the command line's handling of bad input (tiny synthetic runs)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msf.data import SyntheticFaces, write_mask
from msf.model import MicroSegFormer
from msf.train.checkpoint import BackgroundCheckpointer, atomic_save, read_checkpoint
from msf.train.cli import main
from msf.train.config import TrainConfig
from msf.train.loop import train, warmup_cosine

from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--synthetic-train-images", "16", "--synthetic-val-images", "4",
        "--train-eval-images", "4", "--batch-size", "4", "--num-workers", "0", "--threads", "1", "--no-progress"]


def tiny_config(tmp_path, **kw):
    cfg = dict(image_size=32, synthetic_train_images=16, synthetic_val_images=4, train_eval_images=4,
               batch_size=4, num_workers=0, threads=1, progress=False, out=str(tmp_path), epochs=3)
    cfg.update(kw)
    return TrainConfig(**cfg)


def weights(run_dir):
    return read_checkpoint(Path(run_dir) / "last.pt")["model"]


def test_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(epochs=10, warmup_epochs=2.0)
    lrs = [warmup_cosine(step, 4, cfg) for step in range(40)]
    assert lrs[0] > 0 and all(a < b for a, b in zip(lrs[:7], lrs[1:8]))  # rising through warm-up
    assert lrs[7] == pytest.approx(1.0) and lrs[8] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[8:], lrs[9:]))  # then only falling
    assert warmup_cosine(40, 4, cfg) == pytest.approx(0.0, abs=1e-12)


def test_run_directory_contents(tmp_path):
    run_dir = train(tiny_config(tmp_path, run_name="r", epochs=2))
    for name in ("config.json", "last.pt", "best.pt", "metrics.jsonl", "curves.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    ckpt = read_checkpoint(run_dir / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "model_config"} <= set(ckpt)
    assert json.loads((run_dir / "config.json").read_text())["image_size"] == 32


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    reference = train(tiny_config(tmp_path / "ref", run_name="r", epochs=4))
    run_dir = tmp_path / "killed" / "r"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "msf", "train", *TINY, "--epochs", "4",
                             "--out", str(tmp_path / "killed"), "--run-name", "r"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + HANG_GUARD_S
    log = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 1 and (run_dir / "last.pt").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_checkpoint(run_dir / "last.pt")["epoch"]
    assert killed_at < 3, "killed too late to test resuming"
    assert main(["train", "--resume", str(run_dir), "--no-progress", "--threads", "1", "--num-workers", "0"]) == 0
    resumed, expected = weights(run_dir), weights(reference)
    assert resumed.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(resumed[k], expected[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"
    rows = [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"model": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"model": Unpicklable()}, path)
    assert torch.load(path, weights_only=False) == {"model": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_background_checkpoints_hold_the_state_at_save_time(tmp_path):
    weights = torch.zeros(4)
    writer = BackgroundCheckpointer()
    writer.save({"model": {"w": weights}, "epoch": 0}, tmp_path / "best.pt", also=(tmp_path / "last.pt",))
    weights += 1  # the next training step, racing the write
    writer.save({"model": {"w": weights}, "epoch": 1}, tmp_path / "last.pt")
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "best.pt")["model"]["w"], torch.zeros(4))
    assert torch.load(tmp_path / "last.pt")["epoch"] == 1  # replaced, and best.pt kept its own file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_failed_background_write_is_reported_and_keeps_the_old_file(tmp_path):
    writer = BackgroundCheckpointer()
    writer.save({"epoch": 0}, tmp_path / "last.pt")
    writer.save({"epoch": 1, "bad": lambda: None}, tmp_path / "last.pt")  # cannot be pickled
    with pytest.raises(Exception, match="lambda|pickle"):
        writer.wait()
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 0
    writer.wait()  # reported once


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return train(tiny_config(root, run_name="r", epochs=1))


@pytest.fixture
def mini_data(tmp_path):
    for split in ("val",):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        faces = SyntheticFaces(3, 64, seed=9)
        for i in range(3):
            image, mask = faces.load_pair(i)
            Image.fromarray(image).save(tmp_path / split / "images" / f"x{i}.jpg")
            write_mask(tmp_path / split / "masks" / f"x{i}.png", mask)
    return tmp_path


def test_eval_json_scores_at_native_resolution(trained_run, mini_data, capsys):
    assert main(["eval", "--data", str(mini_data), "--checkpoint", str(trained_run / "best.pt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"f_score", "miou", "per_class_f1", "images"} <= set(out)
    assert out["images"] == 3 and out["scored_at"] == [64, 64] and out["input_size"] == 32
    assert 0 <= out["f_score"] <= 1 and "background" in out["per_class_f1"]


def test_export_release_scores_like_its_checkpoint(trained_run, mini_data, tmp_path, capsys):
    release = tmp_path / "model.safetensors"
    assert main(["export", str(trained_run / "best.pt"), str(release)]) == 0
    capsys.readouterr()
    scores = []
    for ckpt in (trained_run / "best.pt", release):
        assert main(["eval", "--data", str(mini_data), "--checkpoint", str(ckpt), "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["f_score"])
    assert scores[1] == pytest.approx(scores[0], abs=0.02)  # fp16 weights


def test_predict_writes_palette_masks_and_overlays(trained_run, mini_data, tmp_path):
    images = sorted((mini_data / "val" / "images").iterdir())
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained_run / "best.pt"), *map(str, images), "--out", str(out)]) == 0
    for image in images:
        mask = Image.open(out / f"{image.stem}.png")
        assert mask.mode == "P" and mask.size == (64, 64) and np.array(mask).max() <= 18
        width, height = Image.open(out / f"{image.stem}_overlay.png").size
        assert width > 128 and height >= 64  # image and overlay side by side, then the colour legend


def one_line_error(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and pattern in err, err


def test_bad_command_line_input_gives_one_line_errors(trained_run, mini_data, tmp_path, capsys):
    one_line_error(capsys, ["train", "--data", str(tmp_path / "missing"), *TINY, "--out", str(tmp_path)],
                   "data folder not found")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    one_line_error(capsys, ["eval", "--data", str(mini_data), "--checkpoint", str(junk)], "not a checkpoint")
    one_line_error(capsys, ["eval", "--data", str(mini_data), "--checkpoint", str(tmp_path / "nope.pt")],
                   "checkpoint not found")
    other_classes = MicroSegFormer(num_classes=7)
    atomic_save({"model": other_classes.state_dict(), "model_config": dataclasses.asdict(other_classes.config)},
                tmp_path / "seven.pt")
    one_line_error(capsys, ["eval", "--data", str(mini_data), "--checkpoint", str(tmp_path / "seven.pt")],
                   "7 classes")
    no_lmsa = MicroSegFormer(lmsa=False)
    config = {**dataclasses.asdict(no_lmsa.config), "lmsa": True}  # config and weights disagree
    atomic_save({"model": no_lmsa.state_dict(), "model_config": config}, tmp_path / "other.pt")
    one_line_error(capsys, ["predict", "--checkpoint", str(tmp_path / "other.pt"), "x.jpg", "--out", str(tmp_path)],
                   "another architecture")
    one_line_error(capsys, ["train", *TINY, "--image-size", "48"], "multiple of 32")


def test_training_into_an_existing_run_never_overwrites_it(trained_run, capsys):
    before = (trained_run / "last.pt").read_bytes()
    one_line_error(capsys, ["train", *TINY, "--out", str(trained_run.parent), "--run-name", trained_run.name],
                   "already holds a run")
    assert (trained_run / "last.pt").read_bytes() == before
