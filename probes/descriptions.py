"""SAE latent descriptions from top-activating text contexts, and the top latents on example images.

One LM pass over the fitting texts feeds every probed layer. For each latent the pass keeps
only a running top-N of (activation, context window token ids) and a firing count, so
memory is `layers x d_sae x N x window`, whatever the corpus size. A latent's description
lists its most frequent activating tokens (lower-cased, stripped) and one example context.
A latent that never fires on the texts is dead. Each layer's descriptions are saved atomically as
`descriptions.json` in the probe's layer folder and reused while the SAE, the texts and
the settings are unchanged.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from sae_lens import SAE

from mmalign.adapters.base import Adapter
from mmalign.adapters.compose import ComposedBatch, PromptTemplate, compose
from mmalign.capture import capture_resid_post
from mmalign.io import stable_hash, write_atomic
from mmalign.lm import LanguageModel
from mmalign.progress import progress

logger = logging.getLogger("mmalign.probes")

DESCRIPTIONS_FILE = "descriptions.json"
DESCRIPTIONS_FORMAT = 1
CONTEXT_LEFT = 8  # tokens shown before the activating token
CONTEXT_RIGHT = 2  # tokens shown after it
DESCRIPTION_TOKENS = 3  # most frequent activating tokens named in a description


WINDOW = CONTEXT_LEFT + 1 + CONTEXT_RIGHT
NO_TOKEN = -1  # window slot outside the text (before its start, after its end, padding)


class TopActivations:
    """Running top-N activations per SAE latent over a stream of token batches.

    Each kept activation carries the token ids of its context window, so descriptions need
    neither the corpus nor a second pass.

    Attributes:
        values: `[d_sae, N]` activations in descending order; -inf in unfilled slots.
        windows: `[d_sae, N, WINDOW]` token ids around each activation (`NO_TOKEN` outside
            the text); the activating token is at index `CONTEXT_LEFT`.
        firing: `[d_sae]` int64 count of tokens on which each latent is non-zero.
        n_tokens: Tokens seen so far.
    """

    def __init__(self, d_sae: int, n: int) -> None:
        if n < 1:
            raise ValueError(f"contexts per latent must be at least 1, got {n}")
        self.n = n
        self.values = torch.full((d_sae, n), -math.inf)
        self.windows = torch.full((d_sae, n, WINDOW), NO_TOKEN, dtype=torch.long)
        self.firing = torch.zeros(d_sae, dtype=torch.long)
        self.n_tokens = 0

    def update(self, latents: torch.Tensor, windows: torch.Tensor) -> None:
        """Merge one batch: `latents` `[M, d_sae]` and each token's context window `[M, WINDOW]`."""
        if latents.shape[0] == 0:
            return
        self.firing += (latents > 0).sum(dim=0)
        self.n_tokens += latents.shape[0]
        batch_values, rows = latents.T.topk(min(self.n, latents.shape[0]), dim=1)  # [d_sae, k]
        values = torch.cat([self.values, batch_values], dim=1)  # [d_sae, N + k]
        candidates = torch.cat([self.windows, windows[rows]], dim=1)  # [d_sae, N + k, WINDOW]
        self.values, order = values.topk(self.n, dim=1)  # [d_sae, N]
        self.windows = candidates.gather(1, order.unsqueeze(-1).expand(-1, -1, WINDOW))

    def top(self, latent: int) -> list[tuple[float, list[int]]]:
        """Return (activation, window) pairs of a latent with a positive activation, largest first."""
        return [
            (float(value), window)
            for value, window in zip(self.values[latent].tolist(), self.windows[latent].tolist())
            if value > 0
        ]


def context_windows(text_ids: torch.Tensor) -> torch.Tensor:
    """Return each position's window of token ids: `[B, L]` ids (`NO_TOKEN` off-text) to `[B, L, WINDOW]`."""
    padded = torch.nn.functional.pad(text_ids, (CONTEXT_LEFT, CONTEXT_RIGHT), value=NO_TOKEN)
    return padded.unfold(1, WINDOW, 1)  # [B, L, WINDOW]


