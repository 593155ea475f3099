"""Self-adapting treatment: the captioner writes its own fine-tuning data (self-edits) and learns which help.

Adapted from Zweiger et al. 2025, "Self-Adapting Language Models" (SEAL, arXiv 2506.10943).
The captioner is the adapter plus the LM; the LM carries a LoRA (peft), the self-edit
generator, which starts at zero. One outer round (ReST-EM):

1. For each sampled training image, sample `n_self_edits` self-edits from the adapter and
   the LM after a self-edit prompt (kinds: implications, paraphrases, further description).
2. Inner loop: fine-tune a copy of the adapter (and, with `inner_lm_lora`, the LoRA) for
   `inner_steps` steps on (image, self-edit) as a caption. The reward is the decrease of the
   mean caption loss on held-out (image, caption) pairs: other training images of the same
   category, never one whose caption is the image's own.
3. Keep each image's best self-edit(s) with a positive reward (`select_self_edits`).
4. Fine-tune the generator LoRA on the kept (image, prompt, self-edit) examples, then the
   adapter on the kept (image, self-edit) pairs as captions. The result is saved as
   `R<i>/`: an adapter checkpoint plus `lm_lora/` (peft `save_pretrained`).

Because the LM changes, the SAE probes fitted on the original LM measure drift in its own
feature space. Per probed layer, the drift is the SAE reconstruction (FVU, MSE) of the
text-only tokens of a fixed set of validation captions with the changed LM minus that with
the original LM. A K-step
sequential retention matrix applies K kept self-edits one after another and, after edit j,
re-measures the reward of every earlier edit i <= j. Forgetting shows as entries that shrink
down a column.

Differences from the paper: the model is a 135M LM with a linear adapter, and the reward is
a caption loss rather than question-answering accuracy. Each round continues from the
previous round's adapter and LoRA rather than restarting from the base model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmalign.adapters.base import Adapter
from mmalign.adapters.checkpoint import CONFIG_NAME, load_checkpoint, save_checkpoint
from mmalign.adapters.compose import PromptTemplate, build_prompt, compose
from mmalign.adapters.train import validation_loss
from mmalign.capture import caption_loss, capture_resid_post
from mmalign.io import stable_hash, write_atomic
from mmalign.lm import LanguageModel, describe_lm
from mmalign.loops.base import TreatedCheckpoint, Treatment, TreatmentContext, register_treatment, validate_options
from mmalign.loops.sampling import sample_captions
from mmalign.loops.self_rewarding import from_json, greedy_samples, json_ready, read_record
from mmalign.pipeline import probe_stage
from mmalign.probes.fidelity import FidelityStats, fidelity_metrics

logger = logging.getLogger("mmalign.loops")

METRICS_NAME = "self_adapting.json"
EDITS_NAME = "self_edits.jsonl"
DRIFT_NAME = "drift.json"
RETENTION_NAME = "retention.json"
LM_LORA_DIR = "lm_lora"
ROUND_NAME = re.compile(r"^R\d+$")  # round directories R1, R2, ...

# Self-edit prompt per kind: (text after the image in the plain style, instruction in the chat style).
SELF_EDIT_PROMPTS: dict[str, tuple[str, str]] = {
    "implications": ("What this picture implies:", "List what follows from what this image shows."),
    "paraphrases": ("The same picture in other words:", "Say in other words what this image shows."),
    "further_description": ("More about this picture:", "Describe further what this image shows."),
}
PromptKind = Literal["implications", "paraphrases", "further_description"]


class SelfAdaptingOptions(BaseModel):
    """Settings of the self-adapting treatment, read from the config's `treatment:` mapping.

    The paper's values are 2 rounds, k = 5 self-edits per context, LoRA r 32 / alpha 64 and
    10 inner epochs at lr 1e-3, K = 8 sequential edits. The defaults here are smaller, for a
    135M LM on CPU. The inner learning rate is lower than the paper's LoRA rate because the
    adapter trains in full. On the demo run, 3 AdamW steps at 1e-3 raised the held-out loss
    for all 18 self-edits of a round (by 0.67 nats per token on average). At 3e-5 about a
    third of the rewards were positive.
    """

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(2, ge=1, description="ReST-EM rounds; each saves a treated checkpoint R<i>.")
    images_per_round: int | None = Field(8, ge=1, description="Training images sampled per round; null uses all with a held-out set.")
    n_self_edits: int = Field(5, ge=1, description="Self-edits sampled per image (k).")
    prompt_kinds: list[PromptKind] = Field(
        default_factory=lambda: ["implications", "paraphrases", "further_description"], min_length=1,
        description="Self-edit prompts; self-edit j of an image uses kind j modulo their number.",
    )
    temperature: float = Field(0.7, gt=0.0, description="Sampling temperature of self-edits.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus (top-p) mass of self-edits.")
    max_new_tokens: int = Field(32, ge=1, description="Self-edit length cap in tokens.")
    held_out_captions: int = Field(4, ge=1, description="Held-out pairs of the same category scored per image.")
    inner_steps: int = Field(4, ge=1, description="Optimizer steps of the inner fine-tune on one self-edit.")
    inner_lr: float = Field(3e-5, gt=0.0, description="AdamW learning rate of the inner fine-tune.")
    inner_lm_lora: bool = Field(False, description="The inner fine-tune also trains the LM LoRA (restored after scoring).")
    keep_per_image: int = Field(1, ge=1, description="Best self-edits kept per image (only those with reward > 0).")
    lora_r: int = Field(8, ge=1, description="LoRA rank of the self-edit generator.")
    lora_alpha: float = Field(16.0, gt=0.0, description="LoRA scale numerator (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="LM module names that get a LoRA."
    )
    generator_lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate of the generator LoRA on kept self-edits.")
    generator_epochs: int = Field(2, ge=1, description="Passes over the kept self-edits for the generator LoRA.")
    adapter_lr: float = Field(3e-5, gt=0.0, description="AdamW learning rate of the adapter update on kept self-edits.")
    adapter_epochs: int = Field(2, ge=1, description="Passes over the kept self-edits for the adapter.")
    batch_size: int = Field(4, ge=1, description="Examples per optimizer step of the outer updates.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping by global norm; null disables it.")
    retention_edits: int = Field(3, ge=0, description="K of the sequential retention matrix; 0 switches it off.")
    drift_texts: int = Field(32, ge=1, description="Validation captions run text-only to measure LM drift.")
    seed: int | None = Field(None, description="Seed of the treatment; null uses the treatment context's seed.")

    @field_validator("prompt_kinds")
    @classmethod
    def _distinct_kinds(cls, kinds: list[str]) -> list[str]:
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"prompt kinds must be distinct, got {kinds}")
        return kinds

    @model_validator(mode="after")
    def _keep_within_samples(self) -> "SelfAdaptingOptions":
        if self.keep_per_image > self.n_self_edits:
            raise ValueError(
                f"keep_per_image ({self.keep_per_image}) exceeds n_self_edits ({self.n_self_edits}); "
                "lower keep_per_image or sample more self-edits"
            )
        return self


def parse_options(options: dict[str, Any]) -> SelfAdaptingOptions:
    """Validate the `treatment:` mapping.

    Raises:
        ValueError: naming each invalid or unknown field and its value.
    """
    return validate_options(SelfAdaptingOptions, options, "self-adapting")


# ReST-EM selection and held-out sets: pure functions.

@dataclass(frozen=True)
class KeptEdit:
    """A self-edit kept by ReST-EM, by index into its image's samples."""

    image: int
    edit: int
    reward: float


