"""ExLlamaV2 backend: ExLlamaV2DynamicGenerator behind the backend contract.

Paged mode (continuous batching, prefix reuse) needs flash-attn >= 2.5.7; without it the generator
runs unpaged, one job at a time, and :attr:`ExLlamaV2Backend.batching` says ``"single"``.
exllamav2 and torch are imported only when a model loads. The first import JIT-builds exllamav2's
CUDA extension (minutes); that is reported as a load step of its own.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

from app.engine.backends.contract import BackendBase, BackendLoadError, LoadCancelled, ProgressFn
from app.engine.backends.exllamav2_setup import announce_extension_build, cache_sizes, flash_attn_ok
from app.engine.backends.gpu_common import (
    agreeing_fast_tokenizer, check_split, cuda_memory, load_failures_readable, unload_model)
from app.engine.backends.gpu_jobs import GeneratorJobs
from app.engine.backends.slots import SHORT_SLOTS, short_limit
from app.engine.events import BackendJob, SamplingParams, StepEvent, token_logprobs
from app.engine.settings.schema import parse_gpu_split
from app.engine.catalog.tokenizer import EncoderSpec, FolderTokenizer, with_bos

log = logging.getLogger(__name__)

CACHE_CLASSES = {"FP16": "ExLlamaV2Cache", "Q8": "ExLlamaV2Cache_Q8", "Q6": "ExLlamaV2Cache_Q6",
                 "Q4": "ExLlamaV2Cache_Q4"}


class ExLlamaV2Backend(GeneratorJobs, BackendBase):
    name = "exllamav2"
    host_threads = 1  # see model_process.child.limit_host_threads

    def __init__(self, model_dir: str, *, context_length: int, max_batch: int, cache_type: str = "FP16",
                 gpu_split: str | None = "auto", rope_scale: float = 1.0, rope_alpha: float = 1.0) -> None:
        self.model_dir = model_dir
        self.context_length = context_length
        self.max_batch = max_batch
        self.cache_type = cache_type
        self.gpu_split = gpu_split or "auto"
        self.rope_scale = rope_scale
        self.rope_alpha = rope_alpha
        self.paged = False
        self.batching = "single"
        self.notice = ""
        self.vocab_size: int | None = None
        self.last_step_batch = 0
        self._model: Any = None
        self._cache: Any = None
        self._tokenizer: Any = None
        self._fast_tokenizer: FolderTokenizer | None = None
        self._generator: Any = None
        self._init_jobs()
        self._eos: set[int] = set()

    @property
    def batch_slots(self) -> int:
        """The generator's batch: paged, ``max_batch`` jobs and the slots kept for short ones (the cache
        holds ``max_batch`` contexts and the short slots' pages); unpaged, one job."""
        return self.max_batch + SHORT_SLOTS if self.paged else 1

    # -- lifecycle -------------------------------------------------------------------
    @staticmethod
    def warm_up(progress: ProgressFn) -> None:
        """The imports a load needs (seconds; the first time ever also the CUDA extension's build)."""
        progress(0.0, "importing torch")
        import torch

        if not torch.cuda.is_available():
            return  # load() says so readably
        if not announce_extension_build(progress):
            progress(0.0, "importing exllamav2")
        import exllamav2  # noqa: F401
        from exllamav2.generator import ExLlamaV2DynamicGenerator  # noqa: F401

    def load(self, progress: ProgressFn, cancel: threading.Event) -> None:
        torch, exl = self._import_library(progress)
        if cancel.is_set():
            raise LoadCancelled("load cancelled")
        self.paged = flash_attn_ok()
        # paged: max_batch + SHORT_SLOTS jobs, the short ones within the cache's extra pages
        self._init_jobs(self.max_batch if self.paged else None, short_limit(self.context_length))
        self.batching = "continuous" if self.paged else "single"
        if not self.paged:
            self.notice = ("flash-attn >= 2.5.7 is not installed: exllamav2 runs unpaged, one request at a time "
                           "(requests queue); install flash-attn for continuous batching")
            log.warning(self.notice)
        progress(0.02, "reading model config")
        config, model = self._read_model(exl)
        self._model = model
        with load_failures_readable(self, torch):
            self._load_weights(exl, config, model, progress, cancel)
        self.vocab_size = int(config.vocab_size)
        eos = config.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        if self._tokenizer.eos_token_id is not None:
            self._eos.add(int(self._tokenizer.eos_token_id))
        progress(1.0, "loaded")

    def _import_library(self, progress: ProgressFn) -> tuple[Any, Any]:
        """torch and exllamav2, with readable errors for a missing GPU, library or extension build."""
        try:
            import torch
        except ImportError:
            raise BackendLoadError("the exllamav2 backend needs torch with CUDA; install the 'exllamav2' extra") from None
        if not torch.cuda.is_available():
            raise BackendLoadError("the exllamav2 backend needs an NVIDIA GPU with CUDA; torch sees none")
        announce_extension_build(progress)  # when not warmed up first (the backend used in this process)
        try:
            import exllamav2 as exl
        except ImportError as exc:
            raise BackendLoadError(f"exllamav2 is not installed or failed to build its CUDA extension: {exc}") from None
        except Exception as exc:  # the JIT build raises RuntimeError/subprocess errors
            raise BackendLoadError(f"building exllamav2's CUDA extension failed: {exc} (see README: CUDA build)") from None
        return torch, exl

    def _read_model(self, exl: Any) -> tuple[Any, Any]:
        try:
            config = exl.ExLlamaV2Config(self.model_dir)
            config.max_seq_len = self.context_length
            if self.rope_scale != 1.0:
                config.scale_pos_emb = self.rope_scale
            if self.rope_alpha != 1.0:
                config.scale_alpha_value = self.rope_alpha
            sizes = cache_sizes(self.context_length, self.max_batch, self.paged)
            config.max_input_len = sizes.chunk
            config.max_attention_size = config.max_input_len ** 2
            config.max_batch_size = sizes.config_batch
            return config, exl.ExLlamaV2(config)
        except Exception as exc:
            raise BackendLoadError(f"cannot read the model in {self.model_dir}: {exc}") from None

    def _load_weights(self, exl: Any, config: Any, model: Any, progress: ProgressFn, cancel: threading.Event) -> None:
        """Weights, cache, tokenizer and generator; the caller turns failures into readable errors."""
        cache_cls = getattr(exl, CACHE_CLASSES.get(self.cache_type, "ExLlamaV2Cache"))
        cache_len = cache_sizes(self.context_length, self.max_batch, self.paged).cache_tokens

        def callback(done: int, total: int) -> None:
            if cancel.is_set():
                raise LoadCancelled("load cancelled")
            progress(0.05 + 0.9 * done / max(total, 1), f"loading weights ({done}/{total} modules)")

        if self.gpu_split == "auto":
            self._cache = cache_cls(model, max_seq_len=cache_len, lazy=True)
            model.load_autosplit(self._cache, callback=callback)
        else:
            split = parse_gpu_split(self.gpu_split)
            check_split(split)
            model.load(gpu_split=split, callback=callback)
            self._cache = cache_cls(model, max_seq_len=cache_len)
        progress(0.96, "loading tokenizer")
        self._tokenizer = exl.ExLlamaV2Tokenizer(config)
        self._fast_tokenizer = self._agreeing_fast_tokenizer()
        self._make_generator()

    def out_of_memory_message(self) -> str:
        if self.paged:  # the cache holds context x batch tokens
            size, lower = f"context {self.context_length}, batch {self.max_batch}", "context_length or batch_size"
        else:  # unpaged: one job's context, whatever the batch size says
            size, lower = f"context {self.context_length} (unpaged: one job at a time)", "context_length"
        return (f"out of GPU memory loading {self.model_dir} with {size}, cache {self.cache_type}: lower "
                f"{lower}, use a Q4/Q8 cache, or set gpu_split")

    def _agreeing_fast_tokenizer(self) -> FolderTokenizer | None:
        """tokenizer.json when it agrees with exllamav2's tokenizer, whose encode splits on special tokens
        in Python and builds tensors: on a short prompt it costs more than the rest of a request's
        preparation."""
        return agreeing_fast_tokenizer(self.model_dir, lambda text: [
            int(x) for x in self._tokenizer.encode(text, encode_special_tokens=True)[0].tolist()], "exllamav2")

    def _make_generator(self) -> None:
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        self._generator = ExLlamaV2DynamicGenerator(
            model=self._model, cache=self._cache, tokenizer=self._tokenizer,
            max_batch_size=self.batch_slots, max_seq_len=self.context_length,
            max_chunk_size=cache_sizes(self.context_length, self.max_batch, self.paged).chunk, paged=self.paged)

    def unload(self) -> None:
        self._forget_jobs()
        self._generator = None
        self._cache = None
        self._tokenizer = None
        self._fast_tokenizer = None
        unload_model(self)

    def memory_used(self) -> dict[str, int]:
        return cuda_memory()

    # -- tokens -----------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        spec = self.encoder_spec()
        if spec is not None and self._fast_tokenizer is not None:
            return with_bos(self._fast_tokenizer.encode_plain(text), spec.bos_id, add_bos)
        ids = self._tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=True)
        return [int(x) for x in ids[0].tolist()]

    def encoder_spec(self) -> EncoderSpec | None:
        """Set when tokenizer.json encodes like exllamav2's tokenizer (checked at load)."""
        if self._fast_tokenizer is None:
            return None
        bos = self._tokenizer.bos_token_id
        return EncoderSpec(self.model_dir, None if bos is None else int(bos))

    def decode(self, ids: Sequence[int]) -> str:
        import torch

        return self._tokenizer.decode(torch.tensor([list(ids)]), decode_special_tokens=False)[0]

    def eos_token_ids(self) -> set[int]:
        return set(self._eos)

    # -- jobs -------------------------------------------------------------------------
    def gen_settings(self, params: SamplingParams) -> Any:
        import torch
        from exllamav2.generator import ExLlamaV2Sampler

        if params.temperature <= 0:
            s = ExLlamaV2Sampler.Settings.greedy()
        else:
            s = ExLlamaV2Sampler.Settings()
            s.temperature = params.temperature
            s.top_k = params.top_k
            s.top_p = params.top_p if params.top_p < 1.0 else 0.0
            s.min_p = params.min_p
            s.typical = params.typical if params.typical < 1.0 else 0.0
        s.token_repetition_penalty = params.repetition_penalty
        s.token_presence_penalty = params.presence_penalty
        s.token_frequency_penalty = params.frequency_penalty
        if params.logit_bias and self.vocab_size:  # one indexed write (per token: 5 us each on the GPU host)
            bias = torch.zeros((self.vocab_size,), dtype=torch.float)
            bias[torch.tensor(list(params.logit_bias), dtype=torch.long)] = torch.tensor(
                list(params.logit_bias.values()), dtype=torch.float)
            s.token_bias = bias
        return s

    def _enqueue(self, job: BackendJob, filters: list[Any]) -> None:
        import torch
        from exllamav2.generator import ExLlamaV2DynamicJob

        stops: list[Any] = [*job.stop_token_ids, *job.stop_strings]
        gen_job = ExLlamaV2DynamicJob(
            input_ids=torch.tensor([job.prompt_ids], dtype=torch.long), max_new_tokens=job.max_new_tokens,
            gen_settings=self.gen_settings(job.sampling), seed=job.sampling.seed, stop_conditions=stops,
            identifier=job.job_id, decode_special_tokens=False, filters=filters,
            return_top_tokens=job.logprobs or 0, return_probs=job.logprobs is not None)
        self._jobs[job.job_id] = gen_job
        self._generator.enqueue(gen_job)

    def _filters(self, job: BackendJob, constraint: Any) -> list[Any]:
        from app.engine.constraints.exllamav2_filter import grammar_filter

        return [grammar_filter(self._model, self._tokenizer, constraint)]

    def step(self) -> list[StepEvent]:
        events = self._take_refused()
        results = self._generator.iterate()
        streaming = set()
        for r in results:
            if r.get("stage") != "streaming":
                continue
            job_id = r["identifier"]
            if job_id not in self._jobs:
                continue
            streaming.add(job_id)
            ids = r.get("token_ids")
            n = int(ids.shape[-1]) if ids is not None else 0
            text = r.get("text", "")
            probs = r.get("token_probs")  # for jobs that asked for log-probabilities
            lp = () if probs is None or ids is None else token_logprobs(
                ids[0].tolist(), probs[0].tolist(), r["top_k_tokens"][0].tolist() if "top_k_tokens" in r else [],
                r["top_k_probs"][0].tolist() if "top_k_probs" in r else [], self.decode)
            if r.get("eos"):
                self._jobs.pop(job_id, None)
                reason = "length" if r.get("eos_reason") == "max_new_tokens" else "stop"
                events.append(StepEvent(job_id, text, n, True, reason, logprobs=lp))  # type: ignore[arg-type]
            elif text or n:
                events.append(StepEvent(job_id, text, n, logprobs=lp))
        self.last_step_batch = len(streaming)
        return events
