"""Tests for mmalign.probes.descriptions: running top-N contexts, descriptions, reuse and image examples."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from mmalign.adapters.compose import ComposedBatch, build_prompt, compose
from mmalign.adapters.linear import LinearAdapter, LinearPrefixAdapter
from mmalign.capture import capture_resid_post
from mmalign.probes.descriptions import (
    CONTEXT_LEFT,
    DESCRIPTIONS_FILE,
    NO_TOKEN,
    WINDOW,
    TopActivations,
    context_windows,
    describe_latent,
    describe_sae_latents,
    image_feature_examples,
    visual_token_layout,
)

TEXTS = [
    "A red fox jumps over the lazy dog.",
    "The cat sleeps on a warm windowsill.",
    "Boats sail across the harbour at dawn.",
    "A child draws a yellow sun with crayons.",
    "Rain falls on the old stone bridge.",
    "The baker sells fresh bread every morning.",
    "Two dogs chase a ball in the park.",
    "Snow covers the mountain village.",
    "A guitar leans against the wall.",
    "Bees collect nectar from purple flowers.",
]
D_SAE = 24
DEAD = 0  # latent whose encoder is zeroed with a negative bias, so it never fires


def random_windows(n_tokens: int) -> torch.Tensor:
    # Window slot CONTEXT_LEFT contains the token's own id, so a kept window names its token.
    windows = torch.full((n_tokens, WINDOW), NO_TOKEN, dtype=torch.long)
    windows[:, CONTEXT_LEFT] = torch.arange(n_tokens)
    return windows


def test_top_activations_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    latents = torch.relu(torch.randn(300, 12, generator=generator))  # distinct values, so no ties
    latents[:, 3] = 0.0
    windows = random_windows(300)
    top = TopActivations(d_sae=12, n=5)
    start = 0
    for size in (1, 7, 64, 3, 100, 125):  # uneven batches, some smaller than N
        top.update(latents[start : start + size], windows[start : start + size])
        start += size
    assert start == 300

    expected_values, expected_rows = latents.T.topk(5, dim=1)
    for latent in range(12):
        kept = top.top(latent)
        positive = expected_values[latent] > 0
        assert [value for value, _ in kept] == pytest.approx(expected_values[latent][positive].tolist())
        assert [window[CONTEXT_LEFT] for _, window in kept] == expected_rows[latent][positive].tolist()
    assert top.firing.tolist() == (latents > 0).sum(dim=0).tolist()
    assert top.n_tokens == 300


def test_top_activations_dead_latent_keeps_nothing() -> None:
    latents = torch.zeros(10, 3)
    latents[:, 1] = torch.arange(10.0)
    top = TopActivations(d_sae=3, n=4)
    top.update(latents, random_windows(10))
    assert top.top(0) == []
    assert int(top.firing[0]) == 0
    assert [value for value, _ in top.top(1)] == [9.0, 8.0, 7.0, 6.0]


def test_top_activations_rejects_zero_contexts() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        TopActivations(d_sae=3, n=0)


def test_context_windows_stop_at_text_edges() -> None:
    text_ids = torch.tensor([[NO_TOKEN, 10, 11, 12, NO_TOKEN]])  # start token, three text tokens, padding
    windows = context_windows(text_ids)
    assert windows.shape == (1, 5, WINDOW)
    middle = windows[0, 2].tolist()
    assert middle[CONTEXT_LEFT] == 11
    assert middle[CONTEXT_LEFT - 1] == 10
    assert middle[CONTEXT_LEFT + 1 :] == [12, NO_TOKEN]
    assert all(token == NO_TOKEN for token in middle[: CONTEXT_LEFT - 1])


def test_describe_latent_names_frequent_tokens() -> None:
    contexts = [
        {"left": "the big", "token": " Dog", "right": " barked", "activation": 3.0},
        {"left": "a", "token": "cat", "right": "", "activation": 2.0},
        {"left": "two", "token": " dog", "right": "s", "activation": 1.0},
    ]
    description = describe_latent(contexts, firing=5, n_tokens=100, n_texts=10)
    assert description.startswith('"dog", "cat"; e.g. "the big[[ Dog]] barked"')
    assert "5.0% of text tokens" in description


def test_describe_latent_dead() -> None:
    assert describe_latent([], firing=0, n_tokens=100, n_texts=7) == "dead: never fires on the 7 fitting texts"


def small_sae(lm, layer: int, seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=lm.d_model, d_sae=D_SAE))
    with torch.no_grad():
        sae.W_enc.normal_(0.0, 0.05)
        sae.b_enc.fill_(-0.5)
        sae.W_enc[:, DEAD] = 0.0
        sae.b_enc[DEAD] = -1.0
    return sae.eval()


def brute_force_top(lm, sae, layer: int, texts: list[str], n: int) -> list[list[tuple[float, str]]]:
    """Each text alone through the LM; every (activation, token) per latent; top n per latent."""
    per_latent: list[list[tuple[float, str]]] = [[] for _ in range(D_SAE)]
    for text in texts:
        ids = lm.tokenizer(text, add_special_tokens=False).input_ids
        input_ids = torch.tensor([[lm.start_token_id] + ids])
        mask = torch.ones_like(input_ids)
        keep = mask.bool().clone()
        keep[:, 0] = False
        batch = ComposedBatch(lm.embed(input_ids), mask, input_ids, keep, keep)
        with torch.no_grad():
            latents = sae.encode(capture_resid_post(lm, batch, [layer])[layer][0, 1:].float())  # [T, d_sae]
        for latent in range(D_SAE):
            for position, value in enumerate(latents[:, latent].tolist()):
                if value > 0:
                    per_latent[latent].append((value, lm.tokenizer.decode([ids[position]])))
    return [sorted(entries, reverse=True)[:n] for entries in per_latent]


def test_describe_sae_latents_matches_brute_force(smollm2, tmp_path) -> None:
    layer = 5
    sae = small_sae(smollm2, layer)
    records = describe_sae_latents(smollm2, {layer: sae}, TEXTS, tmp_path, n_contexts=4, batch_size=3, max_tokens=48)
    expected = brute_force_top(smollm2, sae, layer, TEXTS, 4)
    latents = records[layer]["latents"]
    assert len(latents) == D_SAE
    assert latents[DEAD]["dead"]
    assert latents[DEAD]["contexts"] == []
    assert latents[DEAD]["description"].startswith("dead:")
    live = [latent for latent in range(D_SAE) if expected[latent]]
    assert len(live) >= D_SAE // 2, "the test SAE should have mostly live latents"
    for latent in live:
        contexts = latents[latent]["contexts"]
        assert [context["activation"] for context in contexts] == pytest.approx([value for value, _ in expected[latent]], rel=1e-3, abs=1e-5)
        assert [context["token"] for context in contexts] == [token for _, token in expected[latent]]
        assert not latents[latent]["dead"]


def test_describe_sae_latents_json_round_trip_and_reuse(smollm2, tmp_path, caplog) -> None:
    layer = 2
    sae = small_sae(smollm2, layer, seed=1)
    first = describe_sae_latents(smollm2, {layer: sae}, TEXTS, tmp_path, n_contexts=3, batch_size=4)
    path = tmp_path / f"layer_{layer:02d}" / DESCRIPTIONS_FILE
    assert json.loads(path.read_text(encoding="utf-8")) == first[layer]
    modified = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="mmalign"):
        again = describe_sae_latents(smollm2, {layer: sae}, TEXTS, tmp_path, n_contexts=3, batch_size=4)
    assert again == first
    assert path.stat().st_mtime_ns == modified
    assert "reused" in caplog.text
    changed = describe_sae_latents(smollm2, {layer: sae}, TEXTS[:5], tmp_path, n_contexts=3, batch_size=4)
    assert changed[layer]["key"] != first[layer]["key"]
    assert changed[layer]["n_texts"] == 5


def test_describe_sae_latents_streams_with_corpus_id(smollm2, tmp_path) -> None:
    layer = 2
    sae = small_sae(smollm2, layer, seed=1)
    records = describe_sae_latents(smollm2, {layer: sae}, iter(TEXTS), tmp_path, n_contexts=2, corpus_id="texts-v1")
    assert records[layer]["n_texts"] == len(TEXTS)


def test_describe_sae_latents_rejects_stream_without_id(smollm2, tmp_path) -> None:
    sae = small_sae(smollm2, 2)
    with pytest.raises(TypeError, match="corpus_id"):
        describe_sae_latents(smollm2, {2: sae}, iter(TEXTS), tmp_path)


def test_describe_sae_latents_rejects_bad_inputs(smollm2, tmp_path) -> None:
    sae = small_sae(smollm2, 2)
    with pytest.raises(ValueError, match="feature_contexts"):
        describe_sae_latents(smollm2, {2: sae}, TEXTS, tmp_path, n_contexts=0)
    with pytest.raises(ValueError, match="no tokens"):
        describe_sae_latents(smollm2, {2: sae}, ["", ""], tmp_path)


def test_visual_token_layout_by_adapter_kind() -> None:
    options = {"pooled_grid": 2, "keep_cls": True, "has_cls_token": True, "n_encoder_tokens": 17}
    assert visual_token_layout(LinearAdapter(8, 16, **options)) == {"cls": True, "grid": 2, "n_visual_tokens": 5}
    prefix = LinearPrefixAdapter(8, 16, prefix_tokens=3, **options)
    assert visual_token_layout(prefix) == {"cls": False, "grid": None, "n_visual_tokens": 3}


def test_image_feature_examples_match_direct_encoding(smollm2, tmp_path) -> None:
    layers = [2, 5]
    probes = {layer: small_sae(smollm2, layer, seed=layer) for layer in layers}
    descriptions = describe_sae_latents(smollm2, probes, TEXTS, tmp_path, n_contexts=2, batch_size=5)
    torch.manual_seed(0)
    adapter = LinearAdapter(8, smollm2.d_model, pooled_grid=2, keep_cls=True, has_cls_token=True, n_encoder_tokens=17).eval()
    vision_tokens = torch.randn(2, 17, 8)
    captions = ["A red fox.", "Two dogs in a park."]
    prompt = build_prompt(smollm2)
    examples = image_feature_examples(smollm2, adapter, vision_tokens, captions, prompt, 32, probes, descriptions,
                                      top_k=3, max_density=1.0)
    assert examples["layout"] == {"cls": True, "grid": 2, "n_visual_tokens": 5}
    assert examples["layers"] == layers

    with torch.no_grad():
        batch = compose(smollm2, captions, prompt, 32, adapter(vision_tokens))
        hidden = capture_resid_post(smollm2, batch, layers)
    for layer in layers:
        latents = probes[layer].encode(hidden[layer][batch.image_mask].view(2, 5, -1).float())  # [2, 5, d_sae]
        for image in range(2):
            entry = examples["images"][image]["layers"][str(layer)]
            assert len(entry["tokens"]) == 5
            summed = latents[image].sum(dim=0)
            expected = [int(i) for i in summed.topk(3).indices if summed[i] > 0]
            assert [item["latent"] for item in entry["top"]] == expected
            for position, token in enumerate(entry["tokens"]):
                value, index = latents[image, position].max(dim=0)
                assert token["strongest"] == (int(index) if value > 0 else None)
                assert token["l0"] == int((latents[image, position] > 0).sum())
            named = {item["latent"] for item in entry["top"]} | {t["strongest"] for t in entry["tokens"] if t["strongest"] is not None}
            assert named <= {int(key) for key in examples["latents"][str(layer)]}


def test_image_feature_examples_rank_dense_latents_last(smollm2, tmp_path) -> None:
    layer = 5
    probes = {layer: small_sae(smollm2, layer, seed=3)}
    descriptions = describe_sae_latents(smollm2, probes, TEXTS, tmp_path, n_contexts=2)
    adapter = LinearAdapter(8, smollm2.d_model, pooled_grid=2, keep_cls=True, has_cls_token=True, n_encoder_tokens=17).eval()
    densities = torch.tensor([latent["density"] for latent in descriptions[layer]["latents"]])
    cut = float(densities.median())
    dense = densities > cut
    vision_tokens = torch.randn(1, 17, 8)
    prompt = build_prompt(smollm2)
    examples = image_feature_examples(smollm2, adapter, vision_tokens, ["A fox."], prompt, 32,
                                      probes, descriptions, top_k=D_SAE, max_density=cut)
    entry = examples["images"][0]["layers"][str(layer)]

    with torch.no_grad():
        batch = compose(smollm2, ["A fox."], prompt, 32, adapter(vision_tokens))
        hidden = capture_resid_post(smollm2, batch, [layer])[layer]
        latents = probes[layer].encode(hidden[batch.image_mask].float())  # [5, d_sae]
    fired = latents.sum(dim=0) > 0
    assert bool((fired & dense).any()), "the test needs a dense latent that fires"
    assert bool((fired & ~dense).any()), "the test needs a non-dense latent that fires"
    flags = [bool(dense[item["latent"]]) for item in entry["top"]]
    assert flags == sorted(flags), "every non-dense latent ranks before every dense one"
    assert len(entry["top"]) == int(fired.sum())
    for position, token in enumerate(entry["tokens"]):
        if bool(((latents[position] > 0) & ~dense).any()):
            assert not dense[token["strongest"]]
    for latent, info in examples["latents"][str(layer)].items():
        assert info["dense"] == bool(dense[int(latent)])
    assert entry["n_dense_active"] == int(((latents > 0).any(dim=0) & dense).sum())