def select_self_edits(rewards: Sequence[Sequence[float | None]], keep: int = 1) -> tuple[list[KeptEdit], int]:
    """Keep the `keep` highest-reward self-edits of each image whose reward is above 0.

    Unscored self-edits (None, e.g. empty texts) and NaN rewards are left out. Among equal
    rewards the earlier self-edit is taken.

    Returns:
        The kept self-edits in image order, and the number of images with none kept.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    kept: list[KeptEdit] = []
    n_without = 0
    for image, image_rewards in enumerate(rewards):
        positive = [(reward, index) for index, reward in enumerate(image_rewards)
                    if reward is not None and not math.isnan(reward) and reward > 0]
        best = sorted(positive, key=lambda item: (-item[0], item[1]))[:keep]
        if not best:
            n_without += 1
        kept.extend(KeptEdit(image, index, float(reward)) for reward, index in best)
    return kept, n_without


def held_out_rows(row: int, candidates: Sequence[int], categories: Sequence[str], captions: Sequence[str], n: int, seed: int) -> list[int]:
    """Return up to `n` other rows of `row`'s category whose caption differs from its own.

    Args:
        row: The image whose self-edits are scored.
        candidates: Rows the held-out set may come from (the training rows).
        categories: Category of every row of the dataset.
        captions: Caption of every row of the dataset.
        n: Largest held-out set.
        seed: Seed of the draw when more than `n` rows qualify.
    """
    own_caption = captions[row].strip().casefold()
    pool = [other for other in candidates if other != row and categories[other] == categories[row]
            and captions[other].strip().casefold() != own_caption]
    if len(pool) > n:
        pool = sorted(random.Random(seed * 100_003 + row).sample(pool, n))
    return pool


# The LM LoRA (peft), injected into the run's LM in place and removed afterwards.

class LmLora:
    """A peft LoRA on the run's LM. While it exists every forward pass of `lm.model` uses it.

    Create with `LmLora.new` or `LmLora.load`; call `remove()` to restore the original
    modules (the base weights are never modified, so the LM is the original again).
    """

    def __init__(self, lm: LanguageModel, peft_model) -> None:
        self.lm, self.peft_model = lm, peft_model

    @classmethod
    def new(cls, lm: LanguageModel, options: SelfAdaptingOptions) -> "LmLora":
        """Inject a fresh LoRA (zero update: peft initializes B to zero)."""
        from peft import LoraConfig, get_peft_model

        names = {name.rsplit(".", 1)[-1] for name, _ in lm.model.named_modules()}
        missing = [name for name in options.lora_target_modules if name not in names]
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in lm.model.named_modules() if isinstance(module, torch.nn.Linear)})
            raise ValueError(f"lora_target_modules {missing} are not modules of {lm.lm_id}; its linear modules are {linear}")
        config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                            target_modules=list(options.lora_target_modules), bias="none")
        return cls(lm, get_peft_model(lm.model, config))

    @classmethod
    def load(cls, lm: LanguageModel, directory: Path, trainable: bool = True) -> "LmLora":
        """Inject a LoRA saved with `save` (peft `save_pretrained`)."""
        from peft import PeftModel

        if not (Path(directory) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"LM LoRA not found in {directory}: adapter_config.json is missing; "
                                    "pass a directory written by LmLora.save (a treated checkpoint's lm_lora/)")
        return cls(lm, PeftModel.from_pretrained(lm.model, str(directory), is_trainable=trainable))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for name, parameter in self.peft_model.named_parameters() if "lora_" in name]

    def trainable(self, flag: bool) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(flag)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach().clone() for name, parameter in self.peft_model.named_parameters() if "lora_" in name}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, parameter in self.peft_model.named_parameters():
                if name in state:
                    parameter.copy_(state[name])

    @contextmanager
    def original(self) -> Iterator[None]:
        """Run the block with the LoRA switched off, i.e. with the original LM."""
        with self.peft_model.disable_adapter():
            yield

    @torch.no_grad()
    def delta_norm(self) -> float:
        """Return sqrt of the summed squared Frobenius norms of the weight updates scale * B A."""
        total = 0.0
        for module in self.peft_model.modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not isinstance(lora_a, torch.nn.ModuleDict):
                continue
            for name in lora_a:
                update = module.scaling[name] * (lora_b[name].weight @ lora_a[name].weight)  # [out, in]
                total += float(update.double().pow(2).sum())
        return math.sqrt(total)

    def save(self, directory: Path) -> None:
        self.peft_model.save_pretrained(str(directory))

    def remove(self) -> None:
        """Take the LoRA layers out of the LM; `lm.model` is the original model object again."""
        self.lm.model = self.peft_model.unload()
        if hasattr(self.lm.model, "peft_config"):
            del self.lm.model.peft_config


@contextmanager
def lm_lora_applied(lm: LanguageModel, directory: Path) -> Iterator[LmLora]:
    """Apply a saved LM LoRA for the block (frozen), and remove it afterwards even on error."""
    lora = LmLora.load(lm, directory, trainable=False)
    try:
        yield lora
    finally:
        lora.remove()


def evaluate_with_lm_lora(evaluator, lora_dir: Path, adapter: Adapter, vision_tokens: torch.Tensor, checkpoint: str,
                          treatment: str):
    """Evaluate a treated checkpoint whose LM carries a LoRA, with the LoRA applied.

    A second evaluator with the same settings recomputes the text token group with the
    changed LM; its bootstrap replicates are copied into `evaluator`, which resamples the
    same images, so paired differences against the baseline stay paired.

    Returns:
        What `Evaluator.evaluate` returns.
    """
    from mmalign.evaluate import Evaluator

    with lm_lora_applied(evaluator.lm, lora_dir):
        changed = Evaluator(evaluator.lm, evaluator.probes, evaluator.prompt, evaluator.captions, evaluator.categories,
                            evaluator.max_caption_tokens, evaluator.config, evaluator.seed)
        result = changed.evaluate(adapter, vision_tokens, checkpoint, treatment)
    evaluator.replicates[checkpoint] = changed.replicates[checkpoint]
    return result


# Drift in the LM's own feature space.

@torch.no_grad()
def text_reconstruction(lm: LanguageModel, probes: dict, texts: list[str], prompt: PromptTemplate, max_tokens: int,
                        batch_size: int) -> dict[int, dict[str, float]]:
    """Return each probe's FVU and MSE on the text-only caption tokens of `texts` with the LM as it is now."""
    layers = sorted(probes)
    stats = {layer: FidelityStats.zeros(len(texts), int(probes[layer].cfg.d_in), int(probes[layer].cfg.d_sae), track_density=False)
             for layer in layers}
    for start in range(0, len(texts), batch_size):
        batch = compose(lm, texts[start : start + batch_size], prompt, max_tokens, None)
        hidden = capture_resid_post(lm, batch, layers)  # layer -> [B, L, D]
        mask = batch.caption_mask.cpu()
        rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask] + start  # [M]
        for layer in layers:
            tokens = hidden[layer].float().cpu()[mask]  # [M, D]
            latents = probes[layer].encode(tokens)
            stats[layer].update(tokens, probes[layer].decode(latents), latents, rows)
    everything = np.ones((1, len(texts)))
    measured = {}
    for layer in layers:
        values = fidelity_metrics(stats[layer], everything, 0.95)
        measured[layer] = {"fvu": values["sae_fvu"].value, "mse": values["sae_mse"].value}
    return measured