def sae_signature(sae: SAE) -> str:
    """Return a hash of an SAE's parameters, so descriptions are redone when the weights change."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _token_label(token: str) -> str:
    return token.strip().lower() or repr(token)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_latent(contexts: list[dict[str, object]], firing: int, n_tokens: int, n_texts: int) -> str:
    """Build a description from a latent's top contexts: frequent activating tokens and one example.

    Returns "dead: ..." for a latent that never fired.
    """
    if firing == 0 or not contexts:
        return f"dead: never fires on the {n_texts} fitting texts"
    counts = collections.Counter(_token_label(str(context["token"])) for context in contexts)
    tokens = ", ".join(f'"{token}"' for token, _ in counts.most_common(DESCRIPTION_TOKENS))
    first = contexts[0]
    example = _one_line(f"{first['left']}[[{first['token']}]]{first['right']}")
    return f"{tokens}; e.g. \"{example}\" (fires on {firing / max(n_tokens, 1):.1%} of text tokens)"


def _decode_window(window: list[int], tokenizer) -> dict[str, str]:
    def text(ids: list[int]) -> str:
        return tokenizer.decode([token for token in ids if token != NO_TOKEN])

    return {
        "left": text(window[:CONTEXT_LEFT]),
        "token": text(window[CONTEXT_LEFT : CONTEXT_LEFT + 1]),
        "right": text(window[CONTEXT_LEFT + 1 :]),
    }


def _batches_by_length(encoded: Iterable[list[int]], batch_size: int, block_batches: int = 16) -> Iterator[list[list[int]]]:
    """Group token lists into batches, sorted by length within blocks so padding stays small."""
    block: list[list[int]] = []
    for ids in encoded:
        if ids:
            block.append(ids)
        if len(block) == batch_size * block_batches:
            block.sort(key=len)
            yield from (block[start : start + batch_size] for start in range(0, len(block), batch_size))
            block = []
    block.sort(key=len)
    yield from (block[start : start + batch_size] for start in range(0, len(block), batch_size))


def _stream_top_activations(
    lm: LanguageModel, probes: dict[int, SAE], texts: Iterable[str], n_contexts: int, batch_size: int, max_tokens: int
) -> tuple[dict[int, TopActivations], int]:
    """Run the texts through the LM once; accumulate each layer's top activations per latent.

    Returns:
        layer -> accumulator, and the number of texts read.
    """
    layers = sorted(probes)
    tops = {layer: TopActivations(int(probes[layer].cfg.d_sae), n_contexts) for layer in layers}
    device = lm.model.device
    n_texts = 0

    def encode() -> Iterator[list[int]]:
        nonlocal n_texts
        for text in texts:
            n_texts += 1
            yield lm.tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]

    for chunk in progress(_batches_by_length(encode(), batch_size), "feature descriptions", "batch"):
        length = 1 + max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), length), lm.end_token_id, dtype=torch.long)
        text_ids = torch.full((len(chunk), length), NO_TOKEN, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(chunk):
            input_ids[row, : 1 + len(ids)] = torch.tensor([lm.start_token_id] + ids)
            text_ids[row, 1 : 1 + len(ids)] = torch.tensor(ids)
            attention_mask[row, : 1 + len(ids)] = 1
        keep = text_ids != NO_TOKEN  # the start token is an attention sink, not text
        windows = context_windows(text_ids)[keep]  # [M, WINDOW]
        batch = ComposedBatch(lm.embed(input_ids.to(device)), attention_mask.to(device), input_ids, keep, keep)
        hidden = capture_resid_post(lm, batch, layers)
        for layer in layers:
            tokens = hidden[layer].float().cpu()[keep]  # [M, D]
            with torch.no_grad():
                latents = probes[layer].encode(tokens)  # [M, d_sae]
            tops[layer].update(latents, windows)
    return tops, n_texts


def _layer_record(top: TopActivations, tokenizer, key: str, layer: int, n_texts: int) -> dict[str, object]:
    latents = []
    for latent in range(top.values.shape[0]):
        firing = int(top.firing[latent])
        contexts = [{**_decode_window(window, tokenizer), "activation": round(value, 6)} for value, window in top.top(latent)]
        latents.append({
            "latent": latent,
            "firing": firing,
            "density": firing / max(top.n_tokens, 1),
            "dead": firing == 0,
            "description": describe_latent(contexts, firing, top.n_tokens, n_texts),
            "contexts": contexts,
        })
    return {
        "format": DESCRIPTIONS_FORMAT, "key": key, "layer": layer, "d_sae": len(latents), "n_texts": n_texts,
        "n_tokens": top.n_tokens, "window": [CONTEXT_LEFT, CONTEXT_RIGHT], "latents": latents,
    }


def _read_descriptions(path: Path, key: str) -> dict[str, object] | None:
    """Return the saved descriptions at `path` when they were made with `key`, else None."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("feature descriptions %s are unreadable (%s); describing the layer again", path, error)
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        logger.info("feature descriptions %s were made for other probes, texts or settings; describing the layer again", path)
        return None
    return record


