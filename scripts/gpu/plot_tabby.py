#!/usr/bin/env python3
"""Bar charts of this server against TabbyAPI from tabby_stage.py's JSON files (their medians): output
tok/s of chat at 1 and 32 streams, and TTFT p99 of chat at 32 streams, of the autocomplete burst and of
one editor under 32 chats.
Usage: python scripts/gpu/plot_tabby.py OUT.png LABEL=FILE.json [LABEL=FILE.json ...] (needs matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = (("chat", "1", "output_tok_s", "chat, 1 stream: output tok/s"),
          ("chat", "32", "output_tok_s", "chat, 32 streams: output tok/s"),
          ("chat", "32", "ttft_p99_ms", "chat, 32 streams: TTFT p99 (ms)"),
          ("autocomplete", "8", "ttft_p99_ms", "autocomplete burst, 8 editors: TTFT p99 (ms)"),
          ("mixed", "32", "ttft_p99_ms", "an editor under 32 chats: TTFT p99 (ms)"))


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, pairs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    runs = [(label, json.loads(Path(path).read_text())["medians"]) for label, path in pairs]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6))
    width = 0.38
    for ax, (workload, level, metric, title) in zip(axes, PANELS):
        xs = range(len(runs))
        for k, side in enumerate(("ours", "tabby")):
            values = [med.get(side, {}).get(workload, {}).get(level, {}).get(metric) or 0 for _, med in runs]
            ax.bar([x + (k - 0.5) * width for x in xs], values, width,
                   label="this server" if side == "ours" else "TabbyAPI")
        ax.set_xticks(list(xs), [label for label, _ in runs])
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
