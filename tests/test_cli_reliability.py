"""What a user meets when something goes wrong (issue 17): bad data files named in one line, no
input or checkpoint destroyed, failed starts and interruptions that leave nothing half-made,
resume that keeps its recipe unless told otherwise, validated options. Tiny synthetic runs."""
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
from PIL import Image, ImageFile

from msf.data import OVERLAY_PALETTE, MiniFaceDataset, SyntheticFaces, write_mask
from msf.pipeline import LoaderBatches
from msf.train.checkpoint import read_checkpoint
from msf.train.cli import main
from msf.train.config import FIELD_HELP, TrainConfig
from msf.train import evaluate
from msf.train.loop import cpu_schedule_warning, train

from conftest import HANG_GUARD_S, make_mini, one_line_error

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--synthetic-train-images", "16", "--synthetic-val-images", "4",
        "--train-eval-images", "4", "--batch-size", "4", "--num-workers", "0", "--threads", "1", "--no-progress"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return train(TrainConfig(image_size=32, synthetic_train_images=8, synthetic_val_images=4, train_eval_images=4,
                             batch_size=4, num_workers=0, threads=1, progress=False, out=str(root), run_name="r",
                             epochs=1))


MINI_RUN = ["--image-size", "32", "--batch-size", "2", "--epochs", "1", "--train-eval-images", "2", "--threads", "1",
            "--no-progress"]


# --- 2: bad data files named, before the first step where the headers tell -----------------------

def test_a_mask_id_outside_the_classes_is_named_from_a_loader_worker(tmp_path, capsys):
    data = make_mini(tmp_path / "data")
    bad = data / "train" / "masks" / "f2.png"
    mask = np.array(Image.open(bad))
    mask[0, 0] = 25
    write_mask(bad, mask)
    err = one_line_error(capsys, ["train", "--data", str(data), *MINI_RUN, "--num-workers", "1",
                                  "--out", str(tmp_path / "runs")], str(bad), "class id 25").err
    assert "worker" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # 6: nothing left


