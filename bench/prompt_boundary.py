"""Measure the prompt boundary problem: token-level vs byte-level next characters after a cut prompt.

For each caption, the prompt is cut inside its last token. The token-level LM sees the
cut prompt's own tokenization and its next-token distribution (grouped by first byte);
the byte-level LM marginalizes over every tokenization that covers the cut. The script
prints, per example, the probability each gives to the true next byte and their total
variation distance, then the means.

Run: .venv/bin/python bench/prompt_boundary.py [--examples N]
"""

from __future__ import annotations

import argparse
import statistics

from mmalign.lm import load_lm
from mmalign.loops.bytelevel import ByteLevelLM, prompt_boundary_demo

TEXTS = [
    "A photograph of a chimpanzee sitting in the grass.",
    "A red double-decker bus on a city street.",
    "A bowl of strawberries on a wooden table.",
    "A sailboat on the ocean at sunset.",
    "An orange cat sleeping on a blue blanket.",
    "A bicycle leaning against a brick wall.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=len(TEXTS), help="Number of example texts.")
    args = parser.parse_args()
    lm = load_lm("bundled:smollm2-135m")
    distances, token_true, byte_true = [], [], []
    for text in TEXTS[: args.examples]:
        words = text.split(" ")
        cut = len(" ".join(words[:-1])) + 1 + max(1, len(words[-1]) // 2)  # inside the last word
        byte_lm = ByteLevelLM(lm.model, lm.tokenizer)
        result = prompt_boundary_demo(byte_lm, text, cut)
        distances.append(result["total_variation"])
        token_true.append(result.get("token_level_true_next", float("nan")))
        byte_true.append(result.get("byte_level_true_next", float("nan")))
        print(f"{text[:cut]!r} | next {text[cut]!r}: token-level {token_true[-1]:.3f}, "
              f"byte-level {byte_true[-1]:.3f}, total variation {distances[-1]:.3f}")
    print(f"mean total variation {statistics.mean(distances):.3f}; mean probability of the true next byte: "
          f"token-level {statistics.mean(token_true):.3f}, byte-level {statistics.mean(byte_true):.3f}")


if __name__ == "__main__":
    main()
