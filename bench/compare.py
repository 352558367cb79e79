"""Measured beside predicted: `msf bench` timings from a GPU against the cost model's predictions.

    python -m msf.bench.compare MEASURED.json [MORE.json ...] [--out DIR] [--name NAME]

MEASURED: the long-format rows `python -m msf.bench.suite` writes (metric "time", unit ms, the
device's name as CUDA reports it). Each timed (op, provider) that the project predicts gets one
row: the measured median, the prediction for the same card (its cost-model key from the device
name) and predicted ÷ measured, the calibration's convention: below 1 the card ran slower than
predicted. The predictions are the committed tables:
- triton: the fused kernels (`bench/results/predicted/cost-model.json`, `python -m msf.profiling.cost`);
- eager: eager's byte floor from the same table (a floor, not a prediction of eager: real eager runs
  a few times it);
- compile, triton+compile (the training step and each fused op's eager reference alone):
  Inductor's code for the card, predicted (`compile-step.json`, `python -m msf.profiling.inductor`).
Both tables carry the model version and its error band (predicted ÷ measured on the calibration
set); a row says whether its ratio falls inside that band. Nothing here needs a GPU, Triton or
torch: `bench/gpu_session.sh` runs it at the end of a lent session, and it can be re-run here on
the unpacked results.

Writes NAME.json (long-format rows, metric "predicted_over_measured") and NAME.md in --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from msf.bench.predicted import COST_OPS, CURRENT_COST_TABLE as COST_TABLE, bench_pass, predictions_from_rows

COMPILE_TABLE = COST_TABLE.parent / "compile-step.json"

# cost-model device key from the name CUDA reports (first match wins: NVL before the plain H100)
DEVICE_KEYS = (("H200", "h200"), ("H100 NVL", "h100nvl"), ("H100", "h100"), ("A100", "a100"))

# the training step's compile figures: bench provider -> (compile table's op, its provider)
COMPILED_STEP = {"compile": ("step (paper)", "torch.compile"),
                 "triton+compile": ("step (triton)", "triton+torch.compile")}


@dataclass(frozen=True)
class Predicted:
    seconds: float
    what: str                        # which table and figure
    model_version: str
    error_band: tuple[float, float]  # predicted ÷ measured on the calibration set


def device_key(name: str) -> str | None:
    """The cost model's key of a CUDA device name ("NVIDIA H200" -> "h200"), None if it has none."""
    for needle, key in DEVICE_KEYS:
        if needle in name:
            return key
    return None


def _load(path: Path) -> list[dict]:
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read the rows ({exc})") from exc
    if not isinstance(rows, list) or (rows and not isinstance(rows[0], dict)):
        raise SystemExit(f"{path}: expected a JSON list of row objects")
    return rows


def predictions(cost_rows: list[dict], compile_rows: list[dict], device: str) -> dict[tuple[str, str, str], Predicted]:
    """(bench op, bench provider, bench pass) -> the prediction for `device` (a cost-model key): triton
    and eager as `msf bench` itself shows them on a CPU (`msf.bench.predicted`), compile and
    triton+compile from the torch.compile table, each op by `COST_OPS`' name and passes."""
    out: dict[tuple[str, str, str], Predicted] = {}
    for bench_op, pred in predictions_from_rows(cost_rows, device, COST_TABLE.name).items():
        pass_ = bench_pass(bench_op)
        band = (pred.model_version, pred.error_band)
        out[(bench_op, "triton", pass_)] = Predicted(pred.triton_s, f"cost-model.json: {pred.what}, fused", *band)
        out[(bench_op, "eager", pass_)] = Predicted(pred.eager_floor_s, f"cost-model.json: {pred.what}, eager floor",
                                                    *band)
    comp = {(r["op"], r["provider"], r["pass"]): r["value"] for r in compile_rows
            if r.get("device") == device and r.get("metric") == "predicted"}
    meta = _meta(compile_rows)
    for bench_op, target in COST_OPS.items():
        if isinstance(target, str) or target[0] == "(step)":
            continue
        op, passes = target
        if all((op, "torch.compile", p) in comp for p in passes):
            out[(bench_op, "compile", bench_pass(bench_op))] = Predicted(
                sum(comp[(op, "torch.compile", p)] for p in passes),
                f"compile-step.json {op} {'+'.join(passes)} torch.compile", *meta)
    for provider, (op, comp_provider) in COMPILED_STEP.items():
        value = comp.get((op, comp_provider, "fwd+bwd"))
        if value is not None:
            what = f"compile-step.json {op} {comp_provider} (fwd+bwd; the optimizer step is not in it)"
            out[("train_step", provider, "step")] = Predicted(value, what, *meta)
    return out


