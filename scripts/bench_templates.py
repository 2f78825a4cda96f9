#!/usr/bin/env python3
"""Benchmark: build a 100-message prompt with Ollama templates; prints microseconds per message.

Goal (issue: Ollama templates): well under 1 ms per message.
Usage: python scripts/bench_templates.py [--messages 100] [--repeat 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from app.engine.prompting.gotemplate import GoTemplate
from app.engine.prompting.ollama import render_ollama

CONF = Path(__file__).resolve().parent.parent.parent / "shared" / "conformance" / "ollama-templates"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    cases = json.loads((CONF / "named-templates.json").read_text())["cases"]
    templates = {c["template_name"]: c["template"] for c in cases}
    legacy = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] {{ .Response }}"
    templates["legacy-mistral"] = legacy
    msgs = [{"role": "system", "content": "You are helpful."}]
    for i in range(args.messages - 1):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} " * 8})
    print(f"{'template':22} {'median ms':>10} {'us/message':>11}")
    worst = 0.0
    for name, src in sorted(templates.items()):
        tmpl = GoTemplate(src)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            render_ollama(tmpl, msgs)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        per = med / len(msgs) * 1e6
        worst = max(worst, per)
        print(f"{name:22} {med * 1e3:10.3f} {per:11.1f}")
    print(f"worst: {worst:.1f} us per message ({'OK' if worst < 1000 else 'TOO SLOW'}: goal < 1000 us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