def measure_drift(lm: LanguageModel, lora: LmLora, probes: dict, texts: list[str], prompt: PromptTemplate, max_tokens: int,
                  batch_size: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Compare SAE reconstruction of text tokens with the original LM and with the LoRA-changed LM.

    Returns:
        Metrics `drift_fvu_layer_L` and `drift_mse_layer_L` (changed minus original), their
        means, and `lm_lora_delta_norm`; and a record with both sides per layer.
    """
    with lora.original():
        before = text_reconstruction(lm, probes, texts, prompt, max_tokens, batch_size)
    after = text_reconstruction(lm, probes, texts, prompt, max_tokens, batch_size)
    metrics: dict[str, float] = {}
    for layer in sorted(probes):
        metrics[f"drift_fvu_layer_{layer}"] = after[layer]["fvu"] - before[layer]["fvu"]
        metrics[f"drift_mse_layer_{layer}"] = after[layer]["mse"] - before[layer]["mse"]
    metrics["drift_fvu_mean"] = float(np.mean([metrics[f"drift_fvu_layer_{layer}"] for layer in probes]))
    metrics["drift_mse_mean"] = float(np.mean([metrics[f"drift_mse_layer_{layer}"] for layer in probes]))
    metrics["lm_lora_delta_norm"] = lora.delta_norm()
    if metrics["lm_lora_delta_norm"] > 0:
        largest = max(probes, key=lambda layer: abs(metrics[f"drift_fvu_layer_{layer}"]))
        logger.info(
            "LM changed by LoRA: drift of text-token SAE reconstruction over %d texts: FVU %+.5f on average, "
            "largest at layer %d (%.4f -> %.4f); MSE %+.5f on average; LoRA update norm %.4f",
            len(texts), metrics["drift_fvu_mean"], largest, before[largest]["fvu"], after[largest]["fvu"],
            metrics["drift_mse_mean"], metrics["lm_lora_delta_norm"],
        )
    record = {"n_texts": len(texts), "layers": {str(layer): {"original": before[layer], "changed": after[layer]} for layer in sorted(probes)}}
    return metrics, record


# Fine-tuning steps shared by the inner loop and the outer updates.

def train_on_texts(
    lm: LanguageModel, adapter: Adapter, parameters: list[torch.nn.Parameter], vision_tokens: torch.Tensor, texts: list[str],
    prompt: PromptTemplate, max_tokens: int, lr: float, steps: int, batch_size: int, max_grad_norm: float | None, seed: int,
) -> list[float]:
    """Minimize the mean token cross-entropy of `texts` after their images' visual tokens.

    Only `parameters` are updated (adapter weights, LoRA weights or both); gradients flow
    through the LM either way. Batches cycle through a seeded permutation.

    Args:
        vision_tokens: `[N, T, d_vision]` encoder outputs, one row per text.
        texts: N targets, scored after `prompt` like captions.
        steps: Optimizer steps.

    Returns:
        The loss of every step, in nats per token.
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=generator)
    losses = []
    adapter.eval()  # NOTE: adapter dropout stays off, as in the self-rewarding treatment
    for step in range(steps):
        start = (step * batch_size) % len(texts)
        rows = order[start : start + batch_size].tolist()
        visual = adapter(vision_tokens[rows].to(lm.model.device))  # [b, V, d_lm]
        loss_sum, n_tokens = caption_loss(lm, compose(lm, [texts[i] for i in rows], prompt, max_tokens, visual))
        loss = loss_sum / max(n_tokens, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"self-edit fine-tune loss became {value}; lower the learning rate ({lr})")
        losses.append(value)
    return losses


