#!/usr/bin/env python3
"""The reference for the HTTP benchmark: ExLlamaV2DynamicGenerator driven directly, no server.

Prints one JSON object: decode tok/s (median of runs) and time to first token (p50) for the same
prompt, sampler and settings the server uses.
Usage: python scripts/gpu/bench_direct.py MODEL_DIR --prompt TEXT [--tokens 256] [--runs 5] [--ttft-runs 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ttft-runs", type=int, default=20)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--ban", type=int, nargs="*", default=[], help="token ids biased by -100 (EOS)")
    parser.add_argument("--serve", action="store_true",
                        help="after loading, answer JSON commands on stdin (for interleaved measurements)")
    args = parser.parse_args()

    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    from app.engine.backends.exllamav2_setup import MAX_CHUNK, flash_attn_ok

    paged = flash_attn_ok()
    config = ExLlamaV2Config(args.model_dir)
    config.max_seq_len = args.context
    config.max_input_len = min(MAX_CHUNK, args.context)
    config.max_attention_size = config.max_input_len ** 2
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=args.context, lazy=True)
    model.load_autosplit(cache)
    tokenizer = ExLlamaV2Tokenizer(config)
    gen = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, max_batch_size=1,
                                    max_seq_len=args.context, max_chunk_size=min(MAX_CHUNK, args.context),
                                    paged=paged)
    ids = tokenizer.encode(args.prompt, add_bos=True, encode_special_tokens=True)

    def settings() -> ExLlamaV2Sampler.Settings:
        s = ExLlamaV2Sampler.Settings()
        s.temperature, s.top_k, s.top_p, s.min_p, s.typical = 0.8, 40, 0.9, 0.0, 0.0
        s.token_repetition_penalty = 1.0
        if args.ban:
            bias = torch.zeros((config.vocab_size,), dtype=torch.float)
            for t in args.ban:
                bias[t] = -100
            s.token_bias = bias
        return s

    first_text: list[float] = []
    #: per run: steps after the first token, the time inside iterate() over them, their span
    decode_times: list[tuple[int, float, float]] = []

    def run(max_new: int, seed: int) -> tuple[float, list[float], int]:
        job = ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=max_new, gen_settings=settings(), seed=seed,
                                  stop_conditions=[], decode_special_tokens=False)
        t0 = time.perf_counter()
        gen.enqueue(job)
        stamps: list[float] = []
        tokens = 0
        text_at = None
        steps, in_steps, first_end, last_end = 0, 0.0, None, None
        while gen.num_remaining_jobs():
            t_step = time.perf_counter()
            results = gen.iterate()
            t_end = time.perf_counter()
            if first_end is None:
                if tokens or any(r.get("token_ids") is not None for r in results):
                    first_end = last_end = t_end
            else:
                steps, in_steps, last_end = steps + 1, in_steps + t_end - t_step, t_end
            for r in results:
                if r.get("stage") == "streaming" and r.get("token_ids") is not None:
                    n = int(r["token_ids"].shape[-1])
                    if n:
                        now = time.perf_counter()
                        stamps.extend([now] * n)
                        tokens += n
                    if text_at is None and r.get("text"):
                        text_at = time.perf_counter()
        first_text.append((text_at or time.perf_counter()) - t0)
        decode_times.append((steps, in_steps, (last_end or 0.0) - (first_end or 0.0)))
        return t0, stamps, tokens

    for i in range(3):
        run(32, i)
    run(args.tokens, 99)
    torch.cuda.synchronize()
    if args.serve:
        print("READY", flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "decode":
                _, stamps, tokens = run(cmd["tokens"], cmd["seed"])
                steps, in_steps, span = decode_times[-1]
                print(json.dumps({"rate": (tokens - 1) / (stamps[-1] - stamps[0]), "steps": steps,
                                  "in_steps_s": in_steps, "span_s": span}), flush=True)
            elif cmd["op"] == "ttft":
                first_text.clear()
                t0, stamps, _ = run(4, cmd["seed"])
                print(json.dumps({"ttft": stamps[0] - t0, "first_text": first_text[-1]}), flush=True)
            else:
                break
        return 0
    rates = []
    for i in range(args.runs):
        _, stamps, tokens = run(args.tokens, 100 + i)
        rates.append((tokens - 1) / (stamps[-1] - stamps[0]))
    ttfts = []
    first_text.clear()
    for i in range(args.ttft_runs):
        t0, stamps, _ = run(4, 200 + i)  # same request as the HTTP side: 4 tokens, seeds 200..
        ttfts.append(stamps[0] - t0)
    def greedy_ids() -> list[int]:
        g = ExLlamaV2Sampler.Settings.greedy()
        job = ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=64, gen_settings=g, stop_conditions=[])
        gen.enqueue(job)
        out: list[int] = []
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if r.get("stage") == "streaming" and r.get("token_ids") is not None:
                    out.extend(int(x) for x in r["token_ids"][0].tolist())
        return out

    repeatable = greedy_ids() == greedy_ids()
    print(json.dumps({"paged": paged, "greedy_repeatable": repeatable, "prompt_tokens": int(ids.shape[-1]), "decode_tok_s": statistics.median(rates),
                      "decode_tok_s_runs": rates, "decode_tok_s_max": max(rates), "ttft_p50_s": statistics.median(ttfts),
                      "first_text_p50_s": statistics.median(first_text),
                      "ttft_runs_s": ttfts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