@pytest.mark.parametrize("fault", ["corrupt jpeg", "mask of another size", "mask in RGB"])
def test_bad_files_are_named_before_training_starts(tmp_path, capsys, monkeypatch, fault):
    data = make_mini(tmp_path / "data")
    if fault == "corrupt jpeg":
        bad = data / "val" / "images" / "f1.jpg"
        bad.write_bytes(b"\xff\xd8 not a jpeg at all")
        expected = "unreadable image"
    elif fault == "mask of another size":
        bad = data / "train" / "images" / "f3.jpg"
        write_mask(data / "train" / "masks" / "f3.png", np.zeros((24, 32), np.uint8))
        expected = "32×32 but its mask f3.png is 32×24"
    else:
        bad = data / "train" / "masks" / "f0.png"
        Image.new("RGB", (32, 32)).save(bad)
        expected = "palette or greyscale"
    batches_read = []  # found from the headers: before any batch is read (the floor's scoring, epoch 1)
    read_epoch = LoaderBatches.epoch
    monkeypatch.setattr(LoaderBatches, "epoch", lambda self, *a: batches_read.append(1) or read_epoch(self, *a))
    one_line_error(capsys, ["train", "--data", str(data), *MINI_RUN, "--num-workers", "0",
                            "--out", str(tmp_path / "runs")], str(bad), expected)
    assert not batches_read
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_header_check_decodes_no_pixels(tmp_path, monkeypatch):
    data = make_mini(tmp_path / "data")

    def no_decoding(self):
        raise AssertionError("pixels decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    MiniFaceDataset(data, "train").check_headers()
    with pytest.raises(AssertionError, match="pixels decoded"):  # the patch does catch a decode
        MiniFaceDataset(data, "train").load_pair(0)


# --- 3: predict and export never destroy an input ----------------------------------------------

def test_predict_refuses_to_overwrite_an_input_and_renames_same_names(trained_run, tmp_path, capsys):
    faces = SyntheticFaces(2, 40, seed=5)
    out = tmp_path / "pred"
    out.mkdir()
    inside = out / "face.png"  # a .png input in --out: its id mask would be out/face.png itself
    Image.fromarray(faces.load_pair(0)[0]).save(inside)
    before = inside.read_bytes()
    ckpt = str(trained_run / "best.pt")
    one_line_error(capsys, ["predict", "--checkpoint", ckpt, str(inside), "--out", str(out)],
                   str(inside), "would overwrite")
    assert inside.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["face.png"]

    for folder, i in (("a", 0), ("b", 1)):  # two inputs named face.jpg
        (tmp_path / folder).mkdir()
        Image.fromarray(faces.load_pair(i)[0]).save(tmp_path / folder / "face.jpg")
    out2 = tmp_path / "pred2"
    assert main(["predict", "--checkpoint", ckpt, str(tmp_path / "a" / "face.jpg"), str(tmp_path / "b" / "face.jpg"),
                 "--out", str(out2)]) == 0
    said = capsys.readouterr().out
    assert "wrote the masks and overlays of 2 images" in said and "face-2.png" in said
    assert sorted(p.name for p in out2.iterdir()) == ["face-2.png", "face-2_overlay.png", "face.png",
                                                      "face_overlay.png"]
    one_line_error(capsys, ["predict", "--checkpoint", ckpt, str(tmp_path / "a" / "face.jpg"),
                            "--out", str(inside)], "is a file")


def test_the_overlay_carries_a_colour_legend(trained_run, tmp_path):
    image = tmp_path / "x.jpg"
    Image.fromarray(SyntheticFaces(1, 40, seed=1).load_pair(0)[0]).save(image)
    assert main(["predict", "--checkpoint", str(trained_run / "best.pt"), str(image), "--out", str(tmp_path)]) == 0
    ids = np.unique(np.array(Image.open(tmp_path / "x.png")))
    overlay = np.array(Image.open(tmp_path / "x_overlay.png").convert("RGB"))
    painted = [c for c in ids if c != 0]  # background is not painted, so not in the legend
    assert overlay.shape[1] > 80 and overlay.shape[0] >= 12 * len(painted)
    legend = overlay[:, 80:].reshape(-1, 3)
    for class_id in painted:  # each predicted class's swatch is in the legend column
        assert (legend == OVERLAY_PALETTE[class_id]).all(axis=1).any(), class_id


def test_export_refuses_its_own_checkpoint_and_a_folder(trained_run, tmp_path, capsys):
    ckpt = trained_run / "best.pt"
    before = ckpt.read_bytes()
    one_line_error(capsys, ["export", str(ckpt), str(ckpt)], "is the checkpoint being exported")
    one_line_error(capsys, ["export", str(ckpt), str(trained_run / "last.pt")], "is the checkpoint")  # a hard link
    assert ckpt.read_bytes() == before
    folder = tmp_path / "releases"
    folder.mkdir()
    one_line_error(capsys, ["export", str(ckpt), str(folder)], "is a folder")
    assert not any(folder.iterdir()) and not list(tmp_path.glob(".*.tmp"))


# --- 4, 5: bench options; one-line errors -------------------------------------------------------

def test_msf_bench_takes_its_own_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0 and "--preset" in capsys.readouterr().out


def test_triton_without_a_gpu_or_the_interpreter_is_one_line(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    runs = tmp_path / "runs"
    one_line_error(capsys, ["train", *TINY, "--backend", "triton", "--out", str(runs)], "TRITON_INTERPRET=1", "slow")
    assert not runs.exists()
    ckpt = str(trained_run / "best.pt")
    one_line_error(capsys, ["predict", "--checkpoint", ckpt, "--backend", "triton", str(ckpt), "--out",
                            str(tmp_path / "p")], "needs a CUDA GPU")
    one_line_error(capsys, ["eval", "--data", str(tmp_path), "--checkpoint", ckpt, "--backend", "triton"],
                   "needs a CUDA GPU")
    one_line_error(capsys, ["demo", "--backend", "triton"], "needs a CUDA GPU")


def wait_for(predicate, proc, seconds=HANG_GUARD_S):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.05)
    assert proc.poll() is None, f"ended early: {proc.stderr.read().decode()[-800:]}"


def test_ctrl_c_says_where_the_last_checkpoint_is(tmp_path):
    run_dir, log = tmp_path / "r", tmp_path / "stdout.log"
    # 500 epochs and no early stopping (--patience 0): the run cannot end by itself before the signal,
    # however slowly this process polls on a loaded machine
    with open(log, "wb") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "msf", "train", *TINY, "--epochs", "500", "--patience", "0",
                                 "--out", str(tmp_path), "--run-name", "r"], cwd=REPO, env=ENV, stdout=stdout,
                                stderr=subprocess.PIPE,
                                # a process started with SIGINT ignored (a background job of a shell without job
                                # control) passes that on: give the trainer the disposition a terminal gives
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_for(lambda: (run_dir / "last.pt").exists(), proc)
        signalled = time.time()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    err = err.decode().strip()
    # (what the trainer printed and how long it took to stop, should this ever fail again)
    context = f"{err!r}; exited {time.time() - signalled:.1f} s after SIGINT; stdout ends {log.read_text()[-400:]!r}"
    assert proc.returncode == 130, context
    assert len(err.splitlines()) == 1 and "interrupted" in err and f"--resume {run_dir}" in err, context
    assert read_checkpoint(run_dir / "last.pt")["epoch"] >= 0


# --- 6: no half-made files ----------------------------------------------------------------------