def _epochs_to_steps(n_items: int, epochs: int, batch_size: int) -> int:
    return epochs * math.ceil(n_items / batch_size)


def self_edit_prompt(lm: LanguageModel, style: str, kind: str) -> PromptTemplate:
    """Build the prompt that requests a self-edit of `kind` after the image."""
    text, instruction = SELF_EDIT_PROMPTS[kind]
    return build_prompt(lm, style, prefix=text, instruction=instruction)


@dataclass
class _Scored:
    """Scoring inputs of one image: its row, its held-out rows and their caption loss before any edit."""

    row: int
    held_out: list[int]
    base_loss: float


class _Round:
    """One outer round on the run's data; see the module docstring."""

    def __init__(self, run, adapter: Adapter, lora: LmLora, probes: dict, options: SelfAdaptingOptions, index: int, seed: int):
        self.run, self.lm, self.adapter, self.lora, self.probes = run, run.lm, adapter, lora, probes
        self.options, self.index = options, index
        self.seed = seed * 1000 + index
        self.max_tokens = run.config.train.max_caption_tokens
        self.batch_size = run.config.eval.batch_size
        self.captions = [item.caption for item in run.dataset.items]
        self.categories = [item.category for item in run.dataset.items]
        style = getattr(getattr(run.config, "adapter", None), "prompt_style", "plain")
        self.edit_prompts = {kind: self_edit_prompt(self.lm, style, kind) for kind in options.prompt_kinds}

    def held_out_loss(self, adapter: Adapter, rows: list[int], texts: list[str] | None = None) -> float:
        """Return the mean caption loss (nats per token) of `texts` (default: the rows' captions) after the rows' images."""
        texts = [self.captions[row] for row in rows] if texts is None else texts
        with torch.no_grad():
            return validation_loss(self.lm, adapter, self.run.tokens[rows], texts, self.run.prompt, self.max_tokens, self.batch_size)

    def generator_loss(self, rows: list[int], texts: list[str], kinds: list[str]) -> float:
        """Return the generator's mean loss on self-edits after their images and self-edit prompts, weighted by examples."""
        total = 0.0
        for kind in dict.fromkeys(kinds):
            members = [k for k, name in enumerate(kinds) if name == kind]
            with torch.no_grad():
                loss = validation_loss(self.lm, self.adapter, self.run.tokens[[rows[k] for k in members]], [texts[k] for k in members],
                                       self.edit_prompts[kind], self.max_tokens, self.batch_size)
            total += loss * len(members)
        return total / len(kinds)

    def inner_update(self, adapter: Adapter, row: int, edit: str, seed: int) -> Adapter:
        """Fine-tune a copy of `adapter` (and the LoRA in place, with `inner_lm_lora`) on one self-edit."""
        updated = copy.deepcopy(adapter).requires_grad_(True)
        parameters = [p for p in updated.parameters() if p.requires_grad]
        self.lora.trainable(self.options.inner_lm_lora)
        if self.options.inner_lm_lora:
            parameters += self.lora.parameters()
        train_on_texts(self.lm, updated, parameters, self.run.tokens[[row]], [edit], self.run.prompt, self.max_tokens,
                       self.options.inner_lr, self.options.inner_steps, 1, self.options.max_grad_norm, seed)
        self.lora.trainable(False)
        return updated.eval().requires_grad_(False)

    def sample_rows(self) -> tuple[list[_Scored], int]:
        """Draw the round's images among training rows that have a held-out set; count those without one."""
        options = self.options
        with_held_out, n_without = [], 0
        for row in self.run.train_rows:
            held_out = held_out_rows(row, self.run.train_rows, self.categories, self.captions, options.held_out_captions, self.seed)
            if held_out:
                with_held_out.append((row, held_out))
            else:
                n_without += 1
        if not with_held_out:
            raise ValueError("no training image shares its category with another image, so no held-out captions exist; "
                             "self-adapting needs a dataset with categories (e.g. data.spec: tuxpaint)")
        n_images = min(options.images_per_round or len(with_held_out), len(with_held_out))
        chosen = sorted(random.Random(self.seed).sample(range(len(with_held_out)), n_images))
        return [_Scored(*with_held_out[i], base_loss=math.nan) for i in chosen], n_without

    def sample_self_edits(self, rows: list[int]) -> list[list[tuple[str, str]]]:
        """Return per image `n_self_edits` (kind, text) pairs; self-edit j uses kind j modulo the kinds."""
        kinds, n = self.options.prompt_kinds, self.options.n_self_edits
        with torch.no_grad():
            visual = self.adapter.eval()(self.run.tokens[rows].to(self.lm.model.device))  # [k, V, d_lm]
        per_kind = {}
        for number, kind in enumerate(kinds):
            count = len(range(number, n, len(kinds)))
            if count:
                per_kind[kind] = sample_captions(self.lm, visual, self.edit_prompts[kind], count, self.options.temperature,
                                                 self.options.top_p, self.options.max_new_tokens, self.seed * 10 + number)
        edits = []
        for image in range(len(rows)):
            used = {kind: 0 for kind in per_kind}  # self-edits of each kind already placed for this image
            image_edits = []
            for j in range(n):
                kind = kinds[j % len(kinds)]
                image_edits.append((kind, per_kind[kind][image][used[kind]]))
                used[kind] += 1
            edits.append(image_edits)
        return edits

    def retention(self, chosen: list[tuple[_Scored, str]]) -> list[list[float]]:
        """Apply the chosen self-edits one after another; row j contains the rewards of edits 1..j after edit j."""
        lora_state = self.lora.state()
        current = self.adapter
        matrix = []
        for j, (scored, edit) in enumerate(chosen):
            current = self.inner_update(current, scored.row, edit, self.seed * 7 + j)
            matrix.append([earlier.base_loss - self.held_out_loss(current, earlier.held_out) for earlier, _ in chosen[: j + 1]])
        self.lora.load_state(lora_state)
        return matrix

    def run_round(self) -> dict[str, Any]:
        """Sample, score, select, update; returns the outcome (adapter None when nothing was kept)."""
        options, lm = self.options, self.lm
        started = time.perf_counter()
        self.lora.trainable(False)
        self.adapter.eval().requires_grad_(False)
        scored, n_no_held_out = self.sample_rows()
        rows = [item.row for item in scored]

        # 1. Sample self-edits from the current adapter and generator.
        edits = self.sample_self_edits(rows)
        sampled = time.perf_counter()

        # 2. Inner loop: reward of each self-edit on its image's held-out pairs.
        lora_state = self.lora.state()
        rewards: list[list[float | None]] = []
        for image, item in enumerate(scored):
            item.base_loss = self.held_out_loss(self.adapter, item.held_out)
            image_rewards: list[float | None] = []
            for j, (_, text) in enumerate(edits[image]):
                if not text:
                    image_rewards.append(None)
                    continue
                updated = self.inner_update(self.adapter, item.row, text, self.seed * 100 + image * options.n_self_edits + j)
                image_rewards.append(item.base_loss - self.held_out_loss(updated, item.held_out))
                if options.inner_lm_lora:
                    self.lora.load_state(lora_state)
            rewards.append(image_rewards)
        scored_at = time.perf_counter()

        # 3. ReST-EM: keep the best self-edit(s) of each image with a positive reward.
        kept, n_none_kept = select_self_edits(rewards, options.keep_per_image)
        flat = [reward for image_rewards in rewards for reward in image_rewards if reward is not None]
        metrics: dict[str, float] = {
            "round": float(self.index),
            "n_images": float(len(scored)),
            "n_self_edits": float(sum(len(image_edits) for image_edits in edits)),
            "empty_self_edits": float(sum(reward is None for image_rewards in rewards for reward in image_rewards)),
            "mean_self_edit_words": float(np.mean([len(text.split()) for image_edits in edits for _, text in image_edits])),
            "mean_reward": float(np.mean(flat)) if flat else math.nan,
            "max_reward": float(np.max(flat)) if flat else math.nan,
            "positive_reward_share": float(np.mean([reward > 0 for reward in flat])) if flat else math.nan,
            "n_kept": float(len(kept)),
            "n_images_without_kept": float(n_none_kept),
            "mean_kept_reward": float(np.mean([edit.reward for edit in kept])) if kept else math.nan,
            "train_images_without_held_out": float(n_no_held_out),
            "mean_held_out_loss_before": float(np.mean([item.base_loss for item in scored])),
        }
        rewards_by_kind: dict[str, list[float]] = {kind: [] for kind in options.prompt_kinds}
        for image_edits, image_rewards in zip(edits, rewards):
            for (kind, _), reward in zip(image_edits, image_rewards):
                if reward is not None:
                    rewards_by_kind[kind].append(reward)
        for kind, kind_rewards in rewards_by_kind.items():
            metrics[f"mean_reward/{kind}"] = float(np.mean(kind_rewards)) if kind_rewards else math.nan
            metrics[f"n_kept/{kind}"] = float(sum(edits[edit.image][edit.edit][0] == kind for edit in kept))
        cost = {"self_edits_sampled": metrics["n_self_edits"], "sampling_seconds": sampled - started,
                "inner_loop_seconds": scored_at - sampled, "inner_updates": float(len(flat))}
        records = [
            {"image_id": self.run.dataset.items[item.row].image_id, "reference": self.captions[item.row], "kind": kind,
             "self_edit": text, "reward": rewards[image][j],
             "kept": any(edit.image == image and edit.edit == j for edit in kept)}
            for image, item in enumerate(scored) for j, (kind, text) in enumerate(edits[image])
        ]
        logger.info("self-adapting R%d: kept %d of %d self-edits from %d images; mean reward %.4f (kept %.4f)",
                    self.index, len(kept), len(flat), len(scored), metrics["mean_reward"], metrics["mean_kept_reward"])
        outcome: dict[str, Any] = {"adapter": None, "metrics": metrics, "cost": cost, "records": records}
        if not kept:
            cost["wall_seconds"] = time.perf_counter() - started
            return outcome

        # 4. The K-step sequential retention matrix, from the round's starting adapter and LoRA.
        by_reward = sorted(kept, key=lambda edit: -edit.reward)[: options.retention_edits]
        if by_reward:
            retention_from = time.perf_counter()
            matrix = self.retention([(scored[edit.image], edits[edit.image][edit.edit][1]) for edit in by_reward])
            metrics.update(retention_metrics(matrix))
            outcome["retention"] = matrix
            cost["retention_seconds"] = time.perf_counter() - retention_from

        # 5. Outer updates: the generator LoRA on (image, prompt, self-edit), then the adapter on (image, self-edit).
        trained_from = time.perf_counter()
        kept_rows = [scored[edit.image].row for edit in kept]
        kept_texts = [edits[edit.image][edit.edit][1] for edit in kept]
        kept_kinds = [edits[edit.image][edit.edit][0] for edit in kept]
        metrics["generator_loss_before"] = self.generator_loss(kept_rows, kept_texts, kept_kinds)
        self.lora.trainable(True)
        for kind in options.prompt_kinds:
            members = [k for k, name in enumerate(kept_kinds) if name == kind]
            if members:
                steps = _epochs_to_steps(len(members), options.generator_epochs, options.batch_size)
                train_on_texts(
                    lm, self.adapter, self.lora.parameters(), self.run.tokens[[kept_rows[k] for k in members]],
                    [kept_texts[k] for k in members], self.edit_prompts[kind], self.max_tokens, options.generator_lr,
                    steps, options.batch_size, options.max_grad_norm, self.seed + 11,
                )
        self.lora.trainable(False)
        metrics["generator_loss_after"] = self.generator_loss(kept_rows, kept_texts, kept_kinds)
        metrics["adapter_loss_before"] = self.held_out_loss(self.adapter, kept_rows, kept_texts)
        updated = copy.deepcopy(self.adapter).requires_grad_(True)
        train_on_texts(
            lm, updated, [p for p in updated.parameters() if p.requires_grad], self.run.tokens[kept_rows], kept_texts,
            self.run.prompt, self.max_tokens, options.adapter_lr,
            _epochs_to_steps(len(kept), options.adapter_epochs, options.batch_size), options.batch_size,
            options.max_grad_norm, self.seed + 13,
        )
        updated.eval().requires_grad_(False)
        metrics["adapter_loss_after"] = self.held_out_loss(updated, kept_rows, kept_texts)
        metrics["mean_held_out_loss_after"] = float(np.mean([self.held_out_loss(updated, item.held_out) for item in scored]))
        cost["training_seconds"] = time.perf_counter() - trained_from

        # 6. Drift of the LM's own feature space under the generator LoRA.
        drift_from = time.perf_counter()
        texts = list(self.run.val_captions[: options.drift_texts])
        drift_metrics, drift_record = measure_drift(lm, self.lora, self.probes, texts, self.run.prompt, self.max_tokens, self.batch_size)
        metrics.update(drift_metrics)
        cost["drift_seconds"] = time.perf_counter() - drift_from
        cost["wall_seconds"] = time.perf_counter() - started
        outcome.update(adapter=updated, drift=drift_record)
        return outcome


