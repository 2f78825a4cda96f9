"""The model folder's tokenizer (``tokenizer.json`` through the ``tokenizers`` library)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)
#: texts from this long are tokenized without holding the GIL (below it the batch call costs more than it frees)
RELEASE_GIL_CHARS = 16_384


class TokenizerError(ValueError):
    pass


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class SpecialTokens:
    bos_token: str | None
    eos_token: str | None
    add_bos: bool
    chat_template: str | None


def read_special_tokens(folder: Path) -> SpecialTokens:
    cfg = read_json(folder / "tokenizer_config.json")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return SpecialTokens(
        bos_token=_token_text(cfg.get("bos_token")),
        eos_token=_token_text(cfg.get("eos_token")),
        add_bos=bool(cfg.get("add_bos_token", False)),
        chat_template=template if isinstance(template, str) else None,
    )


@dataclass(frozen=True)
class EncoderSpec:
    """A backend's encoding, reproducible without the backend: the folder's tokenizer.json, then
    ``bos_id`` in front when BOS is asked for (and not already there)."""

    model_dir: str
    bos_id: int | None


def with_bos(ids: list[int], bos_id: int | None, add_bos: bool) -> list[int]:
    if add_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids.insert(0, bos_id)
    return ids


class FolderTokenizer:
    """Encode/decode with the folder's ``tokenizer.json``; special tokens written in text are honoured."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.folder = folder
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{folder} has no tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exceptions for bad files
            raise TokenizerError(f"cannot load {path}: {exc}") from None
        self.special = read_special_tokens(folder)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_id(self.special.bos_token)
        self.eos_ids = self._eos_ids(folder)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _eos_ids(self, folder: Path) -> set[int]:
        ids: set[int] = set()
        for cfg in (read_json(folder / "generation_config.json"), read_json(folder / "config.json")):
            value = cfg.get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        eos = self.token_id(self.special.eos_token)
        if eos is not None:
            ids.add(eos)
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """The ids of ``text`` (special tokens written in it included), nothing added.

        A long text goes through ``encode_batch``, which lets go of the GIL while it works; ``encode``
        holds it throughout (1.5 MB: 4.5 s during which no other thread, the event loop included, ran)."""
        if len(text) >= RELEASE_GIL_CHARS:
            return self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def special_token_texts(self) -> list[str]:
        """The texts of the tokenizer's added tokens (``<s>``, ``<|im_end|>``, ...)."""
        return [t.content for t in self._tok.get_added_tokens_decoder().values()]

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """``add_bos``: prepend BOS if the model wants one (tokenizer_config's add_bos_token)."""
        return with_bos(self.encode_plain(text), self.bos_id if self.special.add_bos else None, add_bos)

    def encoder_spec(self) -> EncoderSpec:
        return EncoderSpec(str(self.folder), self.bos_id if self.special.add_bos else None)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)
