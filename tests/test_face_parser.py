"""The face parser people call from Python (issue 26): `msf.FaceParser` on every kind of image, the
ONNX export and its onnxruntime engine against torch, and `msf predict` on folders."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msf import CLASS_NAMES, FaceParser
from msf.data import FLIP_ID_MAP, OVERLAY_PALETTE, PALETTE, SyntheticFaces, normalize
from msf.export import OnnxParsingSession, ParsingGraph, export_onnx
from msf.train.checkpoint import load_model
from msf.train.cli import main
from msf.train.config import TrainConfig
from msf.train.loop import train

REPO = Path(__file__).resolve().parents[1]
ort = pytest.importorskip("onnxruntime", reason="the onnxruntime engine needs the onnxruntime package")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small model trained for two epochs: its predictions vary across the image (an untrained one
    predicts one class everywhere, which would hide a mistake)."""
    root = tmp_path_factory.mktemp("parser")
    run = train(TrainConfig(image_size=32, synthetic_train_images=32, synthetic_val_images=4, train_eval_images=4,
                            batch_size=8, num_workers=0, threads=2, progress=False, out=str(root), run_name="r",
                            epochs=2, decoder_dropout=0.0))
    return run / "best.pt"


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(checkpoint), "--onnx", str(path)]) == 0
    return path


def faces(n: int, size: int, seed: int = 5) -> list[np.ndarray]:
    made = SyntheticFaces(n, size, seed=seed)
    return [made.load_pair(i)[0] for i in range(n)]


# --- the API ------------------------------------------------------------------------------------

def test_every_kind_of_image_gives_a_mask_at_its_own_size(checkpoint, tmp_path):
    parser = FaceParser.from_pretrained(checkpoint, engine="torch")
    image = faces(1, 80)[0]
    path = tmp_path / "face.png"
    Image.fromarray(image).save(path)
    expected = parser(image)
    assert expected.shape == (80, 80) and expected.dtype == np.uint8 and expected.max() < len(CLASS_NAMES)
    assert len(np.unique(expected)) > 1
    same = [str(path), path, Image.fromarray(image), Image.fromarray(image).convert("RGBA"),
            np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]),
            torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(image).permute(2, 0, 1).float() / 255]
    for i, form in enumerate(same):
        assert np.array_equal(parser(form), expected), f"input form {i}: {type(form).__name__}"
    grey = parser(image[..., 0])
    assert grey.shape == (80, 80)
    odd = [image[:50, :70], faces(1, 120, seed=6)[0], image]  # three sizes in one call
    masks = parser(odd)
    assert isinstance(masks, list) and [m.shape for m in masks] == [(50, 70), (120, 120), (80, 80)]
    assert np.array_equal(masks[2], expected)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8, 3), np.float32), "must be uint8"),
    (np.zeros((3, 8, 8, 1), np.uint8), "H×W×3"),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), "3×H×W"),
    (torch.zeros(3, 8, 8, dtype=torch.int32), "uint8 or float"),
    (12, "cannot read an image from a int"),
])
def test_a_bad_image_is_refused_with_a_clear_error(checkpoint, bad, message):
    parser = FaceParser.from_pretrained(checkpoint, engine="torch")
    with pytest.raises(ValueError, match=re.escape(message)):
        parser(bad)


def test_options_are_checked_by_name(checkpoint):
    for kwargs, message in (({"engine": "tensorrt"}, "engine must be"), ({"dtype": "fp8"}, "dtype must be"),
                            ({"backend": "cuda"}, "backend must be"), ({"tta": "rotate"}, "tta must be"),
                            ({"input_size": 48}, "multiple of 32")):
        with pytest.raises(ValueError, match=message):
            FaceParser.from_pretrained(checkpoint, engine=kwargs.pop("engine", "torch"), **kwargs)


def test_auto_picks_onnxruntime_on_a_cpu_and_torch_when_asked_for_triton(checkpoint):
    assert FaceParser.from_pretrained(checkpoint).engine == "onnxruntime"
    assert FaceParser.from_pretrained(checkpoint, backend="triton").engine == "torch"
    parser = FaceParser.from_pretrained(checkpoint, engine="torch")
    assert parser.dtype == "float32" and parser.model.backend == "eager" and parser.device.type == "cpu"


