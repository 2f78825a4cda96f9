#!/usr/bin/env python3
"""Where the server's time to first token goes, measured in one process on the GPU (no HTTP).

1. Tokenizing: exllamav2's tokenizer vs the folder's tokenizer.json through `tokenizers` (same ids?
   time per call).
2. First token: the direct ExLlamaV2DynamicGenerator loop vs our backend's submit + step, in turns,
   each split into "making the job" and "enqueue -> first text".
3. The engine's request preparation (settings, prompt, tokens, lease), with a cProfile of both the
   backend path and the preparation.
Prints one JSON object. Usage: python scripts/gpu/profile_first_token.py MODEL_DIR --prompt TEXT
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))


def top(profile: cProfile.Profile, n: int = 25) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue()[-6000:]


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    import torch
    from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

    from app.engine.backends.exllamav2_backend import ExLlamaV2Backend
    from app.engine.events import BackendJob, SamplingParams
    from app.engine.catalog.tokenizer import FolderTokenizer

    result: dict = {}
    backend = ExLlamaV2Backend(args.model_dir, context_length=2048, max_batch=1)
    backend.load(lambda f, m: None, threading.Event())
    exl_tok = backend._tokenizer  # noqa: SLF001 - a diagnostic compares the library's own tokenizer
    fast = FolderTokenizer(args.model_dir)

    # 1. tokenizing
    texts = [args.prompt, "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
             "héllo wörld ✓ 你好 🙂", "  two leading spaces\n\n\ttab", "</s>word<s>", "", " "]

    def exl_ids(text: str, add_bos: bool) -> list[int]:
        return [int(x) for x in exl_tok.encode(text, add_bos=add_bos, encode_special_tokens=True)[0].tolist()]

    same = {t: (exl_ids(t, b) == backend.encode(t, add_bos=b)) for t in texts for b in (False, True)}
    result["tokenizer_backend_equals_exllamav2"] = all(same.values())
    result["tokenizer_mismatches"] = [t for t, ok in same.items() if not ok]
    for name, fn in (("exllamav2", lambda: exl_ids(args.prompt, True)),
                     ("backend", lambda: backend.encode(args.prompt, add_bos=True)),
                     ("tokenizers", lambda: fast.encode(args.prompt, add_bos=True))):
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[f"encode_{name}_p50_ms"] = p50_ms(times)

    # 2. first token: direct loop vs backend, in turns
    gen = backend._generator  # noqa: SLF001
    ids = backend.encode(args.prompt, add_bos=True)
    bias = {2: -100.0, 5: -100.0}
    sampling = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, typical=1.0,
                              repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                              logit_bias=bias, seed=1)

    def direct_once(seed: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        s = ExLlamaV2Sampler.Settings()
        s.temperature, s.top_k, s.top_p, s.min_p, s.typical = 0.8, 40, 0.9, 0.0, 0.0
        s.token_repetition_penalty = 1.0
        b = torch.zeros((backend.vocab_size,), dtype=torch.float)
        for t, v in bias.items():
            b[t] = v
        s.token_bias = b
        job = ExLlamaV2DynamicJob(input_ids=torch.tensor([ids]), max_new_tokens=4, gen_settings=s, seed=seed,
                                  stop_conditions=[], decode_special_tokens=False)
        t1 = time.perf_counter()
        gen.enqueue(job)
        first = None
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if first is None and r.get("stage") == "streaming" and r.get("text"):
                    first = time.perf_counter()
        return t1 - t0, (first or time.perf_counter()) - t1

    def backend_once(seed: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        job = BackendJob(prompt_ids=list(ids), max_new_tokens=4, sampling=SamplingParams(**{**sampling.__dict__,
                         "seed": seed}), stop_strings=[], stop_token_ids=backend.eos_token_ids(), stream=True)
        backend.submit(job)
        t1 = time.perf_counter()
        first = None
        while backend.has_work():
            for ev in backend.step():
                if first is None and ev.text:
                    first = time.perf_counter()
        return t1 - t0, (first or time.perf_counter()) - t1

    for i in range(3):
        direct_once(i)
        backend_once(i)
    d_make, d_first, b_make, b_first = [], [], [], []
    for i in range(args.runs):
        a, b = direct_once(100 + i)
        d_make.append(a)
        d_first.append(b)
        a, b = backend_once(100 + i)
        b_make.append(a)
        b_first.append(b)
    result["first_token"] = {"direct_make_job_p50_ms": p50_ms(d_make), "direct_enqueue_to_text_p50_ms": p50_ms(d_first),
                             "backend_submit_p50_ms": p50_ms(b_make), "backend_step_to_text_p50_ms": p50_ms(b_first)}
    prof = cProfile.Profile()
    prof.enable()
    for i in range(args.runs):
        backend_once(200 + i)
    prof.disable()
    result["profile_backend_first_token"] = top(prof)

    # 3. the engine's preparation of a request (registry, settings, tokens, lease), no HTTP
    from app.engine.facade import CompletionRequest, Engine
    from app.engine.catalog.model_folder import inspect_model_folder
    from app.engine.catalog.registry import ModelEntry, Registry
    from app.engine.settings.schema import Settings

    async def prepare() -> None:
        registry = Registry(Path(tempfile.mkdtemp()) / "models.json")
        info = inspect_model_folder(Path(args.model_dir))
        registry.add("m", ModelEntry(model_dir=info.path, settings=Settings(context_length=2048, batch_size=1),
                                     info=info.to_dict()))
        engine = Engine(registry)
        await engine.load("m")

        def request(seed: int) -> CompletionRequest:
            return CompletionRequest(model="m", prompt=args.prompt, settings=Settings(
                temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, max_tokens=4, seed=seed), suffix=None, stream=True,
                logit_bias=bias)

        times = []
        for i in range(200):
            handle = await engine.submit_completion(request(i))
            times.append(handle.prepare_s)
            handle.cancel()
        result["engine_prepare_p50_ms"] = p50_ms(times[20:])
        prof = cProfile.Profile()
        prof.enable()
        for i in range(100):
            handle = await engine.submit_completion(request(i))
            handle.cancel()
        prof.disable()
        result["profile_engine_prepare"] = top(prof)
        await engine.close()

    asyncio.run(prepare())
    backend.unload()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
