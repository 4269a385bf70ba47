"""Token id -> the text the browser shows for it, readable for byte tokens.

A byte-level BPE token that holds part of a multi-byte UTF-8 character (e.g. the first byte of an emoji)
decodes alone to U+FFFD. Such tokens are shown as their bytes instead: the valid UTF-8 part as text and the
rest as \\xNN escapes (" \\xf0\\x9f\\x98"), read from the vocabulary's byte alphabet (GPT-2's byte-to-character
table, used by GPT-2, Llama 3, SmolLM2, ...); a SentencePiece byte token keeps its own name ("<0xF0>").
"""

from __future__ import annotations

from functools import cache
from typing import Any

REPLACEMENT = "\ufffd"


@cache
def byte_alphabet() -> dict[str, int]:
    """The character each byte is written as in a byte-level BPE vocabulary -> that byte: printable Latin-1
    bytes stand for themselves, the 68 others are mapped in order to the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1)]
    printable += range(ord("\xae"), ord("\xff") + 1)
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


def readable_bytes(piece: str) -> str | None:
    """A byte-level vocabulary entry -> its bytes decoded with \\xNN escapes for invalid UTF-8; None when
    `piece` is not written in the byte alphabet."""
    alphabet = byte_alphabet()
    if not piece or any(ch not in alphabet for ch in piece):
        return None
    return bytes(alphabet[ch] for ch in piece).decode("utf-8", errors="backslashreplace")


def token_texts(tokenizer: Any, ids: list[int]) -> dict[int, str]:
    """Token id -> its text as the tokenizer decodes it alone ("<id>" without a tokenizer); tokens that
    decode to U+FFFD are shown by their bytes (module docstring)."""
    if tokenizer is None:
        return {i: f"<{i}>" for i in ids}
    texts = dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]), strict=True))
    broken = [i for i, text in texts.items() if REPLACEMENT in text]
    if broken:
        for i, piece in zip(broken, tokenizer.convert_ids_to_tokens(broken), strict=True):
            texts[i] = readable_bytes(piece) or str(piece)
    return texts
