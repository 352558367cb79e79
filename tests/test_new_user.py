"""The rough edges a new user met on a fresh clone (issue 27, items 8-16): the test command's
verbosity, the interpreter warning and img/s of a CPU triton run, a subset of the data for train and
eval, predict checking every input before it writes, an overlay palette a person can read, classes
eval could not score, errors before warnings, where a kept cache is, and the profilers' one-line
errors and Python. Tiny synthetic runs."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msf.data import (CLASS_NAMES, OVERLAY_PALETTE, PALETTE, SyntheticFaces, open_dataset, overlay, with_legend,
                      write_mask)
from msf.train import loop
from conftest import make_mini, one_line_error
from msf.train.cli import main
from msf.train.config import TrainConfig
from msf.train.loop import Interrupted, rate, train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, synthetic_train_images=8, synthetic_val_images=4, train_eval_images=4, batch_size=4,
            num_workers=0, threads=1, progress=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return train(TrainConfig(**TINY, out=str(tmp_path_factory.mktemp("trained")), run_name="r", epochs=1))


# --- 8: the test command ------------------------------------------------------------------------

def _run_py(monkeypatch, cores: int):
    """run.py as a module, on a machine of `cores` usable cores."""
    spec = importlib.util.spec_from_file_location("run_py", REPO / "run.py")
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    monkeypatch.setattr(run_py.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(run_py, "_cgroup_cpus", lambda: None)
    return run_py


def test_run_py_test_passes_verbosity_through(monkeypatch):
    run_py = _run_py(monkeypatch, cores=1)
    assert run_py.pytest_args(["-k", "parity"]) == ["-q", "-k", "parity"]
    for verbose in (["-v"], ["-vv", "-x"], ["--verbose"], ["-q"]):
        assert run_py.pytest_args(verbose) == verbose  # no -q of its own to cancel the user's -v


def test_run_py_test_runs_a_worker_a_core_unless_told(monkeypatch):
    """Two cores (CI's machine): two pytest-xdist workers; many: capped; the caller's own choice of
    workers or distribution, or xdist turned off, is left alone."""
    run_py = _run_py(monkeypatch, cores=2)
    assert run_py.pytest_args(["-k", "parity"]) == ["-n", "2", "--dist", "worksteal", "-q", "-k", "parity"]
    assert run_py.pytest_args(["-v"]) == ["-n", "2", "--dist", "worksteal", "-v"]
    for chosen in (["-n", "0"], ["-n0"], ["--numprocesses=3"], ["--dist", "load"], ["-p", "no:xdist"]):
        assert run_py.pytest_args(chosen) == ["-q", *chosen]
    run_py = _run_py(monkeypatch, cores=64)
    assert run_py.pytest_args([])[:2] == ["-n", str(run_py.MAX_TEST_WORKERS)]
    monkeypatch.setattr(run_py, "_cgroup_cpus", lambda: 2.5)  # a container's quota, not the host's cores
    assert run_py.pytest_args([])[:2] == ["-n", "2"]
    monkeypatch.setattr(run_py, "_cgroup_cpus", lambda: 0.5)
    assert run_py.pytest_args([]) == ["-q"]


# --- 9: a CPU triton run says it is the interpreter and shows a rate that is not 0.0 -------------

def test_a_cpu_triton_run_warns_that_it_runs_the_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(loop, "_session", lambda cfg, run_dir, *a: run_dir)  # the note comes before any step
    train(TrainConfig(**TINY, backend="triton", out=str(tmp_path), run_name="r", epochs=1))
    assert "Triton's interpreter" in capsys.readouterr().out
    train(TrainConfig(**TINY, out=str(tmp_path), run_name="e", epochs=1))
    assert "interpreter" not in capsys.readouterr().out


def test_the_rate_keeps_three_digits_when_it_is_small():
    assert rate(0.0123) == "0.0123" and rate(3.14159) == "3.14" and rate(9.9) == "9.9" and rate(250.0) == "250.0"


# --- 10: a subset for train and eval --------------------------------------------------------------

def test_train_and_eval_on_the_first_few_images(trained_run, tmp_path, capsys):
    data = make_mini(tmp_path / "data", n=5)
    assert [p.name for p in open_dataset(data, "val", None, limit=2).images] == ["f0.jpg", "f1.jpg"]
    assert len(open_dataset(None, "train", 32, synthetic_images=8, limit=3)) == 3
    assert main(["train", "--data", str(data), "--limit", "3", "--image-size", "32", "--batch-size", "2",
                 "--epochs", "1", "--threads", "1", "--num-workers", "0", "--no-progress",
                 "--out", str(tmp_path / "runs"), "--run-name", "r"]) == 0
    assert "3 train / 3 val images" in capsys.readouterr().out
    assert main(["eval", "--data", str(data), "--checkpoint", str(trained_run / "best.pt"), "--limit", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    one_line_error(capsys, ["eval", "--data", str(data), "--checkpoint", str(trained_run / "best.pt"), "--limit", "0"],
                   "--limit must be at least 1")


# --- 11: predict checks every input before it writes ----------------------------------------------

def test_predict_checks_every_input_before_writing_anything(trained_run, tmp_path, capsys):
    good, text = tmp_path / "face.jpg", tmp_path / "notes.jpg"
    Image.fromarray(SyntheticFaces(1, 32, seed=1).load_pair(0)[0]).save(good)
    text.write_text("not an image")
    out = tmp_path / "out"
    ckpt = str(trained_run / "best.pt")
    for inputs in ([good, text], [text]):
        one_line_error(capsys, ["predict", "--checkpoint", ckpt, *map(str, inputs), "--out", str(out)],
                       str(text), "nothing was written")
        assert not out.exists()


def test_a_truncated_image_is_named_and_the_others_are_written(trained_run, tmp_path, capsys):
    good, truncated, last = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"
    Image.fromarray(SyntheticFaces(1, 64, seed=1).load_pair(0)[0]).save(good)
    truncated.write_bytes(good.read_bytes()[:-200])  # the header reads, the pixels do not
    Image.fromarray(SyntheticFaces(1, 48, seed=2).load_pair(0)[0]).save(last)
    out = tmp_path / "out"
    captured = one_line_error(capsys, ["predict", "--checkpoint", str(trained_run / "best.pt"), str(good),
                                       str(truncated), str(last), "--out", str(out)],
                              str(truncated), "1 of 3 images could not be read", f"2 written to {out}")
    assert f"1 failed: {truncated} (unreadable image" in captured.out  # the summary line names it too
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "c.png", "c_overlay.png"]


# --- 12: an overlay palette a person can tell apart; mask files keep the data set's ---------------

def lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of sRGB colours, for colour differences as a person sees them."""
    c = rgb.astype(np.float64) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def distances(palette: np.ndarray) -> np.ndarray:
    points = lab(palette)
    return np.linalg.norm(points[:, None] - points[None], axis=-1)


def painted_min(palette: np.ndarray) -> float:
    d = distances(palette)[1:, 1:]  # background is not painted
    return float(d[~np.eye(len(d), dtype=bool)].min())


# parts that touch on a face: their overlay colours must differ most
TOUCHING = [("skin", part) for part in ("nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                                        "mouth", "u_lip", "l_lip", "hair", "hat", "neck")] + \
           [("hair", part) for part in ("hat", "l_ear", "r_ear", "neck", "cloth", "l_brow", "r_brow", "ear_r")] + \
           [("mouth", "u_lip"), ("mouth", "l_lip"), ("u_lip", "l_lip"), ("neck", "cloth"), ("neck", "neck_l"),
            ("neck_l", "cloth"), ("ear_r", "l_ear"), ("ear_r", "r_ear"), ("eye_g", "l_eye"), ("eye_g", "r_eye")]


def test_overlay_colours_are_far_apart_where_the_data_sets_are_not():
    ids = {name: i for i, name in enumerate(CLASS_NAMES)}
    dataset, readable = distances(PALETTE), distances(OVERLAY_PALETTE)
    assert painted_min(PALETTE) < 16                  # l_eye and hair: two blues, ΔE 15
    assert min(dataset[ids[a], ids[b]] for a, b in TOUCHING) < 20  # skin beside r_ear: two reds, ΔE 19
    assert painted_min(OVERLAY_PALETTE) > 18
    for a, b in TOUCHING:
        assert readable[ids[a], ids[b]] > 28, (a, b)


def test_masks_keep_the_data_sets_palette_and_overlays_use_the_readable_one(tmp_path):
    image, mask = SyntheticFaces(1, 64, seed=2).load_pair(0)
    write_mask(tmp_path / "m.png", mask)
    assert Image.open(tmp_path / "m.png").getpalette()[:57] == PALETTE.flatten().tolist()
    blended = overlay(np.zeros_like(image), mask)
    skin = mask == 1
    assert np.abs(blended[skin].astype(int) - OVERLAY_PALETTE[1] // 2).max() <= 1
    assert (blended[mask == 0] == 0).all()


@pytest.mark.parametrize("side", [64, 512, 1024])
def test_the_legend_lists_painted_classes_in_type_that_grows_with_the_image(side):
    image, mask = SyntheticFaces(1, side, seed=2).load_pair(0)
    ids = np.unique(mask).tolist()
    panel = np.concatenate([image, overlay(image, mask)], axis=1)
    out = with_legend(panel, ids)
    legend = out[:, panel.shape[1]:]
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    swatches = [i for i in range(1, len(CLASS_NAMES)) if tuple(OVERLAY_PALETTE[i]) in colours]
    assert swatches == ids[1:]  # each painted class (background, id 0, is not painted, so not listed)
    swatch_rows = (legend == OVERLAY_PALETTE[ids[1]]).all(-1).any(-1).sum()
    assert swatch_rows >= max(6, side // 48)  # about a 32nd of the image a row, 12 px at least


# --- 13: eval says which classes it could not score -----------------------------------------------

def test_eval_names_the_classes_it_did_not_score(trained_run, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "masks").mkdir(parents=True)
    image = SyntheticFaces(1, 32, seed=4).load_pair(0)[0]
    Image.fromarray(image).save(root / "val" / "images" / "a.jpg")
    write_mask(root / "val" / "masks" / "a.png", np.zeros((32, 32), np.uint8))
    assert main(["eval", "--data", str(root), "--checkpoint", str(trained_run / "best.pt"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores["classes_absent"]) == set(CLASS_NAMES) - set(scores["per_class_f1"])
    assert scores["classes_absent"]
    assert main(["eval", "--data", str(root), "--checkpoint", str(trained_run / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "not scored: " + ", ".join(scores["classes_absent"]) in out


# --- 14: errors before warnings --------------------------------------------------------------------

def test_a_missing_data_folder_is_the_first_thing_said(tmp_path, capsys):
    captured = one_line_error(capsys, ["train", "--data", str(tmp_path / "missing"), "--epochs", "1",
                                       "--out", str(tmp_path / "runs")], "data folder not found")
    assert "warning" not in captured.out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --- 15: Ctrl-C before the first checkpoint says where the kept cache is -------------------------

def test_an_interrupt_before_the_first_checkpoint_names_the_kept_cache(tmp_path, monkeypatch):
    def interrupted_during_decoding(cfg, device, ctx):
        (tmp_path / ".cache").mkdir()
        (tmp_path / ".cache" / "abc.images.npy").write_bytes(b"\0" * 3_000_000)
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "build_inputs", interrupted_during_decoding)
    with pytest.raises(Interrupted) as stop:
        train(TrainConfig(**TINY, out=str(tmp_path), run_name="r", epochs=1, pipeline="device"))
    message = str(stop.value)
    assert "nothing kept" in message and f"{tmp_path / '.cache'}" in message and "3 MB" in message
    assert not (tmp_path / "r").exists()


def test_an_interrupted_cache_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from msf import pipeline
    calls = []

    def interrupted_save(f, array):
        calls.append(1)
        f.write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.np, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        pipeline.load_uint8_cache(SyntheticFaces(2, 16, seed=0), tmp_path / "cache")
    assert calls and not list((tmp_path / "cache").iterdir())


# --- 16: the profilers -----------------------------------------------------------------------------

def test_torch_profile_with_triton_and_no_interpreter_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "msf.profiling.torch_profile", "--backend", "triton", "--out",
                           str(tmp_path)], cwd=REPO, env={**env, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("msf.profiling.torch_profile: error:") and "TRITON_INTERPRET=1" in done.stderr


@pytest.mark.parametrize("script", ["nsys.sh", "ncu.sh"])
def test_the_nsight_scripts_run_the_projects_python(tmp_path, script):
    venv_python = REPO / ".venv" / "bin" / "python"
    if not venv_python.exists():
        pytest.skip("no .venv in this checkout (run.py makes it)")
    tool = script.removesuffix(".sh")
    (tmp_path / "bin").mkdir()
    stand_in = tmp_path / "bin" / tool  # records what it was asked to profile, then fails the script
    stand_in.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\nexit 3\n')
    stand_in.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", ARGS_FILE=str(tmp_path / "args.txt"))
    subprocess.run(["bash", str(REPO / "profiling" / script), str(tmp_path / "out")], cwd=REPO, env=env,
                   capture_output=True, text=True)
    args = (tmp_path / "args.txt").read_text().split("\n")
    assert ".venv/bin/python" in args and "msf.profiling.step" in args, args
