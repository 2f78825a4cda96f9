"""A job's grammar as an exllamav2 sampling filter (exllamav2 is imported only when one is made).

exllamav2's dynamic generator asks its filters for a logit mask: with ``can_mask_logits`` and
``use_background_worker`` it computes the next mask on a worker thread while the GPU runs the forward
pass, and masks the job's logits just before sampling; ``feed`` gets the token that was sampled. The
mask comes from the same :class:`~app.engine.constraints.masks.JobConstraint` the transformers backend
uses. When the grammar is complete it allows only end-of-sequence, which is one of the job's stop tokens.
"""

from __future__ import annotations

from typing import Any

from app.engine.constraints.masks import JobConstraint


def grammar_filter(model: Any, tokenizer: Any, constraint: JobConstraint) -> Any:
    """An ``ExLlamaV2Filter`` enforcing ``constraint`` for one job."""
    from exllamav2.generator.filters import ExLlamaV2Filter

    class GrammarFilter(ExLlamaV2Filter):
        def __init__(self) -> None:
            super().__init__(model, tokenizer)
            self.constraint = constraint
            self.allowed: Any = None

        def begin(self, prefix_str: str = "") -> None:
            self.allowed = None

        def feed(self, token: Any) -> None:
            self.constraint.accept(int(token))

        def next(self) -> tuple[set[int], set[int]]:
            """The allowed tokens as a set (only used when another filter of the job cannot mask)."""
            return set(self.constraint.allowed().nonzero().flatten().tolist()), set()

        def use_background_worker(self) -> bool:
            return True

        def can_mask_logits(self) -> bool:
            return True

        def prepare_logit_mask(self) -> bool:
            self.allowed = self.constraint.allowed()
            return True

        def mask_logits(self, logits: Any) -> Any:
            allowed = (self.allowed if self.allowed is not None else self.constraint.allowed()).to(logits.device)
            n = min(allowed.shape[0], logits.shape[-1])
            logits[n:] = float("-inf")
            logits[:n].masked_fill_(~allowed[:n], float("-inf"))
            return logits

    return GrammarFilter()
