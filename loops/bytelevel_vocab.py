"""Byte spellings of BPE tokens and the pairwise validity test behind the byte-level view.

A token sequence is *valid* when every token is what the tokenizer produces for its own bytes
and every adjacent pair (l, r) is what the tokenizer produces for bytes(l) + bytes(r). Validity
is defined against the full Hugging Face tokenizer: added-token extraction, normalizer,
pre-tokenizer and BPE model. It is decided in three layers:

1. Pre-tokenization. For byte-level BPE (GPT-2 style) the regex pre-tokenizer either splits
   bytes(l) + bytes(r) exactly at the boundary (the pair is valid), keeps the two in one
   pre-token (layer 2 decides), or splits elsewhere (invalid). For SentencePiece-style BPE
   (Gemma) the added tokens that are not special (newline runs, HTML tags) are extracted
   before BPE, so pairs that touch them are checked with the tokenizer itself.
2. BPE merges. BPE merges the lowest-rank adjacent pair first (leftmost on ties). Until the
   first merge across the boundary, each token's symbols evolve as they would alone. So the
   pair is invalid exactly when, at some state of that joint run, the boundary pair's rank is
   below the next merge on the left and not above the next merge on the right. Each token's
   states are traced once with a Python BPE. A row of the validity matrix then checks only
   the right tokens for which such a merge exists (`PairValidity.bpe_crossing`).
3. Byte fallback (Gemma). `<0xNN>` tokens never merge; they are valid where UTF-8 structure
   allows them.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import time
from collections import OrderedDict
from functools import lru_cache

import numpy as np
from transformers import PreTrainedTokenizerBase

from mmalign.loops.bytelevel_pretok import (
    JOINED,
    OTHER,
    SPLIT,
    bytes_to_unicode,
    continuations_needed,
    gpt2_category,
    leading_continuations,
    signature,
)

logger = logging.getLogger("mmalign.loops")

INF_RANK = np.iinfo(np.int32).max
# Memory for cached rows of the validity matrix (one byte per vocabulary entry and row).
ROW_CACHE_BYTES = 512 * 2**20
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"

class PairValidity:
    """Token byte spellings and the pairwise validity matrix of one BPE tokenizer.

    Rows of the matrix are computed on demand and cached per left token.

    Attributes:
        token_bytes: byte spelling per token id, None for special tokens and ids past the
            tokenizer's vocabulary.
        self_valid: [V] bool, tokens the tokenizer produces for their own bytes.
        family: "byte_level" (GPT-2 style) or "sentencepiece" (Gemma style).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        start = time.perf_counter()
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"tokenizer model type {model.get('type')!r} is not supported; expected a BPE tokenizer")
        self.family = self._detect_family(spec)
        vocab: dict[str, int] = model["vocab"]
        self.n_symbols = max(self.vocab_size, max(vocab.values()) + 1)

        # 1. Byte spelling and BPE symbols per token.
        self.token_bytes: list[bytes | None] = [None] * self.vocab_size
        self.added_ids: set[int] = set()
        special_ids = {entry["id"] for entry in spec["added_tokens"] if entry["special"]}
        added_text = {entry["id"]: entry["content"] for entry in spec["added_tokens"] if not entry["special"]}
        self.byte_token_ids: dict[int, int] = {}
        symbols: list[tuple[int, ...] | None] = [None] * self.vocab_size
        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
        for piece, token_id in vocab.items():
            if token_id >= self.vocab_size or token_id in special_ids:
                continue
            spelled = self._spell(piece, to_byte)
            if spelled is None:
                continue
            self.token_bytes[token_id] = spelled
            if len(spelled) == 1 and _BYTE_TOKEN.match(piece):
                self.byte_token_ids[token_id] = spelled[0]
            elif all(char in vocab for char in piece):
                symbols[token_id] = tuple(vocab[char] for char in piece)
        for token_id, content in added_text.items():
            if token_id < self.vocab_size:
                self.token_bytes[token_id] = content.encode("utf-8")
                self.added_ids.add(token_id)
                symbols[token_id] = None
        self.added_strings = [content.encode("utf-8") for content in added_text.values()]

        # 2. Merge ranks: a dict for tracing and sorted keys for vectorized look-ups.
        self.merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, merge in enumerate(model["merges"]):
            left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
            if left in vocab and right in vocab and left + right in vocab:
                self.merges.setdefault((vocab[left], vocab[right]), (rank, vocab[left + right]))
        pairs = np.array(list(self.merges.keys()), dtype=np.int64).reshape(-1, 2)
        ranks = np.array([value[0] for value in self.merges.values()], dtype=np.int64)
        keys = pairs[:, 0] * self.n_symbols + pairs[:, 1]
        order = np.argsort(keys)
        self._pair_keys, self._pair_ranks = keys[order], ranks[order]
        by_left = np.lexsort((ranks, pairs[:, 0]))
        self._merge_left = pairs[by_left, 0]
        self._merge_right = pairs[by_left, 1]
        self._merge_rank = ranks[by_left]
        self._merge_offsets = np.searchsorted(self._merge_left, np.arange(self.n_symbols + 1))

        # 3. Trace every token's own BPE run: self-validity and right-role states.
        self.self_valid = np.zeros(self.vocab_size, dtype=bool)
        state_token, state_symbol, state_rank = [], [], []
        for token_id, token_symbols in enumerate(symbols):
            if token_id in self.added_ids:
                self.self_valid[token_id] = True
                continue
            if token_id in self.byte_token_ids:
                self.self_valid[token_id] = self._byte_token_self_valid(token_id, vocab)
                continue
            if token_symbols is None:
                continue
            final, _, right_states = self._trace(token_symbols)
            if final != (token_id,):
                continue
            self.self_valid[token_id] = True
            for symbol, rank in right_states:
                state_token.append(token_id)
                state_symbol.append(symbol)
                state_rank.append(rank)
        self._symbols = {token_id: value for token_id, value in enumerate(symbols) if value is not None}
        self._check_self_valid_with_tokenizer()

        # Right-role states in CSR form per token, and inverted by leading symbol.
        state_token_arr = np.array(state_token, dtype=np.int64)
        self._right_symbol = np.array(state_symbol, dtype=np.int64)
        self._right_rank = np.array(state_rank, dtype=np.int64)
        self._right_offsets = np.searchsorted(state_token_arr, np.arange(self.vocab_size + 1))
        by_symbol = np.argsort(self._right_symbol, kind="stable")
        self._inv_token = state_token_arr[by_symbol]
        self._inv_rank = self._right_rank[by_symbol]
        self._inv_offsets = np.searchsorted(self._right_symbol[by_symbol], np.arange(self.n_symbols + 1))

        # 4. Pre-tokenizer signatures for byte-level tokenizers.
        self._text = [
            spelled.decode("utf-8", errors="surrogateescape") if spelled is not None else "" for spelled in self.token_bytes
        ]
        if self.family == "byte_level":
            signatures = [signature(text) for text in self._text]
            unique, index = np.unique(np.array(signatures, dtype=object), return_inverse=True)
            self._right_signatures: list[str] = list(unique)
            self._right_signature_index = index
        self._leading_continuations = np.array([leading_continuations(b or b"") for b in self.token_bytes])
        self._lengths = np.array([len(b or b"") for b in self.token_bytes])
        self._continuation_byte_ids = np.array(
            [token_id for token_id, value in self.byte_token_ids.items() if 0x80 <= value < 0xC0], dtype=np.int64
        )

        # Token ids sorted by byte spelling, so tokens sharing a prefix form one slice.
        spelled_ids = [i for i, b in enumerate(self.token_bytes) if b]
        spelled_ids.sort(key=lambda i: self.token_bytes[i])
        self.sorted_ids = np.array(spelled_ids, dtype=np.int64)
        self.sorted_bytes = [self.token_bytes[i] for i in spelled_ids]
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()
        self.max_cached_rows = max(256, ROW_CACHE_BYTES // self.vocab_size)
        logger.info(
            "traced %d tokens (%d valid alone) of a %s BPE tokenizer in %.1f s",
            self.vocab_size,
            int(self.self_valid.sum()),
            self.family,
            time.perf_counter() - start,
        )

    @staticmethod
    def _detect_family(spec: dict) -> str:
        pre = spec.get("pre_tokenizer") or {}
        kinds = [pre.get("type")] + [item.get("type") for item in pre.get("pretokenizers", [])]
        if "ByteLevel" in kinds:
            return "byte_level"
        normalizer = spec.get("normalizer") or {}
        replaces = [normalizer] + list(normalizer.get("normalizers", []))
        if any(item.get("type") == "Replace" and item.get("content") == _SPIECE_SPACE for item in replaces):
            return "sentencepiece"
        raise ValueError(
            f"unsupported tokenizer layout (pre_tokenizer={pre.get('type')!r}, normalizer={normalizer.get('type')!r}); "
            "expected a byte-level BPE or a SentencePiece-style BPE with '▁' for spaces"
        )

    def _spell(self, piece: str, to_byte: dict[str, int]) -> bytes | None:
        if self.family == "byte_level":
            if all(char in to_byte for char in piece):
                return bytes(to_byte[char] for char in piece)
            return None
        match = _BYTE_TOKEN.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace(_SPIECE_SPACE, " ").encode("utf-8")

    def _byte_token_self_valid(self, token_id: int, vocab: dict[str, int]) -> bool:
        # A fallback byte token appears only inside a character that has no vocabulary entry,
        # so ASCII bytes (all in the vocabulary) never appear and multi-byte ones may.
        value = self.byte_token_ids[token_id]
        return value >= 0x80 or chr(value) not in vocab

    @lru_cache(maxsize=65536)
    def _trace(self, symbols: tuple[int, ...]) -> tuple[tuple[int, ...], list[tuple[int, int]], list[tuple[int, int]]]:
        """Run BPE on `symbols`, recording the edge symbol and next merge rank at each state.

        Returns:
            (final symbols, left-role states [(rightmost symbol, next rank)], right-role
            states [(leftmost symbol, next rank)]); the last state has rank INF_RANK.
        """
        current = list(symbols)
        left_states: list[tuple[int, int]] = []
        right_states: list[tuple[int, int]] = []
        while True:
            best_rank, best_position = INF_RANK, -1
            for position in range(len(current) - 1):
                merge = self.merges.get((current[position], current[position + 1]))
                if merge is not None and merge[0] < best_rank:
                    best_rank, best_position = merge[0], position
            left_states.append((current[-1], best_rank))
            right_states.append((current[0], best_rank))
            if best_position < 0:
                return tuple(current), left_states, right_states
            merged = self.merges[(current[best_position], current[best_position + 1])][1]
            current[best_position : best_position + 2] = [merged]

    def _check_self_valid_with_tokenizer(self) -> None:
        """Clear self-validity where the full tokenizer (pre-tokenizer included) disagrees."""
        candidates, texts = [], []
        for token_id in np.flatnonzero(self.self_valid):
            spelled = self.token_bytes[token_id]
            try:
                texts.append(spelled.decode("utf-8"))
            except UnicodeDecodeError:
                if self.family == "byte_level":
                    text = spelled.decode("utf-8", errors="surrogateescape")
                    if gpt2_category(signature(text), "") != SPLIT:
                        self.self_valid[token_id] = False
                continue
            candidates.append(int(token_id))
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        for token_id, encoding in zip(candidates, encodings):
            if encoding.ids != [token_id]:
                self.self_valid[token_id] = False

    def _rank_of(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        keys = left * self.n_symbols + right
        index = np.minimum(np.searchsorted(self._pair_keys, keys), len(self._pair_keys) - 1)
        return np.where(self._pair_keys[index] == keys, self._pair_ranks[index], INF_RANK)

    def _left_states(self, token_id: int) -> list[tuple[int, int]]:
        symbols = self._symbols.get(token_id)
        if symbols is None or not self.self_valid[token_id]:
            return []
        return self._trace(symbols)[1]

    def bpe_crossing(self, left_token: int, restrict: np.ndarray | None = None) -> np.ndarray:
        """Return the right tokens for which BPE merges across the boundary after `left_token`.

        Args:
            left_token: a self-valid token traced by BPE (not an added or byte token).
            restrict: [V] bool, search only these right tokens; all tokens when None.

        Returns:
            Sorted token ids r with a merge across bytes(left_token) | bytes(r).
        """
        left_states = self._left_states(left_token)
        if not left_states:
            return np.zeros(0, dtype=np.int64)

        # 1. Candidates: some left state i and right state j where the boundary merge could fire.
        found = []
        for symbol, next_rank in left_states:
            lo, hi = self._merge_offsets[symbol], self._merge_offsets[symbol + 1]
            hi = lo + int(np.searchsorted(self._merge_rank[lo:hi], next_rank, side="left"))
            if hi > lo:
                found.append(self._right_tokens_from(self._merge_right[lo:hi], self._merge_rank[lo:hi]))
        found = [hits for hits in found if hits.size]
        if not found:
            return np.zeros(0, dtype=np.int64)
        selected = np.zeros(self.vocab_size, dtype=bool)
        for hits in found:
            selected[hits] = True
        if restrict is not None:
            selected &= restrict
        candidates = np.flatnonzero(selected)
        if candidates.size == 0:
            return candidates

        # 2. Run the joint merge order for each candidate, vectorized over candidates.
        left_symbol = np.array([s for s, _ in left_states], dtype=np.int64)
        left_rank = np.array([r for _, r in left_states], dtype=np.int64)
        offsets = self._right_offsets[candidates]
        lengths = self._right_offsets[candidates + 1] - offsets
        i = np.zeros(candidates.size, dtype=np.int64)
        j = np.zeros(candidates.size, dtype=np.int64)
        crossing = np.zeros(candidates.size, dtype=bool)
        open_ = np.ones(candidates.size, dtype=bool)
        for _ in range(len(left_states) + int(lengths.max()) + 1):
            if not open_.any():
                break
            state = offsets + j
            a, m_left = left_symbol[i], left_rank[i]
            b, m_right = self._right_symbol[state], self._right_rank[state]
            rank = self._rank_of(a, b)
            fires = open_ & (rank < m_left) & (rank <= m_right)
            crossing |= fires
            open_ &= ~fires & ~((m_left == INF_RANK) & (m_right == INF_RANK))
            step_left = open_ & (m_left <= m_right)
            i = np.where(step_left, np.minimum(i + 1, len(left_states) - 1), i)
            j = np.where(open_ & ~step_left, np.minimum(j + 1, lengths - 1), j)
        return candidates[crossing]

    def _right_tokens_from(self, symbols: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Return tokens with a right-role state (b, m) where b is in `symbols` and m >= its rank."""
        starts, stops = self._inv_offsets[symbols], self._inv_offsets[symbols + 1]
        counts = stops - starts
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        # Concatenate the CSR slices of all symbols without a Python loop.
        owner = np.repeat(np.arange(symbols.size), counts)
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        entries = starts[owner] + within
        keep = self._inv_rank[entries] >= ranks[owner]
        return self._inv_token[entries[keep]]

    def valid_after(self, left_token: int | None) -> np.ndarray:
        """Return the [V] bool row of tokens that may follow `left_token` (None: sequence start).

        The row excludes special tokens; callers add the end-of-text token themselves.
        """
        if left_token is None:
            return self.self_valid
        row = self._rows.get(left_token)
        if row is None:
            row = self._compute_row(left_token)
            self._rows[left_token] = row
            if len(self._rows) > self.max_cached_rows:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(left_token)
        return row

    def _compute_row(self, left_token: int) -> np.ndarray:
        row = self.self_valid.copy()
        if not self.self_valid[left_token]:
            row[:] = False
            return row
        left_bytes = self.token_bytes[left_token]
        if left_token in self.added_ids:
            return self._row_by_tokenizer(left_token, np.flatnonzero(row), row)
        if left_token in self.byte_token_ids:
            return self._byte_token_row(left_token, row)

        if self.family == "byte_level":
            category = self._categories_after(left_token)
            need = continuations_needed(left_bytes)
            if need:
                # A cut inside a multi-byte character is never a pre-token boundary.
                # NOTE: the regex classes the partial character as punctuation, which can misjudge
                # splits next to letters outside ASCII.
                category = np.where(category == SPLIT, JOINED, category)
            fits = self._leading_continuations == np.minimum(need, self._lengths)
            row &= fits & (category != OTHER)
            row[self.bpe_crossing(left_token, row & (category == JOINED))] = False
            return row

        # SentencePiece style: a continuation byte follows only a byte token.
        row[self._continuation_byte_ids] = False
        row[self.bpe_crossing(left_token)] = False
        if self.added_ids:
            self._apply_added_tokens(left_token, row)
        return row

    def _categories_after(self, left_token: int) -> np.ndarray:
        categories = self._signature_row(signature(self._text[left_token]))
        return categories[self._right_signature_index]

    @lru_cache(maxsize=8192)
    def _signature_row(self, left_signature: str) -> np.ndarray:
        return np.array([gpt2_category(left_signature, right) for right in self._right_signatures], dtype=np.int8)

    def _byte_token_row(self, left_token: int, row: np.ndarray) -> np.ndarray:
        # NOTE: fallback bytes are checked against UTF-8 structure only, so spelling a
        # character that has its own token with byte tokens counts as valid here.
        if self.byte_token_ids[left_token] >= 0xC0:
            only_continuation = np.zeros_like(row)
            only_continuation[self._continuation_byte_ids] = True
            return only_continuation
        return row

    def _apply_added_tokens(self, left_token: int, row: np.ndarray) -> None:
        """Check with the tokenizer the pairs whose bytes contain an added token across the cut."""
        left_bytes = self.token_bytes[left_token]
        suspects = set(self.added_ids)
        for added in self.added_strings:
            for cut in range(1, len(added)):
                if left_bytes.endswith(added[:cut]):
                    suspects.update(int(t) for t in self._tokens_with_prefix(added[cut:]))
        self._row_by_tokenizer(left_token, np.array(sorted(suspects), dtype=np.int64), row)

    def _tokens_with_prefix(self, prefix: bytes) -> np.ndarray:
        lo, hi = self.prefix_range(prefix)
        return self.sorted_ids[lo:hi]

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """Return the slice of `sorted_ids` whose byte spellings start with `prefix`."""
        lo = bisect.bisect_left(self.sorted_bytes, prefix)
        hi = bisect.bisect_left(self.sorted_bytes, prefix + b"\xff" * 64, lo)
        return lo, hi

    def _row_by_tokenizer(self, left_token: int, right_tokens: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Set `row[r]` for each r in `right_tokens` by tokenizing bytes(l) + bytes(r)."""
        left_bytes = self.token_bytes[left_token]
        texts, ids = [], []
        for token_id in right_tokens:
            token_id = int(token_id)
            if not self.self_valid[token_id]:
                row[token_id] = False
                continue
            try:
                texts.append((left_bytes + self.token_bytes[token_id]).decode("utf-8"))
                ids.append(token_id)
            except UnicodeDecodeError:
                # NOTE: a pair that splits a character is kept without a tokenizer check here.
                continue
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        for token_id, encoding in zip(ids, encodings):
            row[token_id] = encoding.ids == [left_token, token_id]
        return row

    def is_valid_pair(self, left_token: int, right_token: int) -> bool:
        return bool(self.valid_after(left_token)[right_token])
