"""Token sampling on logits with torch (used by the transformers backend)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable

from app.engine.events import SamplingParams

if TYPE_CHECKING:
    import torch


def make_generator(params: SamplingParams, device: "torch.device") -> "torch.Generator":
    import torch

    gen = torch.Generator(device="cpu")
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(logits: "torch.Tensor", params: SamplingParams, history: list[int], counts: Counter,
           generator: "torch.Generator") -> int:
    """Pick the next token from one row of logits (shape [vocab]).

    Order: logit bias, repetition penalty (over prompt and output), presence/frequency penalties
    (over the output), then greedy or temperature -> top_k -> top_p -> min_p -> typical.
    """
    return sample_with_probs(logits, params, history, counts, generator, want_probs=False)[0]


def sample_with_probs(logits: "torch.Tensor", params: SamplingParams, history: list[int], counts: Counter,
                      generator: "torch.Generator", *, want_probs: bool = True,
                      mask: Callable[["torch.Tensor"], "torch.Tensor"] | None = None
                      ) -> tuple[int, "torch.Tensor | None"]:
    """:func:`sample`, and the distribution the token was drawn from (after every sampling setting;
    for greedy decoding, the softmax of the penalised logits). ``mask`` (a grammar's) sets the tokens it
    forbids to -inf after the penalties, so that no penalty can bring one back (-inf x 0 is NaN)."""
    import torch

    logits = _penalised(logits, params, history, counts)
    if mask is not None:
        logits = mask(logits)
    if params.temperature > 0:
        probs = _filtered(logits / params.temperature, params)
        total = probs.sum()
        if torch.isfinite(total) and total > 0:
            probs = probs / total
            return int(torch.multinomial(probs, 1, generator=generator)), probs if want_probs else None
    return int(torch.argmax(logits)), torch.softmax(logits, dim=-1) if want_probs else None


def _penalised(logits: "torch.Tensor", params: SamplingParams, history: list[int], counts: Counter) -> "torch.Tensor":
    import torch

    logits = logits.detach().to("cpu", torch.float32).clone()
    vocab = logits.shape[-1]
    for tok, bias in params.logit_bias.items():
        if 0 <= tok < vocab:
            logits[tok] += bias
    if params.repetition_penalty != 1.0 and history:
        idx = torch.tensor(sorted(set(history)), dtype=torch.long)
        idx = idx[idx < vocab]
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if counts and (params.presence_penalty or params.frequency_penalty):
        idx = torch.tensor(list(counts.keys()), dtype=torch.long)
        freq = torch.tensor(list(counts.values()), dtype=torch.float32)
        keep = idx < vocab
        logits[idx[keep]] -= params.presence_penalty + params.frequency_penalty * freq[keep]
    return logits


def _filtered(logits: "torch.Tensor", params: SamplingParams) -> "torch.Tensor":
    """Probabilities after top_k, top_p, min_p and typical (not normalised)."""
    import torch

    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > params.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if params.min_p > 0:
        probs[probs < params.min_p * probs.max()] = 0
    if params.typical < 1.0:
        logp = torch.log(probs.clamp_min(1e-30))
        entropy = -(probs * logp).nansum()
        shifted = (-logp - entropy).abs()
        shifted[probs == 0] = float("inf")
        order = torch.argsort(shifted)
        cum = torch.cumsum(probs[order], dim=-1)
        cutoff = int((cum < params.typical * cum[-1]).sum()) + 1
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[:cutoff]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
    return probs
