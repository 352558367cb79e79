"""What the cost model predicts for the ops `msf bench` times, read from the committed table.

A CPU cannot time the Triton kernels (the interpreter is a correctness tool), so `msf bench` on a
CPU shows, beside its rows, the GPU speed-up the project claims for the same op: the cost model's
predicted time of the fused kernels against the byte floor of the eager op, at the paper's shapes
(B = 32, 512², bf16 autocast), each labelled as a prediction with the model's version and error
band. The table is `CURRENT_COST_TABLE` (written by `python -m msf.profiling.cost --json`); reading it
needs neither Triton nor a GPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CURRENT_COST_TABLE = Path(__file__).resolve().parent / "results" / "predicted" / "cost-model.json"

# `msf bench` op -> (cost-model op, its passes summed), or the reason there is no prediction.
COST_OPS: dict[str, tuple[str, tuple[str, ...]] | str] = {
    "head+ce_dice": ("head_loss", ("fwd", "bwd")),
    "lmsa": ("lmsa", ("fwd", "bwd")),
    "lmsa_classifier": ("lmsa_classifier", ("fwd", "bwd")),
    "decoder_mlp": ("decoder_mlp", ("fwd", "bwd")),
    "upsample+argmax": ("upsample_argmax", ("fwd",)),
    "train_step": ("(step)", ("fwd+bwd",)),
}
for _stage in range(1, 5):
    COST_OPS[f"attention/stage{_stage}"] = ("the model runs attention inside its fused attention sublayer, which "
                                            "the cost model predicts (attention_sublayer); bare attention has no "
                                            "prediction")
for _stage in range(1, 5):
    COST_OPS[f"attn_block/stage{_stage}"] = (f"attention_block[stage {_stage}]", ("fwd", "bwd"))
    COST_OPS[f"attn_block_embed/stage{_stage}"] = (f"attention_block_embedded[stage {_stage}]", ("fwd", "bwd"))
    COST_OPS[f"ffn/stage{_stage}"] = (f"ffn_sublayer[stage {_stage}]", ("fwd", "bwd"))
    COST_OPS[f"map_norm/stage{_stage}"] = (f"map_layer_norm[stage {_stage}]", ("fwd", "bwd"))
    COST_OPS[f"stage_output/stage{_stage}"] = (f"stage_output[stage {_stage}]", ("fwd", "bwd"))
    COST_OPS[f"ffn_stage/stage{_stage}"] = (f"ffn_stage_output[stage {_stage}]", ("fwd", "bwd"))
STEP_ROWS = ("triton step (fused + host ops + rest)", "eager step floor, paper order")


@dataclass(frozen=True)
class Prediction:
    op: str                         # the `msf bench` op
    device: str                     # the cost model's device key (h100, a100)
    triton_s: float                 # fused kernels, predicted
    eager_floor_s: float            # the eager op's bytes ÷ bandwidth (a floor: real eager is slower)
    what: str                       # what the two times cover
    model_version: str
    error_band: tuple[float, float]  # predicted / measured on kernels with published timings
    source: str

    @property
    def speedup(self) -> float:
        """Eager floor ÷ triton prediction (> 1: triton predicted faster than eager could ever be)."""
        return self.eager_floor_s / self.triton_s

    def line(self) -> str:
        lo, hi = self.error_band
        return (f"predicted on {self.device.upper()} at B=32, 512² (cost model {self.model_version}, not a "
                f"measurement): triton {_time(self.triton_s)} vs eager floor {_time(self.eager_floor_s)} = "
                f"{self.speedup:.1f}x ({self.what}; real times run {1 / hi:.2f}-{1 / lo:.1f}x the prediction)")


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def load_predictions(path: Path = CURRENT_COST_TABLE, device: str = "h100") -> dict[str, Prediction]:
    """bench op -> its prediction on `device`; ops without one are left out (`no_prediction_reason`)."""
    rows = json.loads(Path(path).read_text())
    missing = {"model_version", "error_band"} - set(rows[0]) if rows else {"rows"}
    if missing:
        raise ValueError(f"{path}: cost-model table without {', '.join(sorted(missing))}; re-run "
                         "`python -m msf.profiling.cost --json` to write one")
    return predictions_from_rows(rows, device, str(path))


def bench_pass(bench_op: str) -> str:
    """The pass name `msf bench` gives the op's timing ("step", "fwd+bwd" or "fwd")."""
    target = COST_OPS[bench_op]
    return "step" if target[0] == "(step)" else "+".join(target[1])


def predictions_from_rows(rows: list[dict], device: str, source: str) -> dict[str, Prediction]:
    """`load_predictions` on a cost-model table already read (rows of every device)."""
    rows = [r for r in rows if r["device"] == device]
    predictions = {}
    for bench_op, target in COST_OPS.items():
        if isinstance(target, str):
            continue
        cost_op, passes = target
        if cost_op == "(step)":
            times = {r["kernel"]: r["value"] for r in rows if r["op"] == "(step)" and r["metric"] == "time"}
            if not all(name in times for name in STEP_ROWS):
                continue
            triton_s, eager_s = (times[name] for name in STEP_ROWS)
            what = ("the whole step: fused ops predicted + their host-side torch ops at a launch each + the eager rest "
                    "at its floor with a launch for each of its ops, vs the eager step's floor")
        else:
            per_pass = {(r["pass"], r["metric"]): r["value"] for r in rows
                        if r["op"] == cost_op and r["kernel"] == "(op)"}
            if not all((p, m) in per_pass for p in passes for m in ("fused_predicted", "eager_floor")):
                continue
            triton_s = sum(per_pass[(p, "fused_predicted")] for p in passes)
            eager_s = sum(per_pass[(p, "eager_floor")] for p in passes)
            what = f"{cost_op} {'+'.join(passes)}"
        first = rows[0]
        predictions[bench_op] = Prediction(bench_op, device, triton_s, eager_s, what, first["model_version"],
                                           tuple(first["error_band"]), source)
    return predictions


def no_prediction_reason(op: str) -> str:
    target = COST_OPS.get(op)
    if target is None:
        return "the cost model has no row for this op"
    return target if isinstance(target, str) else "the cost-model table has no rows for it"
