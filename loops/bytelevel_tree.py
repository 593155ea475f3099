"""Token trees over one frozen LM with a shared KV cache, for the exact byte-level view.

Every token fed to the model occupies one slot of a single flat KV cache. Through a custom 4D
attention mask, a node attends only to the root slots (start token and optional prefix
embeddings) and to the slots of its own ancestors. Branches that share a prefix therefore
share its KV entries, and all new nodes of one step go through the model in one forward pass.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from mmalign.loops.bytelevel_vocab import PairValidity

logger = logging.getLogger("mmalign.loops")

NEG_INF = float("-inf")
EOT = 256  # index of the end-of-text outcome in next-byte distributions


@dataclass
class TokenNode:
    """One token sequence in the tree: its KV slots and its valid next-token log-probabilities.

    Attributes:
        token: last token id, None for the root (start token and prefix embeddings).
        path: KV slots of the sequence's tokens, root slots excluded.
        end: number of text bytes the sequence spells.
        log_weight: log-probability of the sequence under the valid token model.
        next_logprobs: [V] float64 log-probabilities of the next token, -inf on invalid tokens.
            The end of text is the entry at the end-of-text token id.
    """

    token: int | None
    path: list[int]
    end: int
    log_weight: float
    next_logprobs: torch.Tensor | None = field(default=None, repr=False)


class KVTree:
    """A frozen causal LM whose fed tokens form a tree sharing one KV cache.

    Args:
        model: the causal LM, in eval mode.
        validity: pair validity of the model's tokenizer.
        start_token_id: token fed first, before any prefix embeddings.
        eot_id: token that ends a text.
        prefix_embeds: optional [P, d_model] input embeddings placed after the start token.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        validity: PairValidity,
        start_token_id: int,
        eot_id: int,
        prefix_embeds: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.validity = validity
        self.eot_id = int(eot_id)
        self.device = next(model.parameters()).device
        config = model.config
        layer_types = getattr(config, "layer_types", None) or []
        self.sliding_window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
        self._masks: OrderedDict[int | None, torch.Tensor] = OrderedDict()

        # Root: start token then prefix embeddings, fed once.
        start = torch.tensor([[start_token_id]], device=self.device)
        embeds = model.get_input_embeddings()(start)  # [1, 1, d_model]
        if prefix_embeds is not None:
            if prefix_embeds.dim() != 2 or prefix_embeds.shape[1] != embeds.shape[-1]:
                raise ValueError(
                    f"prefix_embeds has shape {tuple(prefix_embeds.shape)}; expected [P, {embeds.shape[-1]}] (P, d_model)"
                )
            embeds = torch.cat([embeds, prefix_embeds.to(embeds)[None]], dim=1)  # [1, 1 + P, d_model]
        self.root_length = embeds.shape[1]
        self.cache = DynamicCache()
        # transformers 5.x renames `past_key_values` to `cache`; older releases only know the first.
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            output = model(inputs_embeds=embeds, use_cache=True, **{self._cache_argument: self.cache})
        self.root_logits = output.logits[0, -1].double()  # [V]
        self.slot_positions: list[int] = list(range(self.root_length))
        self.slot_tokens: list[int | None] = [None] * self.root_length
        self.n_forward_tokens = 0

    def allowed_mask(self, left_token: int | None) -> torch.Tensor:
        """Return the [V] bool mask of tokens that may follow `left_token`, end of text included."""
        mask = self._masks.get(left_token)
        if mask is None:
            row = self.validity.valid_after(left_token)
            mask = torch.zeros(self.root_logits.shape[0], dtype=torch.bool)
            mask[: row.shape[0]] = torch.from_numpy(row)
            mask[self.eot_id] = True
            self._masks[left_token] = mask
            if len(self._masks) > self.validity.max_cached_rows:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(left_token)
        return mask

    def valid_logprobs(self, logits: torch.Tensor, left_token: int | None) -> torch.Tensor:
        """Renormalize [V] logits over the tokens that may follow `left_token`."""
        masked = logits.double().masked_fill(~self.allowed_mask(left_token), NEG_INF)
        return masked - torch.logsumexp(masked, dim=-1)

    def root(self) -> TokenNode:
        return TokenNode(None, [], 0, 0.0, self.valid_logprobs(self.root_logits, None))

    def reset(self) -> None:
        """Drop every tree slot, keeping the root's KV entries."""
        self.truncate(self.root_length)

    @property
    def n_slots(self) -> int:
        return len(self.slot_positions)

    def expand(self, parents: list[TokenNode], tokens: list[int], ends: list[int]) -> list[TokenNode]:
        """Feed one token after each parent in a single forward pass and return the children.

        Each parent must already hold `next_logprobs`; a child's `log_weight` adds the
        parent's log-probability of its token.
        """
        if not tokens:
            return []
        first_slot = self.n_slots
        paths = [parent.path + [first_slot + index] for index, parent in enumerate(parents)]
        logits = self.forward_paths(paths, tokens)  # [n_new, V]
        children = []
        for index, (parent, token, end) in enumerate(zip(parents, tokens, ends)):
            log_weight = parent.log_weight + float(parent.next_logprobs[token])
            children.append(TokenNode(token, paths[index], end, log_weight, self.valid_logprobs(logits[index], token)))
        return children

    def feed_tree(self, parent_index: list[int], tokens: list[int], ends: list[int]) -> list[TokenNode]:
        """Feed a whole token tree in one forward pass.

        Args:
            parent_index: per node, the index of its parent in this list, -1 for the root;
                parents come before their children.
            tokens: per node, its token id.
            ends: per node, the number of text bytes its sequence spells.

        Returns:
            The root node followed by one node per input node, in input order.
        """
        root = self.root()
        first_slot = self.n_slots
        paths: list[list[int]] = []
        for index, parent in enumerate(parent_index):
            paths.append((paths[parent] if parent >= 0 else []) + [first_slot + index])
        logits = self.forward_paths(paths, tokens) if tokens else None  # [n_nodes, V]
        nodes = [root]
        for index, (parent, token, end) in enumerate(zip(parent_index, tokens, ends)):
            parent_node = nodes[parent + 1]
            log_weight = parent_node.log_weight + float(parent_node.next_logprobs[token])
            nodes.append(TokenNode(token, paths[index], end, log_weight, self.valid_logprobs(logits[index], token)))
        return nodes

    def forward_paths(self, paths: list[list[int]], tokens: list[int]) -> torch.Tensor:
        """Append one slot per path's last entry and return the [n_new, V] logits."""
        n_new = len(tokens)
        n_past = self.n_slots
        positions = [self.root_length - 1 + len(path) for path in paths]

        # Tree attention: root slots plus the node's own ancestors.
        allowed = torch.zeros(n_new, n_past + n_new, dtype=torch.bool)
        allowed[:, : self.root_length] = True
        for row, path in enumerate(paths):
            allowed[row, path] = True
        attention_mask = self._to_additive(allowed)
        if self.sliding_window is not None:
            key_positions = torch.tensor(self.slot_positions + positions)
            distance = torch.tensor(positions)[:, None] - key_positions[None, :]
            sliding = self._to_additive(allowed & (distance < self.sliding_window))
            attention_mask = {"full_attention": attention_mask, "sliding_attention": sliding}

        input_ids = torch.tensor([tokens], device=self.device)  # [1, n_new]
        position_ids = torch.tensor([positions], device=self.device)  # [1, n_new]
        with torch.no_grad():
            output = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                use_cache=True,
                **{self._cache_argument: self.cache},
            )
        self.slot_positions.extend(positions)
        self.slot_tokens.extend(tokens)
        self.n_forward_tokens += n_new
        return output.logits[0]

    def truncate(self, n_slots: int) -> None:
        """Drop the KV slots from index `n_slots` on."""
        for layer in self.cache.layers:
            layer.keys = layer.keys[..., :n_slots, :]
            layer.values = layer.values[..., :n_slots, :]
        del self.slot_positions[n_slots:]
        del self.slot_tokens[n_slots:]

    def _to_additive(self, allowed: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None].to(self.device)  # [1, 1, n_new, n_keys]

    def compact(self, live: list[TokenNode]) -> None:
        """Drop KV slots that no node in `live` uses, renumbering the nodes' paths in place."""
        keep = sorted({slot for node in live for slot in node.path})
        if len(keep) == self.n_slots - self.root_length:
            return
        index = list(range(self.root_length)) + keep
        remap = {old: new for new, old in enumerate(index)}
        index_tensor = torch.tensor(index, device=self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index_tensor)
            layer.values = layer.values.index_select(-2, index_tensor)
        self.slot_positions = [self.slot_positions[old] for old in index]
        self.slot_tokens = [self.slot_tokens[old] for old in index]
        for node in live:
            node.path = [remap[slot] for slot in node.path]


