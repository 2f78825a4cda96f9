#!/usr/bin/env python3
"""Write a tiny random-weight Llama model with a byte-level BPE tokenizer and a ChatML template.

Usage: python scripts/make_tiny_model.py OUT_DIR [--seed N] [--hidden N] [--layers N] [--dtype float32]

Nothing is downloaded: the tokenizer is trained offline with ``tokenizers`` on a generated corpus
and the weights are random with a fixed seed, so the same arguments give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>",
    "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if tools %}<|im_start|>system\nYou can call these tools:\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}<|im_start|>tool\n{{ message['content'] }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- elif message['content'] %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{ part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message.get('tool_calls') %}{%- for call in message['tool_calls'] %}"
    "\n<tool_call>{{ call['function'] | tojson }}</tool_call>{%- endfor %}{%- endif %}"
    "<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = (
    "the a of and to in is you that it he was for on are as with his they I at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him into "
    "time has look two more write go see number no way could people my than first water been call "
    "who oil its now find long down day did get come made may part hello world model token batch "
    "stream server request answer question café naïve über 日本語 テスト 中文 emoji 🙂 🚀 ✓ déjà vu"
).split()


def corpus(seed: int, lines: int = 4000, pseudo_words: int = 3000) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    # pseudo-words give the BPE trainer enough merges to fill larger vocabularies exactly
    pseudo = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(pseudo_words)]
    words = WORDS + pseudo
    out = []
    for _ in range(lines):
        n = rng.randint(3, 14)
        sentence = " ".join(rng.choice(words if rng.random() < 0.5 else WORDS) for _ in range(n))
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", ",", ":"]))
    return out


def build_tokenizer(seed: int, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # a large vocabulary (a real model's 32,000) needs a corpus with that many merges in it
    text = corpus(seed) if vocab_size <= 8192 else corpus(seed, lines=vocab_size, pseudo_words=2 * vocab_size)
    tok.train_from_iterator(text, trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--model-vocab", type=int, default=None,
                        help="embedding rows if not the tokenizer's vocabulary (a deliberately broken model)")
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    raw_tok = build_tokenizer(args.seed, args.vocab)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tok,
        bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "</s>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
        model_max_length=args.context,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    vocab = raw_tok.get_vocab_size()
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.model_vocab or vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-5,
        bos_token_id=raw_tok.token_to_id("<s>"),
        eos_token_id=raw_tok.token_to_id("<|im_end|>"),
        pad_token_id=raw_tok.token_to_id("<pad>"),
        tie_word_embeddings=False,
        initializer_range=args.init_std,
    )
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = [raw_tok.token_to_id("<|im_end|>"), raw_tok.token_to_id("</s>")]
    model.generation_config.bos_token_id = raw_tok.token_to_id("<s>")
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = args.dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters, vocab {vocab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
