"""The committed reference model (models/reference.safetensors) meets the accuracy it is published
with: issue 16's bar, val F ≥ 0.68 at 512×512 with the paper's metric, without test-time
augmentation, and the scores recorded in models/reference-eval-val-512.json. Needs the real data
(skips without it); about 15 s on 2 cores."""
from __future__ import annotations

import contextlib
import io
import json

from conftest import REPO
from msf.train.cli import main

MODELS = REPO / "models"


def test_reference_model_scores_what_models_readme_says(real_data):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", "--data", str(real_data), "--checkpoint", str(MODELS / "reference.safetensors"),
                     "--json", "--num-workers", "0"]) == 0
    scores = json.loads(out.getvalue())
    recorded = json.loads((MODELS / "reference-eval-val-512.json").read_text())
    assert scores["scored_at"] == [512, 512] and scores["images"] == 100
    assert scores["f_score"] >= 0.68, f"val F {scores['f_score']:.4f} < 0.68"
    # bf16 autocast on CPUs with native bf16, fp32 elsewhere: a few pixels may change class
    assert abs(scores["f_score"] - recorded["f_score"]) < 5e-3, (scores["f_score"], recorded["f_score"])
    assert abs(scores["miou"] - recorded["miou"]) < 5e-3, (scores["miou"], recorded["miou"])
