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
