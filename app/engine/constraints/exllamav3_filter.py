"""A job's grammar as an exllamav3 sampling filter (exllamav3 is imported only when one is made).

exllamav3's generator asks each filter of a job for the next mask on its filter thread pool while the
GPU runs the forward pass (``use_background_worker``), as a packed int32 bitmask (bit ``i & 31`` of word
``i >> 5`` set: token ``i`` allowed), and feeds it the token that was sampled (``accept_token``). The mask
comes from the same :class:`~app.engine.constraints.masks.JobConstraint` the other backends use. With
``eos_after_completed`` the job ends when the grammar is complete (``eos_reason`` "end_filter").
"""

from __future__ import annotations

from typing import Any, Callable

from app.engine.constraints.grammars import GrammarError
from app.engine.constraints.masks import JobConstraint, compiler_for


def job_filters(backend: Any, grammar: str, constraint: JobConstraint) -> list[Any]:
    """The filters of a job of the exllamav3 backend whose ``grammar`` compiled to ``constraint`` (on the
    compiler's worker thread, see constraints.deferred); a reset after a rewind compiles it again here."""
    compiler = compiler_for(backend)

    def compile_again() -> JobConstraint:
        try:
            return compiler.compile(grammar)
        except GrammarError as exc:
            raise GrammarError(f"constraint: {exc}") from None

    return [grammar_filter(backend._tokenizer, constraint, compile_again)]


def packed_mask(constraint: JobConstraint) -> Any:
    """The tokens ``constraint`` allows next as exllamav3's packed bitmask: an int32 CPU tensor (1, words)."""
    import torch

    return torch.from_numpy(constraint.packed().copy()).unsqueeze(0)  # the grammar engine's own layout


def grammar_filter(tokenizer: Any, constraint: JobConstraint, compile_again: Callable[[], JobConstraint]) -> Any:
    """An exllamav3 ``Filter`` enforcing ``constraint`` for one job (``compile_again``: a fresh state, when
    exllamav3 resets a filter that has been fed)."""
    from exllamav3 import Filter

    class GrammarFilter(Filter):
        def __init__(self) -> None:
            super().__init__(tokenizer, None, None, True)
            self.constraint = constraint
            self.fed = 0

        def reset(self) -> None:
            if self.fed:
                self.constraint = compile_again()
                self.fed = 0

        def accept_token(self, token: int) -> None:
            self.constraint.accept(int(token))
            self.fed += 1

        def is_completed(self) -> bool:
            return bool(self.constraint.done)

        def get_next_logit_mask(self) -> Any:
            return packed_mask(self.constraint)

        def use_background_worker(self) -> bool:
            return True

    return GrammarFilter()