class ByteTables:
    """Byte spellings in sorted order, for grouping next-token mass by the next byte."""

    def __init__(self, validity: PairValidity, n_logits: int) -> None:
        self.validity = validity
        self.sorted_ids = torch.from_numpy(validity.sorted_ids)
        lengths = [len(spelled) for spelled in validity.sorted_bytes]
        width = max(lengths) + 1
        table = np.full((len(lengths), width), 256, dtype=np.int16)  # 256 marks "no byte here"
        for row, spelled in enumerate(validity.sorted_bytes):
            table[row, : len(spelled)] = np.frombuffer(spelled, dtype=np.uint8)
        self.sorted_table = torch.from_numpy(table)  # [V_spelled, max_len + 1]
        first = torch.full((n_logits,), 257, dtype=torch.long)  # 257: tokens that spell no bytes
        first[self.sorted_ids] = self.sorted_table[:, 0].long()
        self.first_byte = first

    def mass_by_first_byte(self, logprobs: torch.Tensor, eot_id: int) -> torch.Tensor:
        """Group a [V] next-token distribution into [257] log-masses by first byte (256: end of text)."""
        return _log_scatter(logprobs, self.first_byte, eot_id)

    def mass_by_byte_after(self, logprobs: torch.Tensor, rest: bytes) -> torch.Tensor:
        """Group the tokens that extend past `rest` into [257] log-masses by their byte after it."""
        lo, hi = self.validity.prefix_range(rest)
        out = torch.full((257,), NEG_INF, dtype=torch.float64)
        if hi <= lo:
            return out
        ids = self.sorted_ids[lo:hi]
        following = self.sorted_table[lo:hi, len(rest)].long()
        longer = following < 256
        values = logprobs[ids[longer]]
        if values.numel() == 0:
            return out
        shift = values.max()
        if shift == NEG_INF:
            return out
        sums = torch.zeros(257, dtype=torch.float64).index_add_(0, following[longer], (values - shift).exp())
        return sums.log() + shift

    def log_mass_with_prefix(self, logprobs: torch.Tensor, prefix: bytes, strictly_longer: bool = False) -> float:
        """Return the log of the next-token mass on tokens whose bytes start with `prefix`."""
        lo, hi = self.validity.prefix_range(prefix)
        if hi <= lo:
            return NEG_INF
        values = logprobs[self.sorted_ids[lo:hi]]
        if strictly_longer:
            values = values[self.sorted_table[lo:hi, len(prefix)] < 256]
        if values.numel() == 0:
            return NEG_INF
        return float(torch.logsumexp(values, dim=0))

    def exact_tokens(self, prefix: bytes) -> list[int]:
        """Return the token ids spelled exactly `prefix`."""
        lo, hi = self.validity.prefix_range(prefix)
        out = []
        for row in range(lo, hi):
            if self.validity.sorted_bytes[row] == prefix:
                out.append(int(self.sorted_ids[row]))
            else:
                break
        return out


def _log_scatter(logprobs: torch.Tensor, bins: torch.Tensor, eot_id: int) -> torch.Tensor:
    shift = logprobs.max()
    weights = (logprobs - shift).exp()
    sums = torch.zeros(258, dtype=torch.float64).index_add_(0, bins, weights)
    sums[EOT] = weights[eot_id]
    return sums[:257].log() + shift


def log_add(values: list[float]) -> float:
    """Return log(sum(exp(values))), -inf for an empty list."""
    finite = [value for value in values if value != NEG_INF]
    if not finite:
        return NEG_INF
    top = max(finite)
    return top + math.log(sum(math.exp(value - top) for value in finite))
