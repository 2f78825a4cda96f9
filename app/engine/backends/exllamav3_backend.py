"""ExLlamaV3 backend: exllamav3's Generator and Job behind the backend contract.

exllamav3 loads EXL3 and FP16 folders (not EXL2 or GPTQ: those stay with exllamav2) and batches with
its own paged attention, so continuous batching needs no flash-attn. exllamav3 and torch are imported
only in the model process, when a model loads; the first import JIT-builds its CUDA extension (about
6 minutes), which is reported as a load step of its own.

Settings map to exllamav3 as follows: ``cache_type`` FP16 is ``CacheLayer_fp16``, Q8/Q6/Q4 are
``CacheLayer_quant`` with 8/6/4-bit keys and values; ``gpu_split`` 'auto' is its automatic layer split,
GiB per GPU is ``use_per_device``; ``split_mode`` 'tensor' is its tensor-parallel load; ``rope_scale``
is linear RoPE scaling and ``rope_alpha`` NTK scaling of the RoPE base. Its sampler has no typical-p:
``typical`` is not applied.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

from app.engine.backends import gpu_common
from app.engine.backends.contract import BackendBase, BackendLoadError, LoadCancelled, ProgressFn
from app.engine.backends.gpu_common import (
    agreeing_fast_tokenizer, check_split, cuda_memory, load_failures_readable, unload_model)
from app.engine.backends.gpu_jobs import GeneratorJobs
from app.engine.backends.slots import SHORT_SLOTS, short_limit, short_reserve_tokens
from app.engine.catalog.tokenizer import EncoderSpec, FolderTokenizer, with_bos
from app.engine.events import BackendJob, SamplingParams, StepEvent, token_logprobs
from app.engine.settings.schema import parse_gpu_split

log = logging.getLogger(__name__)

#: cache_type -> bits of the quantized keys and values (FP16: the unquantized cache layer)
CACHE_BITS = {"Q8": 8, "Q6": 6, "Q4": 4}
PAGE = 256  # exllamav3's page: the cache's length and the prefill chunk are multiples of it
MAX_CHUNK = 2048
EXTENSION = "exllamav3_ext"


def announce_extension_build(progress: ProgressFn) -> bool:
    """Say so (progress and log) when importing exllamav3 is about to build its extension."""
    return gpu_common.announce_extension_build(progress, "exllamav3", EXTENSION)


def paged_sizes(context_length: int, max_batch: int) -> tuple[int, int]:
    """(cache tokens, prefill chunk): ``max_batch`` jobs of the whole context and the short slots' pages
    (app.engine.backends.slots), in whole pages."""
    per_job = -(-context_length // PAGE) * PAGE
    return per_job * max_batch + short_reserve_tokens(context_length, PAGE), min(MAX_CHUNK, per_job)


def apply_rope(config: Any, rope_scale: float, rope_alpha: float) -> None:
    """Linear RoPE scaling and NTK alpha on exllamav3's RoPE settings, before the model is built."""
    if rope_scale == 1.0 and rope_alpha == 1.0:
        return
    rs = getattr(config, "rope_settings", None)
    if rs is None:
        raise BackendLoadError("rope_scale / rope_alpha: exllamav3 keeps no RoPE settings for this architecture")
    if rope_scale != 1.0:
        own = dict(rs.rope_scaling or {})
        kind = own.get("rope_type", own.get("type", "default"))
        if kind not in ("default", None):
            raise BackendLoadError(f"rope_scale cannot be combined with the model's own RoPE scaling ({kind})")
        rs.rope_scaling = {**own, "rope_type": "linear", "factor": float(rope_scale)}
    if rope_alpha != 1.0:
        dim = rs.rotary_dim or int(rs.head_dim * rs.partial_rotary_factor)
        rs.rope_theta = float(rs.rope_theta) * rope_alpha ** (dim / (dim - 2))


