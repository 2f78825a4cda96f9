#!/usr/bin/env python3
"""Plot the paged stage of GPU reports: aggregate tok/s and TTFT p99 against concurrency, server vs direct.

Needs matplotlib (not a dependency of the app: `pip install matplotlib` in any environment).
Usage: python scripts/gpu/plot_paged.py docs/data/gpu-report-h200-*.json --out docs/paged-concurrency.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in args.reports:
        data = json.loads(path.read_text())
        commit = path.stem.removeprefix("gpu-report-h200-")
        for model, figures in data.get("paged", {}).items():
            levels = figures.get("levels")
            if not levels:
                continue
            xs = sorted(int(n) for n in levels)
            for side, style in (("server", "-o"), ("direct", "--s")):
                label = f"{model} {side} ({commit})"
                ax_tps.plot(xs, [levels[str(n)][side]["agg_tok_s"] for n in xs], style, label=label)
                ax_ttft.plot(xs, [levels[str(n)][side]["ttft_p99_ms"] for n in xs], style, label=label)
    for ax, title, unit in ((ax_tps, "Aggregate decode", "output tok/s (median of runs)"),
                            (ax_ttft, "Time to first token, p99", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 8, 32], ["1", "8", "32"])
        ax.set_xlabel("concurrent streams (256 tokens each)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_tps.legend(fontsize=7)
    fig.suptitle("Continuous batching on an H200: the server through HTTP vs the library's direct generator")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
