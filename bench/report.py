"""Turn saved pytest-benchmark JSON into a Markdown table and PNG plots.

    pytest bench/ --benchmark-only --benchmark-json results.json
    python -m bench.report results.json [--out DIR]      # or: python bench/report.py results.json

Per group (rows differ only by implementation): each implementation's median, its speed-up over
the group's reference (``torch``, the eager ``gpt2_kernels.ref``; ``recompute`` for generation),
TFLOP/s and GB/s, and the % of the ceilings the suite measured on the same machine; a train-step row also
its speed-up over transformers' model (the peer with the same weights) and its MFU against the measured matmul
rate of its dtype, and ``(auto)`` marks the backend ``--backend auto`` runs. Plots:
attention time against T per implementation, and the fraction of the binding ceiling (the roofline
floor over the measured time) per op. Self-contained: imports nothing from the suite, so the
report can be made on any machine with Python (and matplotlib for the plots).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict

OP_ORDER = ("train_step", "generate", "attention", "mlp", "linear_cross_entropy", "layer_norm")
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
TRAIN_HEADER = ("| backend | median / step | tokens/s | speed-up vs torch | vs transformers | TFLOP/s "
                "| MFU (measured matmul) | peak memory | rounds |")
TRAIN_PEER = "transformers"  # the whole-model peer every train-step row is also compared with
GENERATE_HEADER = ("| path | median | new tokens/s | speed-up vs recompute | same tokens | vs transformers "
                   "| weight MB / token | % of bandwidth bound | rounds |")
OP_HEADER = ("| implementation | median | speed-up vs torch | TFLOP/s | GB/s | % peak FLOP/s | % peak BW "
             "| % of floor | rounds |")


def load(paths: list[str]) -> list[dict]:
    """All benchmark entries of the given pytest-benchmark JSON files."""
    entries = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key); "
                             "make one with pytest bench/ --benchmark-only --benchmark-json FILE")
        for b in data["benchmarks"]:
            b.setdefault("extra_info", {})
            b["_datetime"] = data.get("datetime")
            b["_machine"] = data.get("machine_info", {})
            entries.append(b)
    return entries


def _impl(b: dict) -> str:
    info = b["extra_info"]
    return str(info.get("impl") or b.get("param") or b["name"])


def _median(b: dict) -> float:
    return float(b["stats"]["median"])


def rates(b: dict) -> dict:
    """TFLOP/s, GB/s and % of the measured ceilings of one entry, from its median and extra_info."""
    info, t = b["extra_info"], _median(b)
    out = {}
    flops, nbytes = info.get("flops"), info.get("bytes")
    peak_tf, peak_bw = info.get("ceiling_tflops"), info.get("ceiling_gbps")
    if flops:
        out["tflops"] = flops / t / 1e12
        if peak_tf:
            out["pct_flops"] = 100.0 * out["tflops"] / peak_tf
    if nbytes:
        out["gbps"] = nbytes / t / 1e9
        if peak_bw:
            out["pct_bw"] = 100.0 * out["gbps"] / peak_bw
    if flops and nbytes and peak_tf and peak_bw:
        floor = max(flops / (peak_tf * 1e12), nbytes / (peak_bw * 1e9))
        out["pct_floor"] = 100.0 * floor / t
        out["bound"] = "compute" if flops / (peak_tf * 1e12) >= nbytes / (peak_bw * 1e9) else "memory"
    return out


def _group_key(group: str, entries: list[dict]):
    info = entries[0]["extra_info"]
    op = info.get("op", "")
    rank = OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER)
    mode = MODE_ORDER.index(info["mode"]) if info.get("mode") in MODE_ORDER else 0
    return (rank, str(info.get("dtype", "")), str(info.get("model", "")), int(info.get("T", 0) or 0),
            int(info.get("B", 0) or 0), mode, group)


def groups(entries: list[dict]) -> OrderedDict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for b in entries:
        by.setdefault(b.get("group") or b["name"], []).append(b)
    ordered = sorted(by.items(), key=lambda kv: _group_key(*kv))
    return OrderedDict((g, sorted(bs, key=_median)) for g, bs in ordered)


def _fmt_time(t: float) -> str:
    if t >= 1.0:
        return f"{t:.3g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"


def _fmt(x, spec=".3g", suffix="") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:{spec}}{suffix}"


def _ceilings(entries: list[dict]) -> list[str]:
    seen = OrderedDict()
    for b in entries:
        info = b["extra_info"]
        dev = info.get("device", "?")
        if info.get("ceiling_gbps"):
            seen[(dev, "copy")] = f"{info['ceiling_gbps']:.1f} GB/s ({info.get('ceiling_gbps_how', '')})"
        if info.get("ceiling_tflops") and info.get("dtype"):
            how = info.get("ceiling_tflops_how", "")
            seen[(dev, f"matmul {info['dtype']}", how)] = f"{info['ceiling_tflops']:.3g} TFLOP/s ({how})"
        if info.get("matmul_fp32_tflops"):
            how = info.get("matmul_fp32_how", "")
            seen[(dev, "matmul fp32", how)] = f"{info['matmul_fp32_tflops']:.3g} TFLOP/s ({how})"
    return [f"- {key[0]}, {key[1]}: {val}" for key, val in seen.items()]


def markdown(entries: list[dict]) -> str:
    """The Markdown report: measured ceilings, then one table per group."""
    lines = ["# Benchmark report", ""]
    dates = sorted({b["_datetime"] for b in entries if b.get("_datetime")})
    devices = sorted({b["extra_info"].get("device") for b in entries if b["extra_info"].get("device")})
    if dates:
        lines.append(f"Run: {', '.join(dates)}. Device: {'; '.join(devices) or 'unknown'}.")
    lines += ["", "Ceilings measured by the suite on this machine (all % below are of these):", ""]
    lines += _ceilings(entries) or ["- none recorded"]
    lines.append("")
    for group, bs in groups(entries).items():
        info0 = bs[0]["extra_info"]
        op = info0.get("op")
        base_name = info0.get("baseline")
        base = next((b for b in bs if _impl(b) == base_name), None)
        lines += [f"## {group}", ""]
        if op == "train_step":
            lines += [TRAIN_HEADER, "|---|---|---|---|---|---|---|---|---|"]
            peer = next((b for b in bs if _impl(b) == TRAIN_PEER), None)
        elif op == "generate":
            lines += [GENERATE_HEADER,
                      "|---|---|---|---|---|---|---|---|---|"]
        else:
            lines += [OP_HEADER, "|---|---|---|---|---|---|---|---|---|"]
        for b in bs:
            info, t = b["extra_info"], _median(b)
            speed = _fmt(_median(base) / t, ".2f", "x") if base is not None else "-"
            rounds = b["stats"].get("rounds", "-")
            if op == "train_step":
                tok = info.get("tokens")
                mfu = info.get("flops") / t / (info["ceiling_tflops"] * 1e12) if info.get("ceiling_tflops") else None
                mem = info.get("peak_mem_bytes")
                vs_peer = _fmt(_median(peer) / t, ".2f", "x") if peer is not None else "-"
                name = _impl(b) + (" (auto)" if info.get("auto_backend") else "")
                lines.append(f"| {name} | {_fmt_time(t)} | {_fmt(tok / t if tok else None, '.4g')} | {speed} "
                             f"| {vs_peer} | {_fmt(info.get('flops', 0) / t / 1e12, '.3g')} "
                             f"| {_fmt(100 * mfu if mfu else None, '.1f', '%')} "
                             f"| {_fmt(mem / 2**20 if mem else None, '.0f', ' MiB')} | {rounds} |")
            elif op == "generate":
                n = info.get("new_tokens")
                same = info.get("same_tokens_as_recompute")
                nbytes, frac = info.get("weight_bytes_per_token"), info.get("fraction_of_bound")
                lines.append(f"| {_impl(b)} | {_fmt_time(t)} | {_fmt(n / t if n else None, '.4g')} | {speed} "
                             f"| {'-' if same is None else ('yes' if same else 'NO')} "
                             f"| {_fmt(info.get('speedup_vs_transformers'), '.2f', 'x')} "
                             f"| {_fmt(nbytes / 1e6 if nbytes else None, '.1f')} "
                             f"| {_fmt(100 * frac if frac else None, '.0f', '%')} | {rounds} |")
            else:
                r = rates(b)
                lines.append(f"| {_impl(b)} | {_fmt_time(t)} | {speed} | {_fmt(r.get('tflops'), '.3g')} "
                             f"| {_fmt(r.get('gbps'), '.3g')} | {_fmt(r.get('pct_flops'), '.1f', '%')} "
                             f"| {_fmt(r.get('pct_bw'), '.1f', '%')} | {_fmt(r.get('pct_floor'), '.1f', '%')} "
                             f"| {rounds} |")
        lines.append("")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _save(fig, out_dir: str, name: str) -> str:
    """Write ``fig`` as out_dir/name (made safe) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, _safe(name))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(entries: list[dict], out_dir: str) -> list[str]:
    """Write the PNG plots into out_dir; returns their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"bench.report: matplotlib is not importable ({e}); no plots", file=sys.stderr)
        return []
    written = []

    # Attention: time against T, one line per implementation, one panel per mode.
    attn = [b for b in entries if b["extra_info"].get("op") == "attention"]
    by_fig: dict[tuple, list[dict]] = {}
    for b in attn:
        i = b["extra_info"]
        by_fig.setdefault((i.get("dtype"), i.get("model")), []).append(b)
    for (dtype, model), bs in sorted(by_fig.items(), key=lambda kv: str(kv[0])):
        if len({b["extra_info"].get("T") for b in bs}) < 2:
            continue
        modes = [m for m in MODE_ORDER if any(b["extra_info"].get("mode") == m for b in bs)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            lines: dict[str, list[tuple[int, float]]] = {}
            for b in bs:
                if b["extra_info"].get("mode") == mode:
                    lines.setdefault(_impl(b), []).append((int(b["extra_info"]["T"]), _median(b)))
            for impl, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (sequence length)")
            ax.set_ylabel("median time (ms)")
            ax.set_title(f"attention {mode}, {model} {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, f"attention_time_vs_T_{model}_{dtype}.png"))

    # Per op: % of the binding ceiling (roofline floor / measured time), bars per implementation.
    ops = [op for op in OP_ORDER if any(b["extra_info"].get("op") == op for b in entries)]
    for op in ops:
        gs = [(g, bs) for g, bs in groups(entries).items() if bs[0]["extra_info"].get("op") == op]
        gs = [(g, [b for b in bs if "pct_floor" in rates(b)]) for g, bs in gs]
        gs = [(g, bs) for g, bs in gs if bs]
        if not gs:
            continue
        impls = sorted({_impl(b) for _, bs in gs for b in bs})
        width = 0.8 / len(impls)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(gs) + 2), 4.5))
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for j, (_, bs) in enumerate(gs):
                for b in bs:
                    if _impl(b) == impl:
                        xs.append(j + k * width - 0.4 + width / 2)
                        ys.append(rates(b)["pct_floor"])
            ax.bar(xs, ys, width=width, label=impl)
        ax.set_xticks(range(len(gs)))
        ax.set_xticklabels([g.replace(f"{op} ", "") for g, _ in gs], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("% of the measured ceiling (floor / time)")
        ax.set_title(f"{op}: fraction of the binding ceiling")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, f"ceiling_fraction_{op}.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    parser.add_argument("--out", default=None, help="directory for bench_report.md and the PNGs (default: beside the "
                                                    "first JSON file)")
    parser.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    args = parser.parse_args(argv)
    try:
        entries = load(args.results)
    except (OSError, ValueError) as e:
        print(f"bench.report: {e}", file=sys.stderr)
        return 2
    if not entries:
        print("bench.report: the JSON holds no benchmarks (were they all skipped?)", file=sys.stderr)
        return 1
    out_dir = args.out or os.path.dirname(os.path.abspath(args.results[0]))
    os.makedirs(out_dir, exist_ok=True)
    md = markdown(entries)
    md_path = os.path.join(out_dir, "bench_report.md")
    with open(md_path, "w") as f:
        f.write(md + "\n")
    written = [] if args.no_plots else plots(entries, out_dir)
    print(md)
    print(f"\nwrote {md_path}" + "".join(f"\nwrote {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
