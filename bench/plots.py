"""Charts beside the benchmark tables, for a reader who would rather look than read.

- `plot_bench`: `msf bench`'s rows, per op the median time of each provider (eager, compile,
  triton, triton+compile, sdpa), log scale, fallbacks hatched.
- `plot_inference`: `msf.bench.cpu_inference`'s rows, images/s per variant, the default path marked.
- `plot_cost`: `python -m msf.profiling.cost`'s rows, per kernel its predicted time against its three
  floors (issue, bytes, tensor FLOPs), one panel per device.
Each takes the long-format rows the tables are made of and writes a PNG; nothing is recomputed.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

PROVIDER_ORDER = ("eager", "compile", "sdpa", "triton", "triton+compile")
PROVIDER_COLOURS = {"eager": "tab:grey", "compile": "tab:blue", "sdpa": "tab:purple", "triton": "tab:orange",
                    "triton+compile": "tab:red"}


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bench(rows: list[dict], path: Path, title: str) -> None:
    """Grouped horizontal bars: an op a group, a provider a bar, the median ms on a log axis."""
    timed = [r for r in rows if r["metric"] == "time"]
    ops = list(dict.fromkeys(r["op"] for r in timed))
    if not ops:
        return
    base = lambda provider: provider.removesuffix(" (eager fallback)")  # noqa: E731
    providers = [p for p in PROVIDER_ORDER if any(base(r["provider"]) == p for r in timed)]
    height = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(ops) * max(1, len(providers) / 2)))
    for j, provider in enumerate(providers):
        for i, op in enumerate(ops):
            hit = [r for r in timed if r["op"] == op and base(r["provider"]) == provider]
            if not hit:
                continue
            fallback = hit[0]["provider"] != provider
            y = i + (j - (len(providers) - 1) / 2) * height
            ax.barh(y, hit[0]["p50"], height, color=PROVIDER_COLOURS[provider], hatch="//" if fallback else None,
                    edgecolor="white" if fallback else None)
            ax.text(hit[0]["p50"], y, f" {hit[0]['p50']:.3g}" + (" (eager fallback)" if fallback else ""),
                    va="center", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=PROVIDER_COLOURS[p]) for p in providers]
    ax.legend(handles, providers, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_yticks(range(len(ops)), ops)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set(xlabel="median ms per call (log scale; shorter is faster)", title=title)
    ax.grid(axis="x", alpha=0.3, which="both")
    _save(fig, path)


def plot_inference(rows: list[dict], path: Path, title: str) -> None:
    """Bars of images/s per variant, one panel per pass, the default path in orange."""
    passes = list(dict.fromkeys(r["pass"] for r in rows if r["metric"] == "throughput"))
    fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 3.4), squeeze=False)
    for ax, pass_ in zip(axes[0], passes):
        tput = [r for r in rows if r["pass"] == pass_ and r["metric"] == "throughput"]
        names, values = [r["provider"] for r in tput], [r["p50"] for r in tput]
        ax.barh(names, values, color=["tab:orange" if r.get("default") else "tab:blue" for r in tput])
        for y, (v, r) in enumerate(zip(values, tput)):
            ax.text(v, y, f" {v:.1f}" + ("  default" if r.get("default") else ""), va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set(title=pass_, xlabel="images/s (median; longer is faster)")
        ax.set_xlim(0, max(values) * 1.35)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_cost(rows: list[dict], path: Path, title: str) -> None:
    """Per kernel launch (op, pass, kernel) a bar of its predicted time and a marker for each of
    its floors: issue (instructions at its occupancy), bytes (÷ bandwidth), tensor FLOPs (÷ peak).
    The bar is the largest floor, the marker that sits at its end names what bounds the kernel."""
    metrics = ("predicted", "t_issue", "t_bytes", "t_flops")
    devices = list(dict.fromkeys(r["device"] for r in rows if r["metric"] == "predicted"))
    if not devices:
        return
    # launches in capture order; the n-th launch of an (op, pass) is the same kernel on every
    # device (its config, in the kernel's label, may differ)
    per_device: dict[str, tuple[list[str], list[dict[str, float]]]] = {}
    for device in devices:  # each device its own launches: their number can differ with the configs
        launches: list[dict[str, float]] = []
        names: list[str] = []
        for r in rows:
            if r["device"] != device or r["kernel"].startswith("("):
                continue
            if r["metric"] == "grid":  # the first row of every launch
                launches.append({})
                names.append(f"{r['op']} {r['pass']} {r['kernel'].split('[')[0]}")
            elif r["metric"] in metrics and launches:
                launches[-1][r["metric"]] = r["value"] * 1e6
        per_device[device] = names, launches
    most = max(len(names) for names, _ in per_device.values())
    fig, axes = plt.subplots(1, len(devices), figsize=(9 * len(devices), 1.2 + 0.2 * most), squeeze=False)
    styles = (("t_issue", "o", "tab:red", "issue floor"), ("t_bytes", "s", "tab:green", "bytes floor"),
              ("t_flops", "^", "tab:purple", "tensor-FLOPs floor"))
    for ax, device in zip(axes[0], devices):
        names, launches = per_device[device]
        ys = range(len(launches))
        ax.barh(ys, [launch.get("predicted", 0.0) for launch in launches], color="tab:blue", alpha=0.35)
        for metric, marker, colour, _ in styles:
            ax.scatter([launch.get(metric, float("nan")) for launch in launches], ys, marker=marker, s=14,
                       color=colour, zorder=3)
        ax.set_yticks(ys, names, fontsize=6)
        ax.set_ylim(most - 0.5, -0.5)
        ax.set_xscale("log")
        ax.set(title=device.upper(), xlabel="µs (log scale)")
        ax.grid(axis="x", alpha=0.3, which="both")
    handles = [plt.Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.35)] + \
              [plt.Line2D([], [], marker=m, color=c, ls="") for _, m, c, _ in styles]
    fig.legend(handles, ["predicted (the largest floor)"] + [label for *_, label in styles], loc="lower center",
               ncol=4, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compile(rows: list[dict], path: Path, title: str) -> None:
    """`python -m msf.profiling.inductor`'s rows: per device, the training step's eager floor, its
    torch.compile prediction (with the measured range the model's band allows), the triton step and
    triton + torch.compile, one group per eager variant (paper order, classifier at H/4)."""
    steps = [r for r in rows if r["op"].startswith("step (") and r["pass"] == "fwd+bwd" and r["unit"] == "s"
             and r["metric"] in ("floor", "predicted")]
    devices = list(dict.fromkeys(r["device"] for r in steps))
    if not devices:
        return
    bars = (("eager floor", "eager", "floor", "tab:grey"), ("torch.compile", "torch.compile", "predicted", "tab:blue"),
            ("triton (eager rest at its floor)", "triton", "predicted", "tab:orange"),
            ("triton + torch.compile", "triton+torch.compile", "predicted", "tab:red"))
    fig, axes = plt.subplots(1, len(devices), figsize=(5.5 * len(devices), 4), squeeze=False)
    for ax, device in zip(axes[0], devices):
        mine = [r for r in steps if r["device"] == device]
        variants = [v for v in ("paper", "h4") if any(r["op"] == f"step ({v})" for r in mine)]
        width = 0.8 / len(bars)
        for i, (label, provider, metric, colour) in enumerate(bars):
            values, errors = [], [[], []]
            for v in variants:
                op = "step (triton)" if provider.startswith("triton") else f"step ({v})"
                value = next((r["value"] for r in mine if r["op"] == op and r["provider"] == provider
                              and r["metric"] == metric), None)
                values.append((value or 0.0) * 1e3)
                band = next((r["error_band"] for r in mine if r["op"] == op and r["provider"] == provider), None)
                lo, hi = (value * 1e3 / band[1], value * 1e3 / band[0]) if value and band and metric == "predicted" \
                    else (values[-1], values[-1])
                errors[0].append(values[-1] - lo)
                errors[1].append(hi - values[-1])
            xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(variants))]
            ax.bar(xs, values, width, color=colour, label=label, yerr=errors, capsize=3, error_kw={"alpha": 0.5})
        ax.set_xticks(range(len(variants)), ["paper order" if v == "paper" else "classifier at H/4" for v in variants])
        ax.set(title=device.upper(), ylabel="ms per training step (B = 32, 512²)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
