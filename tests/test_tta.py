"""Flip test-time augmentation: mirror-equivariant by construction, equal to its definition written
out at full resolution, the same on both backends, and scored beside the plain prediction by eval."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from msf.data import FLIP_ID_MAP, SyntheticFaces, write_mask
from msf.model import MicroSegFormer
from msf.train.checkpoint import write_release
from msf.train.cli import main


def random_model(backend: str = "eager", seed: int = 0) -> MicroSegFormer:
    torch.manual_seed(seed)
    model = MicroSegFormer(backend=backend).eval()
    # trained-looking weights: an untrained classifier predicts one class everywhere, hiding mistakes
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)
        model.classifier.bias.normal_(0, 0.5)
    return model


def mirror(ids_or_logits: torch.Tensor, channels: bool) -> torch.Tensor:
    """The mirror image of a B×H×W id map (ids swapped) or B×K×h×w logits (channels swapped)."""
    flipped = ids_or_logits.flip(-1)
    return flipped[:, FLIP_ID_MAP] if channels else FLIP_ID_MAP[flipped]


def test_flip_tta_is_mirror_equivariant_for_any_weights():
    """TTA(mirror x) = mirror(TTA(x)) with the left/right ids swapped: the logits bit for bit (the same
    two forward passes, added in the other order) and so the ids wherever there is no exact tie."""
    model = random_model()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, logits_of_mirror = model.flip_tta_logits(images), model.flip_tta_logits(images.flip(-1))
    assert torch.equal(logits_of_mirror, mirror(logits, channels=True))
    # at the logits' own resolution the upsample is the identity, so the ids are exactly equivariant
    low = tuple(logits.shape[-2:])
    ids, ids_of_mirror = model.predict(images, low, tta="flip"), model.predict(images.flip(-1), low, tta="flip")
    assert torch.equal(ids_of_mirror, mirror(ids, channels=False))
    # without TTA a random model is not equivariant: the test above is not vacuous
    plain, plain_of_mirror = model.predict(images, low), model.predict(images.flip(-1), low)
    assert not torch.equal(plain_of_mirror, mirror(plain, channels=False))


def test_flip_tta_equals_its_definition_at_full_resolution():
    """argmax of the mean of the full-resolution logits of the image and of its mirror flipped back
    with channels swapped (the paper's order of upsampling, written independently)."""
    model = random_model()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(images).double()
        full_of_mirror = model(images.flip(-1)).double()
        expected = (0.5 * (full + mirror(full_of_mirror, channels=True))).argmax(1)
        got = model.predict(images, tta="flip")
    agree = (got == expected).double().mean().item()
    assert agree > 0.999, f"only {agree:.4%} of pixels agree"  # fp32 rounding apart, near-ties only
    assert not torch.equal(model.predict(images), got), "TTA changed nothing: is the mirror used?"


def test_predict_variants_share_the_plain_prediction():
    model = random_model()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    both = model.predict_variants(images)
    assert torch.equal(both["none"], model.predict(images))
    assert torch.equal(both["flip"], model.predict(images, tta="flip"))
    with pytest.raises(ValueError, match="tta must be one of"):
        model.predict(images, tta="rotate")


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_flip_tta_same_on_both_backends():
    pytest.importorskip("triton")
    eager = random_model("eager")
    fused = random_model("triton")
    fused.load_state_dict(eager.state_dict())
    images = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(4))
    agree = (fused.predict(images, tta="flip") == eager.predict(images, tta="flip")).double().mean().item()
    assert agree > 0.999, f"only {agree:.4%} of pixels agree"


def test_eval_scores_without_and_with_tta(tmp_path, capsys):
    for folder in ("images", "masks"):
        (tmp_path / "data" / "val" / folder).mkdir(parents=True)
    faces = SyntheticFaces(2, 64, seed=5)
    for i in range(2):
        image, mask = faces.load_pair(i)
        Image.fromarray(image).save(tmp_path / "data" / "val" / "images" / f"f{i}.jpg")
        write_mask(tmp_path / "data" / "val" / "masks" / f"f{i}.png", mask)
    release = tmp_path / "m.safetensors"
    write_release(random_model(), {"image_size": 64}, release)
    argv = ["eval", "--data", str(tmp_path / "data"), "--checkpoint", str(release), "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(argv + ["--tta", "flip"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert "tta_flip" not in plain
    assert both["f_score"] == plain["f_score"]  # the plain score is unchanged beside the TTA one
    assert 0 <= both["tta_flip"]["f_score"] <= 1 and both["tta_flip"]["images"] == 2
    assert set(both["tta_flip"]["per_class_f1"]) == set(plain["per_class_f1"])