def test_a_resume_clears_temp_files_a_killed_write_left(tmp_path):
    run_dir = train(TrainConfig(image_size=32, synthetic_train_images=8, synthetic_val_images=4, train_eval_images=4,
                                batch_size=4, num_workers=0, threads=1, progress=False, out=str(tmp_path),
                                run_name="r", epochs=2, stop_after_epochs=1))
    stale = [run_dir / ".best.pt.k2j4_x", run_dir / ".last.pt.1234.link"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    train(TrainConfig(progress=False, threads=1, num_workers=0), resume=run_dir)
    assert not any(p.exists() for p in stale)
    assert read_checkpoint(run_dir / "last.pt")["epoch"] == 1


# --- 7, 8: run.py execs in the caller's directory -------------------------------------------------

RUN_PY = ("import sys; from pathlib import Path; sys.path.insert(0, {repo!r}); import run; "
          "run.ensure_venv = lambda: None; run.PYTHON = Path(sys.executable); sys.exit(run.main(sys.argv[1:]))")


def processes_naming(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_run_py_becomes_the_trainer_in_the_callers_directory(tmp_path):
    here = tmp_path / "elsewhere"
    here.mkdir()
    token = f"orphan-check-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", RUN_PY.format(repo=str(REPO)), "train", *TINY, "--epochs", "500",
                             "--out", "myruns", "--run-name", token], cwd=here, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (here / "myruns" / token / "config.json").exists(), proc)  # 8: relative to the caller
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"msf" in cmdline and b"train" in cmdline, cmdline  # 7: the same process, now the trainer
    assert processes_naming(token) == [proc.pid]  # and no other process trains
    proc.kill()
    proc.wait(timeout=HANG_GUARD_S)
    assert processes_naming(token) == []


# --- 9: resume keeps its recipe unless told -----------------------------------------------------

def test_resume_refuses_recipe_changes_unless_allowed_and_knows_a_finished_run(trained_run, tmp_path, capsys):
    import shutil
    run_dir = tmp_path / "r"
    shutil.copytree(trained_run, run_dir)
    config_before = (run_dir / "config.json").read_text()
    one_line_error(capsys, ["train", "--resume", str(run_dir), "--epochs", "3", "--lr", "0.001"],
                   "--epochs 1 -> 3", "--lr 0.0008 -> 0.001", "--allow-changes epochs,lr")
    one_line_error(capsys, ["train", "--resume", str(run_dir), "--out", str(tmp_path / "elsewhere")],
                   "--out place a new run")
    assert (run_dir / "config.json").read_text() == config_before
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "finished (all 1 epochs are done)" in capsys.readouterr().out
    assert main(["train", "--resume", str(run_dir), "--epoch", "2", "--allow-changes", "epochs", "--no-progress",
                 "--threads", "1"]) == 0  # (an abbreviated flag counts as given)
    assert "resuming at epoch 2" in capsys.readouterr().out
    assert read_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2


# --- 10, 11: options ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [(["--lr", "-1"], "--lr"), (["--num-workers", "-1"], "--num-workers"),
                                        (["--synthetic-train-images", "0"], "--synthetic-train-images"),
                                        (["--warmup-epochs", "-1"], "--warmup-epochs"),
                                        (["--patience", "-1"], "--patience")])
def test_bad_values_are_refused_naming_the_flag(argv, flag, tmp_path, capsys):
    one_line_error(capsys, ["train", *TINY, *argv, "--out", str(tmp_path)], flag)
    assert not any(tmp_path.iterdir())


def test_every_train_option_is_described(capsys):
    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, help_text in FIELD_HELP.items():
        assert " ".join(help_text.split())[:30] in text, name


def test_cpu_run_records_its_real_amp_warns_of_a_short_warmup_and_patience_0_is_off(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "native_cpu_bf16", lambda: False)  # a CPU without native bf16: auto is fp32
    run_dir = train(TrainConfig(image_size=32, synthetic_train_images=8, synthetic_val_images=4, train_eval_images=4,
                                batch_size=4, num_workers=0, threads=1, progress=False, out=str(tmp_path),
                                run_name="r", epochs=2, warmup_epochs=3.0, patience=0))
    out = capsys.readouterr().out
    assert "ends within the 3 warm-up epochs" in out and "amp off" in out
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["amp"] == "off"
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 2  # patience 0 stops nothing


def test_the_paper_recipe_on_a_cpu_is_warned_about():
    paper = TrainConfig(data="d").resolve()
    warning = cpu_schedule_warning(paper, images_per_epoch=704, images_per_s=0.6, epochs_left=200)
    assert "about 20 min" in warning and "65 h" in warning and "--image-size 256" in warning
    assert cpu_schedule_warning(TrainConfig().resolve(), 256, images_per_s=200.0, epochs_left=10) == ""
