"""Scoring cost per byte: exact byte-level wrapper against token-level scoring of the same texts.

Token-level scoring is one forward pass over the start token and the canonical tokenization.
Byte-level scoring is `ByteLevelLM.score`, which feeds every valid tokenization needed in one
forward pass with a tree attention mask. Both run in this process, one after the other on
each caption, so they share the machine's load.

The first byte-level pass is "cold": it also builds the pairwise validity rows of each new
token (cached afterwards). Later passes are "warm".

Run: .venv/bin/python bench/bytelevel_cost.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmalign.lm import load_lm
from mmalign.loops.bytelevel import ByteLevelLM

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play with a frisbee in a grassy park.",
    "A plate of pasta with tomato sauce and basil.",
    "A red double-decker bus drives down a city street.",
    "A woman holds an umbrella while walking in the rain.",
    "Several zebras graze near a watering hole.",
    "A child blows out candles on a birthday cake.",
    "An old wooden boat is tied to a dock at sunset.",
    "A cat sleeps on a laptop keyboard.",
    "A train crosses a bridge over a river.",
    "Skiers wait in line for the chair lift.",
    "A bowl of fruit sits on a kitchen counter.",
    "A giraffe stretches its neck to eat leaves from a tree.",
    "People fly kites on a windy beach.",
    "A stop sign stands at the corner of an empty road.",
    "A baseball player swings at a pitch.",
    "Two horses pull a cart through a snowy field.",
    "A laptop, a mug and a notebook on a desk.",
    "A pizza with mushrooms and olives cut into slices.",
    "An airplane takes off from a busy airport runway.",
]


def token_level_score(lm, text: str) -> float:
    """Return log P(canonical tokens of text) from one forward pass."""
    ids = [lm.start_token_id] + lm.tokenizer(text, add_special_tokens=False).input_ids
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = lm.model(input_ids=input_ids, use_cache=False).logits[0, :-1]  # [T, V]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return float(logprobs.gather(1, input_ids[0, 1:, None]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="warm passes over the captions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_lm("bundled:smollm2-135m")
    start = time.perf_counter()
    byte_lm = ByteLevelLM(lm.model, lm.tokenizer)
    setup_s = time.perf_counter() - start
    texts = [caption.encode() for caption in CAPTIONS]
    n_bytes = sum(len(text) for text in texts)
    token_level_score(lm, CAPTIONS[0])  # warm up the model's kernels

    def timed_pass(label: str) -> tuple[float, float, list[float], list[float]]:
        token_s, byte_s, token_scores, byte_scores = 0.0, 0.0, [], []
        for caption, text in zip(CAPTIONS, texts):
            start = time.perf_counter()
            token_scores.append(token_level_score(lm, caption))
            token_s += time.perf_counter() - start
            start = time.perf_counter()
            byte_scores.append(byte_lm.score(text))
            byte_s += time.perf_counter() - start
        print(
            f"{label:>6}: token-level {1e3 * token_s / n_bytes:6.2f} ms/byte, "
            f"byte-level {1e3 * byte_s / n_bytes:6.2f} ms/byte, ratio {byte_s / token_s:5.2f}"
        )
        return token_s, byte_s, token_scores, byte_scores

    print(f"{len(texts)} captions, {n_bytes} bytes, {args.threads} threads; validity tables built in {setup_s:.1f} s")
    _, _, token_scores, byte_scores = timed_pass("cold")
    ratios = []
    for repeat in range(args.repeats):
        token_s, byte_s, _, _ = timed_pass(f"warm {repeat + 1}")
        ratios.append(byte_s / token_s)
    gap = statistics.mean((b - t) / len(x) for b, t, x in zip(byte_scores, token_scores, texts))
    print(f"median warm ratio (byte-level / token-level): {statistics.median(ratios):.2f}")
    print(f"mean log-prob gain per byte of byte-level over the canonical tokenization: {gap:.4f} nats")
    n_tokens = sum(len(lm.tokenizer(caption, add_special_tokens=False).input_ids) for caption in CAPTIONS)
    passes = 1 + args.repeats
    print(f"tokens per pass: canonical {n_tokens}, fed by the byte-level tree {byte_lm.tree.n_forward_tokens // passes}")


if __name__ == "__main__":
    main()
