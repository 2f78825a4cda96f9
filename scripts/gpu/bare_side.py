"""The bare generator loop as a third side of tabby_stage.py's runs: the library's own generator in a
process of its own (scripts/gpu/paged_direct.py for exllamav2, exl3_direct.py for exllamav3), fed the
chat workload's shape (prompts of fresh words of about bench_serving's --chat-prompt tokens, --chat-output
tokens each, EOS banned) with all N jobs enqueued at once, reported in bench_serving's metric names so that
its row sits beside the two servers'. No HTTP, no template, no closed loop: it is the ceiling the servers
are measured against."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_serving import CHAT_OUTPUT, CHAT_PROMPT, WORDS  # noqa: E402
from paged_clients import p  # noqa: E402


def _ms_percentile(values: list[float], q: float) -> float | None:
    got = p(values, q)  # the paged stage's percentile, NaN (no first token) left out
    return None if got != got else round(1e3 * got, 2)


class BareGenerator:
    """The direct loop's process, started once and fed batches (the protocol of paged_direct.py)."""

    def __init__(self, model: Path, backend: str, context: int, batch: int, ban: list[int]) -> None:
        script = HERE / ("paged_direct.py" if backend == "exllamav2" else "exl3_direct.py")
        self.proc = subprocess.Popen([sys.executable, str(script), str(model), "--context", str(context), "--batch",
                                      str(batch), "--ban", *map(str, ban)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the bare generator ({script.name}) exited with {self.proc.wait()}")
        self.ready = json.loads(line)

    def batch(self, prompts: list[str], tokens: int, seed: int) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": "batch", "prompts": prompts, "tokens": tokens, "seed": seed}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]

    def chat_level(self, n: int, words_per_token: float, repeats: int, seed: int, prompt_tokens: int = CHAT_PROMPT,
                   output: int = CHAT_OUTPUT) -> dict[str, Any]:
        """``repeats`` batches of ``n`` jobs (bench_serving's chat sizes); each metric the median over the batches."""
        rng = random.Random(seed)
        runs = []
        for r in range(repeats):
            prompts = [" ".join(rng.choice(WORDS) for _ in range(max(1, int(prompt_tokens * words_per_token))))
                       for _ in range(n)]
            runs.append(self.batch(prompts, output, seed + 100 * r))
        rows = [{"output_tok_s": round(x["agg_tok_s"], 1), "requests_per_s": round(x["n"] / x["wall_s"], 3),
                 "ttft_p50_ms": _ms_percentile(x["ttft_s"], 0.5), "ttft_p99_ms": _ms_percentile(x["ttft_s"], 0.99),
                 "itl_p50_ms": round(1e3 * x["itl_p50_s"], 2), "itl_p99_ms": round(1e3 * x["itl_p99_s"], 2),
                 "errors": 0, "dropped_streams": 0} for x in runs]
        out: dict[str, Any] = {}
        for k in rows[0]:
            vals = [r[k] for r in rows if r[k] is not None]
            out[k] = statistics.median(vals) if vals else None
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
