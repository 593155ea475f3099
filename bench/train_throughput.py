"""Benchmark adapter training: the vision feature cache, and the LM forward+backward on CPU.

Prints, side by side in one process:
  1. steps/s with cached vision features vs recomputing the frozen encoder every step;
  2. LM forward+backward tokens/s and its share of the measured fp32 matmul peak;
  3. the avoidable costs removed in mmalign (LM head on every position, padding from
     unsorted lengths, repeated tokenization), each measured before and after.

Run: .venv/bin/python bench/train_throughput.py [--steps N] [--batch-size B]
Uses the bundled models and Tux Paint data (or the pip-only samples when it is missing).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mmalign.adapters.compose import build_prompt, compose
from mmalign.adapters.linear import LinearAdapter
from mmalign.capture import caption_loss
from mmalign.data import DatasetError, load_dataset
from mmalign.lm import load_lm
from mmalign.vision import load_vision_encoder


def timed(function, repeats: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def matmul_peak(size: int = 1024, repeats: int = 20) -> float:
    """Return measured fp32 matmul FLOP/s on this machine."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = timed(lambda: a @ b, repeats)
    return 2 * size**3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per variant.")
    parser.add_argument("--batch-size", type=int, default=16, help="Image-caption pairs per step.")
    args = parser.parse_args()

    try:
        dataset = load_dataset("tuxpaint")
    except DatasetError:
        dataset = load_dataset("samples")
    encoder = load_vision_encoder("bundled:dinov2-small", 224)
    lm = load_lm("bundled:smollm2-135m")
    prompt = build_prompt(lm)
    batch = args.batch_size
    images = [dataset.load_image(i) for i in range(batch)]
    captions = [dataset.items[i].caption for i in range(batch)]
    cached = encoder.encode(images)
    adapter = LinearAdapter(encoder.d_model, lm.d_model, pooled_grid=4, keep_cls=True, has_cls_token=True,
                            n_encoder_tokens=cached.shape[1])
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)

    def train_step(tokens: torch.Tensor) -> None:
        loss, count = caption_loss(lm, compose(lm, captions, prompt, 32, adapter(tokens)))
        optimizer.zero_grad()
        (loss / count).backward()
        optimizer.step()

    with_cache = timed(lambda: train_step(cached), args.steps)
    recompute = timed(lambda: train_step(encoder.encode(images)), args.steps)
    print(f"1. training step: cached features {with_cache:.2f} s, recomputing the encoder {recompute:.2f} s, "
          f"speedup {recompute / with_cache:.2f}x")

    # 2. LM forward+backward throughput against the matmul peak
    composed = compose(lm, captions, prompt, 32, adapter(cached).detach())
    n_tokens = int(composed.attention_mask.sum())
    n_params = sum(p.numel() for p in lm.model.model.parameters())
    seconds = with_cache
    # forward 2 FLOP per parameter per token; backward to the inputs only (weights frozen) about 2 more
    achieved = 4 * n_params * n_tokens / seconds
    peak = matmul_peak()
    print(f"2. LM forward+backward: {n_tokens / seconds:.0f} tokens/s, about {achieved / 1e9:.1f} GFLOP/s "
          f"of a measured {peak / 1e9:.1f} GFLOP/s matmul peak ({100 * achieved / peak:.0f} %), "
          f"{torch.get_num_threads()} threads")

    # 3a. the LM head on every position (what model(..., labels=...) does) vs only labelled positions
    def loss_full_head() -> None:
        hidden = lm.model.model(inputs_embeds=composed.inputs_embeds, attention_mask=composed.attention_mask).last_hidden_state
        logits = lm.model.lm_head(hidden)[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), composed.labels[:, 1:].reshape(-1), ignore_index=-100).backward()

    def loss_labelled_head() -> None:
        composed.inputs_embeds.requires_grad_(True)
        loss, count = caption_loss(lm, composed)
        (loss / count).backward()

    composed.inputs_embeds.requires_grad_(True)
    full, labelled = timed(loss_full_head, args.steps), timed(loss_labelled_head, args.steps)
    print(f"3a. LM head: every position {full:.2f} s, labelled positions only {labelled:.2f} s, speedup {full / labelled:.2f}x")

    # 3b. padding: batches of random lengths vs batches of similar length
    texts = [item.caption for item in dataset.items[:128]]
    lengths = [len(lm.tokenizer(text).input_ids) for text in texts]
    by_length = [text for _, text in sorted(zip(lengths, texts))]

    def padded_tokens(order: list[str]) -> tuple[int, int]:
        total = real = 0
        for start in range(0, len(order), batch):
            chunk = [len(lm.tokenizer(t).input_ids) for t in order[start : start + batch]]
            total += max(chunk) * len(chunk)
            real += sum(chunk)
        return total, real

    unsorted_total, real = padded_tokens(texts)
    sorted_total, _ = padded_tokens(by_length)
    print(f"3b. padding (text activations for SAE fitting): {100 * (unsorted_total - real) / unsorted_total:.0f} % "
          f"padding in dataset order, {100 * (sorted_total - real) / sorted_total:.0f} % sorted by length")

    # 3c. tokenization: every step vs memoized per caption
    lm.token_cache.clear()
    fresh = timed(lambda: (lm.token_cache.clear(), compose(lm, captions, prompt, 32, None)), args.steps * 4)
    memo = timed(lambda: compose(lm, captions, prompt, 32, None), args.steps * 4)
    print(f"3c. composing a batch: tokenizing each time {1000 * fresh:.1f} ms, memoized {1000 * memo:.1f} ms")


if __name__ == "__main__":
    main()
