"""Pre-tokenizer and UTF-8 helpers for the byte-level view of GPT-2 style BPE tokenizers.

The GPT-2 pre-tokenizer regex distinguishes characters only by class (letter, number, space,
other whitespace, other), plus the apostrophe and the letters of English contractions. To
decide where the regex splits the text of two adjacent tokens, each token's text can
therefore be replaced by a short class signature.
"""

from __future__ import annotations

import unicodedata

import regex

# Pattern of the Hugging Face ByteLevel pre-tokenizer with use_regex=True (tokenizers 0.23.3).
GPT2_PATTERN = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

# Outcomes of pre-tokenizing the text of two adjacent tokens: a cut exactly between them
# (SPLIT), no cut (JOINED, so BPE decides), or a cut elsewhere (OTHER, so the pair is invalid).
SPLIT, JOINED, OTHER = 0, 1, 2


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to the printable character that byte-level BPE vocabularies use for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shift)
            shift += 1
    return mapping


def continuations_needed(spelled: bytes) -> int:
    """Return how many continuation bytes the last, unfinished UTF-8 character of `spelled` lacks."""
    for back in range(1, min(4, len(spelled)) + 1):
        byte = spelled[-back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:
            if byte < 0xE0:
                size = 2
            elif byte < 0xF0:
                size = 3
            else:
                size = 4
            return max(size - back, 0)
    return 0


def leading_continuations(spelled: bytes) -> int:
    count = 0
    while count < len(spelled) and 0x80 <= spelled[count] < 0xC0:
        count += 1
    return count


def signature(text: str) -> str:
    """Map text to class representatives that the GPT-2 pattern cannot tell apart.

    The first three characters keep the apostrophe and the letters of English contractions,
    because those alternatives only match at the start of a pre-token. Later runs of one
    class are cut to two characters, which keeps where a run starts and ends.
    """
    out = []
    for position, char in enumerate(text):
        if char == "'":
            mapped = "'"
        elif position < 3 and char in "strevmld":
            mapped = char
        elif char == " ":
            mapped = " "
        elif char.isspace() and regex.match(r"\s", char):
            mapped = "\n"
        else:
            category = unicodedata.category(char)
            if category.startswith("L"):
                mapped = "a"
            elif category.startswith("N"):
                mapped = "0"
            else:
                mapped = "!"
        if position >= 3 and len(out) >= 2 and out[-1] == mapped and out[-2] == mapped:
            continue
        out.append(mapped)
    return "".join(out)


def gpt2_category(left: str, right: str) -> int:
    end = GPT2_PATTERN.match(left + right).end()
    if end == len(left):
        return SPLIT
    if end == len(left) + len(right):
        return JOINED
    return OTHER