def test_colorize_and_overlay(checkpoint):
    parser = FaceParser.from_pretrained(checkpoint, engine="torch")
    image = faces(1, 64)[0]
    mask = parser(image)
    assert np.array_equal(parser.colorize(mask), PALETTE[mask])
    assert np.array_equal(parser.colorize(mask, "readable"), OVERLAY_PALETTE[mask])
    picture = parser.overlay(image, mask)
    assert picture.shape[0] == 64 and picture.shape[1] > 64 and picture.dtype == np.uint8
    assert parser.overlay(image, mask, legend=False).shape == image.shape
    with pytest.raises(ValueError, match="mask is 32×32 but the image is 64×64"):
        parser.overlay(image, mask[:32, :32])
    assert parser.class_names == CLASS_NAMES


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python example, as written there, from a folder holding a face.jpg."""
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)[:1]
    Image.fromarray(faces(1, 96)[0]).save(tmp_path / "face.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["mask"], np.ndarray) and namespace["mask"].shape == (96, 96)
    assert (tmp_path / "face_overlay.png").is_file()


# --- ONNX and onnxruntime -----------------------------------------------------------------------

def test_the_onnx_file_computes_what_torch_computes(checkpoint, onnx_file):
    session = OnnxParsingSession(onnx_file)
    model, config = load_model(checkpoint)
    assert session.input_size == config["image_size"] == 32 and session.class_names == CLASS_NAMES
    graph = ParsingGraph(model, session.input_size)
    for batch, h, w in ((1, 32, 32), (3, 64, 48), (2, 45, 77)):  # dynamic batch and size, odd sizes too
        images = normalize(torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(h * w)))
        with torch.no_grad():
            expected, expected_ids = (t.numpy() for t in graph(images))
        got, ids = session.logits(images.numpy()), session.ids(images.numpy())
        assert got.shape == (batch, len(CLASS_NAMES), h, w) and ids.shape == (batch, h, w) and ids.dtype == np.uint8
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= 1e-4 * scale, f"{batch}×{h}×{w}"
        assert np.array_equal(ids, got.argmax(1))  # the graph's ArgMax is its own logits' argmax
        assert (ids == expected_ids).mean() >= 0.999


def test_both_engines_give_the_same_masks_with_and_without_tta(checkpoint, onnx_file):
    torch_parser = FaceParser.from_pretrained(checkpoint, engine="torch")
    onnx_parser = FaceParser.from_pretrained(onnx_file)
    assert onnx_parser.engine == "onnxruntime"
    images = faces(4, 64) + faces(1, 100, seed=7)
    for tta in ("none", "flip"):
        agree = np.mean([(a == b).mean() for a, b in zip(torch_parser(images, tta=tta), onnx_parser(images, tta=tta))])
        assert agree >= 0.999, (tta, agree)
    # flip TTA is mirror-equivariant with left/right swapped, on the onnxruntime engine too
    image = images[0]
    mask, of_mirror = onnx_parser(image, tta="flip"), onnx_parser(image[:, ::-1].copy(), tta="flip")
    assert (FLIP_ID_MAP.numpy()[mask[:, ::-1]] == of_mirror).mean() >= 0.999


def test_onnxruntime_scores_the_validation_split_like_torch(real_data):
    """The committed reference model, exported: the val F-score of both engines within 1e-3."""
    from msf.metrics import FScoreMeter
    from msf.data import open_dataset
    data = open_dataset(real_data, "val", None)
    scores = {}
    for engine in ("torch", "onnxruntime"):
        parser = FaceParser.from_pretrained(engine=engine)
        meter = FScoreMeter()
        for i in range(len(data)):
            image, mask = data.load_pair(i)
            meter.update(torch.from_numpy(parser(image))[None].long(), torch.from_numpy(mask)[None].long())
        scores[engine] = meter.compute()["f_score"]
    assert scores["onnxruntime"] == pytest.approx(scores["torch"], abs=1e-3), scores
    assert scores["torch"] > 0.6  # the reference model (models/README.md: 0.7053 through msf eval)


def test_an_onnx_file_without_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    onnx.save(model, tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="without msf metadata"):
        OnnxParsingSession(tmp_path / "other.onnx")
    helper.set_model_props(model, {"msf": json.dumps({"input_size": 32, "class_names": list(CLASS_NAMES)})})
    onnx.save(model, tmp_path / "old.onnx")  # an export from before the graph had its ids output
    with pytest.raises(ValueError, match="export it again"):
        OnnxParsingSession(tmp_path / "old.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an ONNX model"):
        OnnxParsingSession(tmp_path / "junk.onnx")


def test_export_refuses_to_write_over_its_checkpoint(checkpoint, capsys):
    assert main(["export", str(checkpoint), "--onnx", str(checkpoint)]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err
    assert main(["export", str(checkpoint)]) == 2
    assert "--onnx OUT.onnx" in capsys.readouterr().err


def test_export_of_a_triton_model_is_the_eager_graph(checkpoint, tmp_path):
    model, config = load_model(checkpoint, backend="triton")
    path = export_onnx(model, config["image_size"], tmp_path / "t.onnx")
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert "Resize" in ops and not any("msf" in op for op in ops)


# --- msf predict on folders ----------------------------------------------------------------------

def test_predict_walks_folders_skips_what_exists_and_ends_with_a_summary(checkpoint, tmp_path, capsys):
    tree = tmp_path / "photos"
    (tree / "trip").mkdir(parents=True)
    for i, image in enumerate(faces(3, 48)):
        Image.fromarray(image).save(tree / ("trip" if i == 2 else ".") / f"p{i}.jpg")
    (tree / "notes.txt").write_text("not an image, not looked at")
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(checkpoint), str(tree), "--out", str(out), "--engine", "onnxruntime"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "wrote the masks and overlays of 2 images" in said and "onnxruntime" in said
    assert sorted(p.name for p in out.iterdir()) == ["p0.png", "p0_overlay.png", "p1.png", "p1_overlay.png"]
    assert main(args + ["--recursive"]) == 0
    said = capsys.readouterr().out
    assert "of 1 image " in said and "skipped 2 whose outputs exist" in said
    assert (out / "trip" / "p2.png").is_file() and Image.open(out / "trip" / "p2.png").size == (48, 48)
    before = (out / "p0.png").stat().st_mtime_ns
    assert main(args + ["--recursive", "--overwrite", "--engine", "torch"]) == 0
    assert "of 3 images" in capsys.readouterr().out and (out / "p0.png").stat().st_mtime_ns != before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--checkpoint", str(checkpoint), str(empty), "--out", str(out)]) == 2
    assert "no images" in capsys.readouterr().err


def test_predict_engines_write_the_same_masks(checkpoint, onnx_file, tmp_path):
    image = tmp_path / "face.jpg"
    Image.fromarray(faces(1, 64, seed=11)[0]).save(image)
    masks = {}
    for engine, ckpt in (("torch", checkpoint), ("onnxruntime", onnx_file)):
        assert main(["predict", "--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / engine),
                     "--engine", engine]) == 0
        masks[engine] = np.array(Image.open(tmp_path / engine / "face.png"))
    assert (masks["torch"] == masks["onnxruntime"]).mean() >= 0.999


def test_masks_written_by_predict_read_back_as_a_data_set(checkpoint, tmp_path, capsys):
    """predict's masks are palette PNGs in the data set's format: scored by `msf eval` (the torch
    path) against the masks `msf predict` wrote (the onnxruntime engine), the model agrees with itself."""
    data = tmp_path / "data" / "val"
    (data / "images").mkdir(parents=True)
    Image.fromarray(faces(1, 64)[0]).save(data / "images" / "a.png")
    assert main(["predict", "--checkpoint", str(checkpoint), str(data / "images" / "a.png"), "--out",
                 str(data / "masks")]) == 0
    (data / "masks" / "a_overlay.png").unlink()
    capsys.readouterr()
    assert main(["eval", "--data", str(tmp_path / "data"), "--checkpoint", str(checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pixel_accuracy"] >= 0.999
