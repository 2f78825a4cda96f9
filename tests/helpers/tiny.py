"""What tests need to know about the tiny random model that scripts/make_tiny_model.py writes."""

from __future__ import annotations

#: its end-of-sequence ids: 2 is ``</s>``, 5 is ``<|im_end|>`` (the tokenizer's eos_token)
END_IDS = (2, 5)

#: a logit bias (OpenAI's wire form: ids as strings) that keeps the random model from ending at once,
#: so a request runs to ``max_tokens`` (finish_reason "length")
KEEP_TALKING = {str(i): -100 for i in END_IDS}

#: the same bias as the engine's SamplingParams take it (int ids, float bias)
KEEP_TALKING_IDS = {i: -100.0 for i in END_IDS}

#: the chat most end-to-end tests send
MESSAGES = [{"role": "user", "content": "Say something."}]