def retention_metrics(matrix: list[list[float]]) -> dict[str, float]:
    """Flatten a lower-triangular retention matrix into metrics `retention_after_J_edit_I` (1-based).

    `retention_forgetting` is the mean over earlier edits i < K of (reward right after edit i)
    minus (reward after the last edit K); positive values mean later edits undid earlier ones.
    """
    metrics = {f"retention_after_{j + 1}_edit_{i + 1}": float(value) for j, row in enumerate(matrix) for i, value in enumerate(row)}
    if len(matrix) >= 2:
        metrics["retention_forgetting"] = float(np.mean([matrix[i][i] - matrix[-1][i] for i in range(len(matrix) - 1)]))
    return metrics


@register_treatment
class SelfAdapting(Treatment):
    """Self-adapting (SEAL) rounds on the adapter and an LM LoRA; see the module docstring.

    Round i writes `R<i>/` (adapter checkpoint, `lm_lora/`, `self_adapting.json` with
    metrics, cost and samples, `self_edits.jsonl`, `drift.json`, `retention.json`) in one
    atomic rename, or `R<i>.skipped.json` when no self-edit had a positive reward. A rerun
    reads finished rounds back and continues from the last one's adapter and LoRA. The LoRA
    is removed from the run's LM before `apply` returns, so the baseline is evaluated on the
    original LM.
    """

    name = "self-adapting"

    def apply(self, checkpoint: Path, context: TreatmentContext) -> list[TreatedCheckpoint]:
        """Run the rounds from `checkpoint` and return the treated checkpoints R1..Rn.

        Raises:
            ValueError: for invalid options, or existing results made with other options.
        """
        options = parse_options(context.options)
        run, lm = context.run, context.run.lm
        seed = options.seed if options.seed is not None else context.seed
        adapter, _ = load_checkpoint(Path(checkpoint), expect_vision=run.encoder.describe(), expect_lm=describe_lm(lm))
        adapter.eval().requires_grad_(False)
        # Raising `rounds` later extends a finished treatment, so it is not part of the fingerprint.
        fingerprint = stable_hash([options.model_dump(exclude={"rounds"}), str(Path(checkpoint).resolve()), seed])
        lora: LmLora | None = None
        lora_source: Path | None = None
        probes: dict | None = None
        treated: list[TreatedCheckpoint] = []
        try:
            for index in range(1, options.rounds + 1):
                directory = context.output_dir / f"R{index}"
                skip_record = context.output_dir / f"R{index}.skipped.json"
                if (directory / METRICS_NAME).is_file() and (directory / CONFIG_NAME).is_file():
                    record = read_record(directory / METRICS_NAME, fingerprint)
                    adapter, _ = load_checkpoint(directory)
                    adapter.eval().requires_grad_(False)
                    lora_source = directory / LM_LORA_DIR
                    treated.append(self._treated(index, directory, record))
                    logger.info("self-adapting R%d: found at %s; not run again", index, directory)
                    continue
                if skip_record.is_file():
                    read_record(skip_record, fingerprint)
                    logger.info("self-adapting R%d: skipped before (no self-edit with a positive reward); not run again", index)
                    continue

                if probes is None:
                    probes = probe_stage(run)[0]
                if lora is None:
                    lora = LmLora.load(lm, lora_source) if lora_source is not None else LmLora.new(lm, options)
                outcome = _Round(run, adapter, lora, probes, options, index, seed).run_round()
                record = {"round": index, "fingerprint": fingerprint, "metrics": json_ready(outcome["metrics"]), "cost": outcome["cost"]}
                if outcome["adapter"] is None:
                    logger.warning("self-adapting R%d: no self-edit had a positive reward; round skipped", index)
                    write_atomic(skip_record, json.dumps({**record, "skipped": "no self-edit with a positive reward"}, indent=2))
                    continue

                adapter = outcome["adapter"]
                record["samples"] = greedy_samples(run, adapter)
                metadata = {
                    **run.checkpoint_metadata(),
                    "treatment": {"name": self.name, "round": index, "source": str(checkpoint), "options": options.model_dump(),
                                  "fingerprint": fingerprint, "lm_lora": LM_LORA_DIR},
                }

                def write_records(staging: Path, record=record, outcome=outcome, lora=lora) -> None:
                    lora.save(staging / LM_LORA_DIR)
                    (staging / EDITS_NAME).write_text("".join(json.dumps(item) + "\n" for item in outcome["records"]), encoding="utf-8")
                    (staging / DRIFT_NAME).write_text(json.dumps(outcome["drift"], indent=2), encoding="utf-8")
                    if "retention" in outcome:
                        (staging / RETENTION_NAME).write_text(json.dumps({"rewards": outcome["retention"]}, indent=2), encoding="utf-8")
                    # Written last: its presence marks a complete round.
                    (staging / METRICS_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")

                save_checkpoint(adapter, directory, metadata, write_extra=write_records)
                treated.append(self._treated(index, directory, record))
        finally:
            if lora is not None:
                lora.remove()
        return treated

    def report_tables(self, output_dir: Path) -> list[dict[str, Any]]:
        """Return the retention matrix of every saved round as a table for the report."""
        from mmalign.reports.retention import retention_tables

        rounds = sorted((int(path.name[1:]), path) for path in Path(output_dir).glob("R*") if ROUND_NAME.match(path.name))
        metrics = {}
        for index, directory in rounds:
            if (directory / METRICS_NAME).is_file():
                metrics[f"{self.name}/R{index}"] = json.loads((directory / METRICS_NAME).read_text(encoding="utf-8"))["metrics"]
        return retention_tables(metrics)

    def _treated(self, index: int, directory: Path, record: dict[str, Any]) -> TreatedCheckpoint:
        return TreatedCheckpoint(name=f"{self.name}/R{index}", directory=directory, metrics=from_json(record["metrics"]),
                                 samples=record.get("samples", []), cost=record["cost"])