def describe_sae_latents(
    lm: LanguageModel, probes: dict[int, SAE], texts: Iterable[str], directory: Path,
    n_contexts: int = 5, batch_size: int = 32, max_tokens: int = 48, corpus_id: str | None = None,
) -> dict[int, dict[str, object]]:
    """Describe every latent of every probe from its top-activating contexts in `texts`.

    Layers whose `directory/layer_LL/descriptions.json` matches the SAE weights, the texts
    and the settings are read back; the others share one LM pass over the texts.

    Args:
        probes: layer -> SAE reading that layer's residual stream.
        texts: The fitting texts, each truncated to `max_tokens` tokens. A list, or any
            iterable (read once, as a stream) when `corpus_id` is given.
        n_contexts: Top contexts kept per latent.
        batch_size: Texts per LM forward pass.
        corpus_id: A string that changes whenever the texts change; when None, the texts
            must be a list or tuple and their contents are hashed.

    Returns:
        layer -> the saved record: `latents` lists per latent its `description`,
        `contexts` (`left`, `token`, `right`, `activation`), `firing`, `density` and `dead`.

    Raises:
        ValueError: when the texts give no tokens or `n_contexts` is below 1.
        TypeError: when `texts` is a stream and `corpus_id` is None.
    """
    if n_contexts < 1:
        raise ValueError(f"eval.feature_contexts must be at least 1, got {n_contexts}")
    if corpus_id is None:
        if not isinstance(texts, Sequence) or isinstance(texts, str):
            raise TypeError(f"texts of type {type(texts).__name__} cannot be hashed without reading them; pass corpus_id or a list")
        corpus_id = hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    keys = {
        layer: stable_hash([DESCRIPTIONS_FORMAT, sae_signature(sae), corpus_id, n_contexts, CONTEXT_LEFT, CONTEXT_RIGHT, max_tokens])
        for layer, sae in probes.items()
    }
    paths = {layer: Path(directory) / f"layer_{layer:02d}" / DESCRIPTIONS_FILE for layer in probes}
    records: dict[int, dict[str, object]] = {}
    for layer in probes:
        saved = _read_descriptions(paths[layer], keys[layer])
        if saved is not None:
            records[layer] = saved
    missing = sorted(set(probes) - set(records))
    if not missing:
        logger.info("feature descriptions: all %d layers reused from %s", len(probes), directory)
        return dict(sorted(records.items()))

    started = time.perf_counter()
    tops, n_texts = _stream_top_activations(lm, {layer: probes[layer] for layer in missing}, texts, n_contexts, batch_size, max_tokens)
    if tops[missing[0]].n_tokens == 0:
        raise ValueError(f"the {n_texts} fitting texts give no tokens; check probes.wordnet_glosses and the training captions")
    for layer in missing:
        records[layer] = _layer_record(tops[layer], lm.tokenizer, keys[layer], layer, n_texts)
        write_atomic(paths[layer], json.dumps(records[layer], ensure_ascii=False))
        dead = sum(latent["dead"] for latent in records[layer]["latents"])
        logger.info("feature descriptions, layer %d: %d latents (%d dead) written to %s", layer,
                    len(records[layer]["latents"]), dead, paths[layer])
    logger.info("feature descriptions: %d layers from %d texts in %.1f s", len(missing), n_texts, time.perf_counter() - started)
    return dict(sorted(records.items()))


def visual_token_layout(adapter: Adapter) -> dict[str, object]:
    """Return where each visual token sits: `cls` (CLS first) and the patch `grid` side, None for no grid.

    The `linear-prefix` adapter maps a pooled vector to k tokens that have no image position.
    """
    n_visual = int(adapter.n_visual_tokens)
    if getattr(adapter, "kind", "") == "linear-prefix":
        return {"cls": False, "grid": None, "n_visual_tokens": n_visual}
    cls = bool(adapter.keep_cls)
    side = math.isqrt(n_visual - int(cls))
    if side * side != n_visual - int(cls):
        return {"cls": False, "grid": None, "n_visual_tokens": n_visual}
    return {"cls": cls, "grid": side, "n_visual_tokens": n_visual}


