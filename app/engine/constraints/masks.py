"""A job's grammar compiled against the model's tokenizer: which tokens may come next, as a mask on a
row of logits, and the token that was sampled fed back. Used by every backend in the same way (the
transformers backend per row of its batch, exllamav2 through its filter API).

Everything here runs where the backend steps (its thread or its model process), never on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from app.engine.constraints.grammars import GrammarError, engine_call

log = logging.getLogger(__name__)
#: compiles grammars beside the stepping thread (llguidance drops the GIL while it builds)
_COMPILER_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")


class ConstraintCompiler:
    """Compiles grammars for one model: holds the grammar engine's view of its tokenizer (built once, on
    the first constrained job: about a second for a large vocabulary)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._path = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                if not self._path.is_file():
                    raise GrammarError(f"constrained decoding needs the model's tokenizer.json ({self._path})")
                self._tokenizer = llguidance.LLTokenizer(self._path.read_text(encoding="utf-8"),
                                                         n_vocab=self.vocab_size, eos_token=self._eos or None)
            return self._tokenizer

    def compile(self, grammar: str) -> "JobConstraint":
        import llguidance

        matcher = engine_call(llguidance.LLMatcher, self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return JobConstraint(matcher, self.vocab_size)

    def compile_soon(self, grammar: str) -> "Future[JobConstraint]":
        """:meth:`compile` on a worker thread, so that the backend's other jobs step meanwhile (the first
        grammar also builds the tokenizer's view: 0.1-0.6 s for 32k-150k tokens), and the first mask made
        there too: the grammar engine's first mask in a process takes about a second (measured 0.9-1.0 s
        on the CPU machine, then 0.06-0.5 ms), which inside a step would hold every running job."""
        return _COMPILER_POOL.submit(self._compile_warm, grammar)

    def _compile_warm(self, grammar: str) -> "JobConstraint":
        constraint = self.compile(grammar)
        started = time.perf_counter()
        constraint.allowed()  # computing a mask does not move the grammar's state
        constraint.first_mask_s = time.perf_counter() - started
        log.debug("grammar compiled; its first mask took %.1f ms", 1e3 * constraint.first_mask_s)
        return constraint


def compiler_for(backend: Any) -> ConstraintCompiler:
    """The GPU backends' compiler: made on the backend's first grammar from its folder's tokenizer.json,
    then kept on it (``_constraints``) until it unloads."""
    compiler = getattr(backend, "_constraints", None)
    if compiler is None:
        compiler = ConstraintCompiler(Path(backend.model_dir) / "tokenizer.json", backend.vocab_size or 0,
                                      sorted(backend.eos_token_ids()))
        backend._constraints = compiler
    return compiler


class JobConstraint:
    """One job's grammar state."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        #: seconds its first mask took when it was made ahead, on the compiler's thread (else None)
        self.first_mask_s: float | None = None

    def allowed(self) -> Any:
        """The tokens allowed next, as a bool tensor of the vocabulary's size (on the CPU)."""
        import numpy as np
        import torch

        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        return torch.from_numpy(allowed)

    def packed(self) -> Any:
        """The tokens allowed next as the grammar engine makes them: a little-endian bitmask (bit ``i & 31``
        of 32-bit word ``i >> 5``: token ``i``), one int32 numpy word per 32 tokens of the vocabulary."""
        import numpy as np

        words = np.frombuffer(self._matcher.compute_bitmask(), dtype="<i4")
        want, tail = -(-self.vocab_size // 32), self.vocab_size % 32
        if words.shape[0] == want and not tail:
            return words
        out = np.zeros(want, dtype="<i4")  # cut or pad to this vocabulary; no bit past its last token
        out[:min(want, words.shape[0])] = words[:want]
        if tail:
            out[-1] &= (1 << tail) - 1
        return out

    def mask(self, logits: Any) -> Any:
        """``logits`` (one row) with every token the grammar forbids at -inf (in place when it can)."""
        allowed = self.allowed().to(logits.device)
        n = min(allowed.shape[0], logits.shape[-1])
        logits[n:] = float("-inf")
        logits[:n].masked_fill_(~allowed[:n], float("-inf"))
        return logits

    def accept(self, token: int) -> bool:
        """Feed the sampled token; False when the grammar did not allow it (the matcher is then stuck)."""
        ok = bool(self._matcher.consume_token(token))
        if not ok:
            log.warning("constrained job: token %d refused by its grammar: %s", token, self._matcher.get_error())
        return ok

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None