def prefill_every_step(generator_cls: Any, chunk: int) -> dict[str, int]:
    """Generator options that prefill every waiting prompt at every step, a chunk at most each (as
    exllamav2's dynamic generator does). exllamav3's defaults (1.6.5: ``prefill_cooldown`` 4, a shared
    chunk of half the chunk size) give prompts that arrive while others generate one pass every fifth
    step, one prompt at a time: 32 clients arriving over a few milliseconds waited 254 ms (p50) for their
    first token on the H200 where the same jobs enqueued at once waited 35 ms. Only options this version
    of exllamav3 takes are passed."""
    import inspect

    accepted = inspect.signature(generator_cls.__init__).parameters
    wanted = {"prefill_cooldown": 0, "shared_chunk_size": chunk}
    return {k: v for k, v in wanted.items() if k in accepted}


class ExLlamaV3Backend(GeneratorJobs, BackendBase):
    name = "exllamav3"
    batching = "continuous"
    host_threads = 1  # see model_process.child.limit_host_threads

    def __init__(self, model_dir: str, *, context_length: int, max_batch: int, cache_type: str = "FP16",
                 gpu_split: str | None = "auto", split_mode: str = "layers", rope_scale: float = 1.0,
                 rope_alpha: float = 1.0) -> None:
        if cache_type != "FP16" and cache_type not in CACHE_BITS:
            raise BackendLoadError(f"cache_type {cache_type} does not fit the exllamav3 backend")
        self.model_dir = model_dir
        self.context_length = context_length
        self.max_batch = max_batch
        self.cache_type = cache_type
        self.gpu_split = gpu_split or "auto"
        self.split_mode = split_mode
        self.rope_scale = rope_scale
        self.rope_alpha = rope_alpha
        self.vocab_size: int | None = None
        self.last_step_batch = 0
        self._model: Any = None
        self._cache: Any = None
        self._tokenizer: Any = None
        self._fast_tokenizer: FolderTokenizer | None = None
        self._generator: Any = None
        # the generator's batch: max_batch + SHORT_SLOTS jobs, the short ones within the cache's extra pages
        self._init_jobs(max_batch, short_limit(context_length))
        self._eos: set[int] = set()

    @property
    def batch_slots(self) -> int:
        """The generator's batch: ``max_batch`` jobs and the slots kept for short ones (the cache holds
        ``max_batch`` contexts and the short slots' pages)."""
        return self.max_batch + SHORT_SLOTS

    # -- lifecycle -------------------------------------------------------------------
    @staticmethod
    def warm_up(progress: ProgressFn) -> None:
        """The imports a load needs (seconds; the first time ever also the CUDA extension's build)."""
        progress(0.0, "importing torch")
        import torch

        if not torch.cuda.is_available():
            return  # load() says so readably
        if not announce_extension_build(progress):
            progress(0.0, "importing exllamav3")
        from exllamav3 import Generator, Job  # noqa: F401

    def load(self, progress: ProgressFn, cancel: threading.Event) -> None:
        torch, exl = self._import_library(progress)
        if cancel.is_set():
            raise LoadCancelled("load cancelled")
        progress(0.02, "reading model config")
        config, model = self._read_model(exl)
        self._model = model
        # the automatic split says "Insufficient VRAM in split for model and cache": the readable advice
        with load_failures_readable(self, torch):
            self._load_weights(exl, model, progress, cancel)
            self._tokenizer = exl.Tokenizer.from_config(config)
            self._fast_tokenizer = self._agreeing_fast_tokenizer()
            chunk = paged_sizes(self.context_length, self.max_batch)[1]
            self._generator = exl.Generator(model=model, cache=self._cache, tokenizer=self._tokenizer,
                                            max_batch_size=self.batch_slots, max_chunk_size=chunk,
                                            **prefill_every_step(exl.Generator, chunk))
            # config.json may lack these (exllamav3 reads them as None): the tokenizer knows its vocabulary
            self.vocab_size = int(config.vocab_size or self._tokenizer.actual_vocab_size)
            self._eos = {int(t) for t in (config.eos_token_id_list or []) if t is not None}
        if self._tokenizer.eos_token_id is not None:
            self._eos.add(int(self._tokenizer.eos_token_id))
        progress(1.0, "loaded")

    def _import_library(self, progress: ProgressFn) -> tuple[Any, Any]:
        """torch and exllamav3, with readable errors for a missing GPU, library or extension build."""
        try:
            import torch
        except ImportError:
            raise BackendLoadError("the exllamav3 backend needs torch with CUDA; install the 'exllamav3' extra") from None
        if not torch.cuda.is_available():
            raise BackendLoadError("the exllamav3 backend needs an NVIDIA GPU with CUDA; torch sees none")
        announce_extension_build(progress)  # when not warmed up first (the backend used in this process)
        try:
            import exllamav3 as exl
        except ImportError as exc:
            raise BackendLoadError(f"exllamav3 is not installed or failed to build its CUDA extension: {exc} "
                                   "(install the 'exllamav3' extra)") from None
        except Exception as exc:  # the JIT build raises RuntimeError/subprocess errors
            raise BackendLoadError(f"building exllamav3's CUDA extension failed: {exc} (see README: CUDA build)") from None
        return torch, exl

    def _read_model(self, exl: Any) -> tuple[Any, Any]:
        try:
            config = exl.Config.from_directory(self.model_dir)
            apply_rope(config, self.rope_scale, self.rope_alpha)
            return config, exl.Model.from_config(config)
        except BackendLoadError:
            raise
        except Exception as exc:  # exllamav3 asserts on unknown architectures and malformed configs
            raise BackendLoadError(f"exllamav3 cannot read the model in {self.model_dir}: {exc}") from None

    def _load_weights(self, exl: Any, model: Any, progress: ProgressFn, cancel: threading.Event) -> None:
        """The cache (made before the weights: the loader allocates its tensors), the weights, and the
        kernels' first-use costs; the caller turns failures into readable errors."""
        tokens, chunk = paged_sizes(self.context_length, self.max_batch)
        bits = CACHE_BITS.get(self.cache_type)
        quant = {} if bits is None else {"k_bits": bits, "v_bits": bits}
        # max_batch_size: the recurrent-state slots of models that have recurrent layers
        self._cache = exl.Cache(model, max_num_tokens=tokens, max_batch_size=self.batch_slots,
                                layer_type=exl.CacheLayer_fp16 if bits is None else exl.CacheLayer_quant, **quant)

        def on_module(done: int, total: int) -> None:
            if cancel.is_set():
                raise LoadCancelled("load cancelled")
            progress(0.05 + 0.85 * done / max(total, 1), f"loading weights ({done}/{total} modules)")

        model.load(callback=on_module, max_chunk_size=chunk, max_batch_size=self.batch_slots, **self._split_args())

        def on_pass(done: int, total: int) -> None:
            if cancel.is_set():
                raise LoadCancelled("load cancelled")
            progress(0.9 + 0.06 * done / max(total, 1), "warming up the kernels")

        # before the generator takes the cache: the passes write into its leading pages
        failed = model.warmup(self._cache, max_chunk_size=chunk, max_batch_size=self.batch_slots, callback=on_pass)
        if failed:
            log.warning("exllamav3 warm-up passes that failed (they compile on first use instead): %s", failed)
        progress(0.96, "loading tokenizer")

    def _split_args(self) -> dict[str, Any]:
        """model.load's arguments for the GPUs: the automatic layer split, GiB per GPU, or tensor-parallel."""
        import torch

        args: dict[str, Any] = {}
        if self.split_mode == "tensor":
            count = torch.cuda.device_count()
            if count < 2:
                raise BackendLoadError(f"gpu_split_mode 'tensor' needs two or more GPUs; {count} is present")
            args["tensor_p"] = True
        if self.gpu_split != "auto":
            split = parse_gpu_split(self.gpu_split)
            check_split(split)
            args["use_per_device"] = split
        return args

    def out_of_memory_message(self) -> str:
        return (f"out of GPU memory loading {self.model_dir} with context {self.context_length}, batch "
                f"{self.max_batch}, cache {self.cache_type}: lower context_length or batch_size, use a Q4/Q8 "
                "cache, or set gpu_split")

    def _agreeing_fast_tokenizer(self) -> FolderTokenizer | None:
        """tokenizer.json when it agrees with exllamav3's tokenizer (then the server tokenizes without a
        round trip to this process)."""
        return agreeing_fast_tokenizer(self.model_dir, lambda text: self._slow_encode(text, add_bos=False),
                                       "exllamav3")

    def unload(self) -> None:
        self._forget_jobs()
        generator, self._generator = self._generator, None
        if generator is not None:
            generator.close()  # its pinned buffers and filter threads
        del generator
        self._cache = None
        self._tokenizer = None
        self._fast_tokenizer = None
        unload_model(self)

    def memory_used(self) -> dict[str, int]:
        return cuda_memory()

    # -- tokens -----------------------------------------------------------------------
    def _slow_encode(self, text: str, *, add_bos: bool) -> list[int]:
        ids = self._tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=True)
        return [int(x) for x in ids[0].tolist()]

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        spec = self.encoder_spec()
        if spec is not None and self._fast_tokenizer is not None:
            return with_bos(self._fast_tokenizer.encode_plain(text), spec.bos_id, add_bos)
        return self._slow_encode(text, add_bos=add_bos)

    def encoder_spec(self) -> EncoderSpec | None:
        if self._fast_tokenizer is None:
            return None
        bos = self._tokenizer.bos_token_id
        return EncoderSpec(self.model_dir, None if bos is None else int(bos))

    def decode(self, ids: Sequence[int]) -> str:
        import torch

        return str(self._tokenizer.decode(torch.tensor(list(ids), dtype=torch.long), decode_special_tokens=False))

    def eos_token_ids(self) -> set[int]:
        return set(self._eos)

    # -- jobs -------------------------------------------------------------------------
    def sampler(self, params: SamplingParams) -> Any:
        """exllamav3's sampler for a job: logit bias, penalties, then temperature, min-p, top-k, top-p (greedy
        at temperature 0); steps at their neutral values drop out of its stack."""
        from exllamav3.generator.sampler import ComboSampler

        return ComboSampler(rep_p=params.repetition_penalty, freq_p=params.frequency_penalty,
                            pres_p=params.presence_penalty, temperature=params.temperature, min_p=params.min_p,
                            top_k=params.top_k, top_p=params.top_p,
                            logit_bias={int(t): float(v) for t, v in params.logit_bias.items()})

    def _enqueue(self, job: BackendJob, filters: list[Any]) -> None:
        """Make and enqueue the job (exllamav3 checks that it fits the cache: a refusal raises)."""
        import torch
        from exllamav3 import Job

        gen_job = Job(input_ids=torch.tensor([job.prompt_ids], dtype=torch.long),
                      max_new_tokens=job.max_new_tokens, sampler=self.sampler(job.sampling),
                      seed=job.sampling.seed, stop_conditions=[*job.stop_token_ids, *job.stop_strings],
                      identifier=job.job_id, decode_special_tokens=False, filters=filters,
                      return_top_tokens=job.logprobs or 0, return_probs=job.logprobs is not None)
        self._generator.enqueue(gen_job)
        self._jobs[job.job_id] = gen_job

    def _filters(self, job: BackendJob, constraint: Any) -> list[Any]:
        from app.engine.constraints.exllamav3_filter import job_filters

        return job_filters(self, job.grammar or "", constraint)

    def step(self) -> list[StepEvent]:
        events = self._take_refused()
        streaming = 0
        for r in self._generator.iterate():
            stage = r.get("stage")
            if stage == "error":  # exllamav3 contained a failure of this job; the others go on
                job_id = getattr(r.get("job"), "identifier", None)
                if self._jobs.pop(job_id, None) is not None:
                    events.append(StepEvent(job_id, "", 0, True, "error", str(r.get("error"))))
                continue
            if stage != "streaming" or r.get("identifier") not in self._jobs:
                continue
            streaming += 1
            event = self._event(r)
            if event is not None:
                events.append(event)
        self.last_step_batch = streaming
        return events

    def _event(self, r: dict[str, Any]) -> StepEvent | None:
        job_id = r["identifier"]
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
            return StepEvent(job_id, text, n, True, reason, logprobs=lp)  # type: ignore[arg-type]
        if text or n:
            return StepEvent(job_id, text, n, logprobs=lp)
        return None