def _latent_summary(record: dict[str, object], latent: int, n_contexts: int) -> dict[str, object]:
    entry = record["latents"][latent]
    return {key: entry[key] for key in ("description", "density", "dead", "firing")} | {"contexts": entry["contexts"][:n_contexts]}


def _rank_latents(values: torch.Tensor, dense: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """Return up to k (latent, value) pairs with positive `values` `[d_sae]`: non-dense latents first, then dense ones."""
    ranked: list[tuple[int, float]] = []
    for group in (~dense, dense):
        top_values, top_index = values.masked_fill(~group, 0.0).topk(min(k, values.shape[0]))
        ranked += [(int(index), float(value)) for value, index in zip(top_values, top_index) if value > 0]
    return ranked[:k]


@torch.no_grad()
def image_feature_examples(
    lm: LanguageModel, adapter: Adapter, vision_tokens: torch.Tensor, captions: list[str], prompt: PromptTemplate,
    max_caption_tokens: int, probes: dict[int, SAE], descriptions: dict[int, dict[str, object]],
    top_k: int = 5, max_density: float = 0.1, n_contexts: int = 3,
) -> dict[str, object]:
    """Find the top SAE latents on each image's visual tokens at every probed layer.

    Latents that fire on more than `max_density` of the fitting-text tokens are dense: they
    fire almost everywhere and describe little, so they rank after every other latent that
    fires. They show only where fewer than `top_k` other latents fire, or none on a token.

    Args:
        vision_tokens: `[n, T, D]` cached encoder outputs of the example images.
        captions: The images' reference captions, placed after the visual tokens.
        descriptions: layer -> record from `describe_sae_latents`.
        top_k: Latents listed per image, ranked by activation summed over its visual tokens.

    Returns:
        `layout` (from `visual_token_layout`), `layers`, `images` (per image and layer:
        `top` latents with their summed activation, and per visual token its `strongest`
        latent, that latent's `activation` and the token's `l0`) and `latents` (layer ->
        latent -> description, density, whether it is `dense`, and top contexts).
    """
    layers = sorted(probes)
    adapter.eval()
    visual = adapter(vision_tokens.to(lm.model.device))  # [n, V, d_lm]
    batch = compose(lm, captions, prompt, max_caption_tokens, visual)
    hidden = capture_resid_post(lm, batch, layers)
    n_images, n_visual = visual.shape[0], visual.shape[1]
    images: list[dict[str, object]] = [{"layers": {}} for _ in range(n_images)]
    latents_used: dict[str, dict[str, object]] = {}
    for layer in layers:
        image_hidden = hidden[layer].float().cpu()[batch.image_mask.cpu()].view(n_images, n_visual, -1)  # [n, V, D]
        latents = probes[layer].encode(image_hidden)  # [n, V, d_sae]
        density = torch.tensor([entry["density"] for entry in descriptions[layer]["latents"]])  # [d_sae]
        if density.shape[0] != latents.shape[-1]:
            raise ValueError(f"descriptions of layer {layer} have {density.shape[0]} latents, the SAE has {latents.shape[-1]}")
        dense = density > max_density
        used: set[int] = set()
        for image in range(n_images):
            top = [{"latent": i, "activation": value} for i, value in _rank_latents(latents[image].sum(dim=0), dense, top_k)]
            tokens = []
            for row in latents[image]:  # [d_sae] per visual token
                strongest = _rank_latents(row, dense, 1)
                index, value = strongest[0] if strongest else (None, 0.0)
                tokens.append({"strongest": index, "activation": value, "l0": int((row > 0).sum())})
            n_dense = int(((latents[image] > 0).any(dim=0) & dense).sum())
            images[image]["layers"][str(layer)] = {"top": top, "tokens": tokens, "n_dense_active": n_dense}
            used.update(entry["latent"] for entry in top)
            used.update(token["strongest"] for token in tokens if token["strongest"] is not None)
        latents_used[str(layer)] = {
            str(i): _latent_summary(descriptions[layer], i, n_contexts) | {"dense": bool(dense[i])} for i in sorted(used)
        }
    return {
        "layout": visual_token_layout(adapter), "layers": layers, "top_k": top_k, "max_density": max_density,
        "images": images, "latents": latents_used,
    }