def _meta(rows: list[dict]) -> tuple[str, tuple[float, float]]:
    first = rows[0] if rows else {}
    band = first.get("error_band") or (float("nan"), float("nan"))
    return str(first.get("model_version", "?")), (float(band[0]), float(band[1]))


def compare(measured: list[dict], cost_rows: list[dict], compile_rows: list[dict]) -> tuple[list[dict], list[str]]:
    """(rows, notes): a row a measured (op, provider, pass) time with a prediction for its card;
    notes say what had none."""
    rows, notes, cache = [], [], {}
    for m in measured:
        if m.get("metric") != "time" or m.get("unit") != "ms":
            continue
        name = str(m.get("device", ""))
        key = device_key(name)
        if key is None:
            notes.append(f"{m['op']} {m['provider']}: no cost-model device for {name!r}")
            continue
        if key not in cache:
            cache[key] = predictions(cost_rows, compile_rows, key)
        provider = m["provider"]
        pred = cache[key].get((m["op"], provider, m["pass"]))
        if pred is None:
            notes.append(f"{m['op']} {provider} {m['pass']}: no prediction on {key}")
            continue
        measured_ms = float(m["p50"])
        ratio = pred.seconds * 1e3 / measured_ms
        lo, hi = pred.error_band
        rows.append({
            "op": m["op"], "provider": provider, "pass": m["pass"], "metric": "predicted_over_measured",
            "unit": "x", "size": m.get("size"), "p20": ratio, "p50": ratio, "p80": ratio,
            "measured_ms": measured_ms, "predicted_ms": pred.seconds * 1e3, "predicted_from": pred.what,
            "model_version": pred.model_version, "error_band": list(pred.error_band),
            "within_band": bool(lo <= ratio <= hi) if provider != "eager" else None,
            "device": name, "device_key": key, "versions": m.get("versions"), "date": m.get("date")})
    return rows, notes


def markdown(rows: list[dict], notes: list[str]) -> str:
    head = rows[0] if rows else {}
    lines = ["# Measured beside predicted", "",
             f"device: {head.get('device')}; measured {head.get('date')}; versions: {head.get('versions')}", "",
             "`python -m msf.bench.compare` on `msf bench` rows: the measured median against the committed "
             "predictions for the same card (cost model "
             f"{head.get('model_version', '?')}; its band, predicted ÷ measured on the calibration set: "
             f"{head.get('error_band')}). eager's figure is its byte floor, a bound rather than a prediction: "
             "its ratio shows how far eager runs above it.", "",
             "| op | provider | pass | measured ms | predicted ms | predicted ÷ measured | in band | predicted from |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        band = {True: "yes", False: "no", None: "(floor)"}[r["within_band"]]
        lines.append(f"| {r['op']} | {r['provider']} | {r['pass']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} "
                     f"| {r['p50']:.2f} | {band} | {r['predicted_from']} |")
    if notes:
        lines += ["", "Without a prediction:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msf.bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("measured", nargs="+", type=Path, help="msf bench JSON rows (bench-step.json, bench-ops.json)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for NAME.json and NAME.md")
    parser.add_argument("--name", default="measured-vs-predicted")
    parser.add_argument("--cost-table", type=Path, default=COST_TABLE)
    parser.add_argument("--compile-table", type=Path, default=COMPILE_TABLE)
    args = parser.parse_args(argv)
    measured = [r for path in args.measured for r in _load(path)]
    rows, notes = compare(measured, _load(args.cost_table), _load(args.compile_table))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = markdown(rows, notes)
    (args.out / f"{args.name}.md").write_text(text)
    print(text, end="")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
