"""Run configuration: pydantic models loaded from YAML and validated once at the edge."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A config file that is missing, unreadable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VisionEncoderConfig(_Section):
    """The frozen vision encoder and how images are fed to it."""

    spec: str = Field("bundled:dinov2-small", description="Loader spec: bundled:NAME, hf:PATH_OR_REPO or open_clip:ARCH@PRETRAINED.")
    image_size: int = Field(224, ge=14, le=1024, description="Square input size in pixels.")
    batch_size: int = Field(16, ge=1, description="Images per encoder forward pass.")
    layer: int = Field(-1, description="Encoder layer whose output feeds the adapter: -1 the last (after the final norm), -2 the second to last, or an index from 0.")


class LMConfig(_Section):
    """The frozen language model."""

    spec: str = Field("bundled:smollm2-135m", description="Loader spec: bundled:NAME, hf:PATH_OR_REPO or gguf:PATH.")


class DataConfig(_Section):
    """The image-caption dataset and its train/validation split."""

    spec: str = Field("tuxpaint", description="Dataset spec: tuxpaint, samples or folder:PATH.")
    exclude_categories: list[str] = Field(default_factory=lambda: ["symbols"], description="Tux Paint categories to leave out.")
    max_images: int | None = Field(None, ge=2, description="Keep at most this many images (a seeded random subset).")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of images held out for validation and evaluation.")


class AdapterConfig(_Section):
    """The adapter from vision-encoder tokens to LM input embeddings, and the prompt around it."""

    kind: Literal["linear", "linear-prefix", "mlp"] = Field(
        "linear", description="linear: one Linear per token (LLaVA); linear-prefix: pooled vector to k tokens (LiMBeR); mlp: Linear-GELU-Linear (LLaVA-1.5)."
    )
    pooled_grid: int | None = Field(4, ge=1, description="The patch grid is average-pooled to pooled_grid x pooled_grid tokens; null keeps the whole grid.")
    keep_cls: bool = Field(True, description="Prepend the encoder's CLS token to the patch tokens.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the selected encoder tokens during training.")
    prefix_tokens: int = Field(4, ge=1, description="linear-prefix: number of visual tokens k.")
    hidden_dim: int | None = Field(None, ge=1, description="mlp: hidden width (default: the LM's d_model).")
    prompt_style: Literal["plain", "chat"] = Field("plain", description="plain: visual tokens, prefix, caption; chat: the LM's chat template with the image in the user turn.")
    prompt_prefix: str = Field("", description="plain: text between the visual tokens and the caption, e.g. 'A picture of'.")
    chat_instruction: str = Field("Describe the image.", description="chat: the user's request after the image.")


class TrainConfig(_Section):
    """Adapter training with AdamW, linear warmup and cosine decay."""

    steps: int = Field(120, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Image-caption pairs per optimizer step, over all processes and accumulation steps.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_fraction: float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps with linear warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping by global norm; null disables it.")
    max_caption_tokens: int = Field(32, ge=2, description="Captions are truncated to this many tokens (the end token included).")
    eval_every: int = Field(40, ge=0, description="Validation loss and sample captions every this many steps; 0 disables.")
    save_every: int = Field(40, ge=0, description="Checkpoint every this many steps (step_000040/ ...); 0 saves only final/.")
    n_sample_captions: int = Field(3, ge=0, description="Validation images captioned at each evaluation.")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, none on CPU.")


class ProbesConfig(_Section):
    """SAE probes fitted on the LM's residual stream over real text."""

    layers: list[int] | Literal["default"] = Field("default", description="LM layers to probe; 'default' is every third layer and the last.")
    source: str = Field(
        "fit",
        description="fit: fit SAEs on text; disk:PATH with {layer} or {layer:02d}, e.g. disk:saes/layer_{layer}; "
        "sae_lens:RELEASE:SAE_ID with {layer}, e.g. sae_lens:gemma-scope-2b-pt-res-canonical:layer_{layer}/width_16k/canonical.",
    )
    model_name: str | None = Field(None, description="The model name loaded SAEs must record (default: the LM spec), e.g. gemma-2-2b for base-model SAEs applied to the -it model.")
    architecture: Literal["standard", "topk", "jumprelu"] = Field("standard", description="SAE architecture when fitting (sae-lens classes).")
    k: int = Field(32, ge=1, description="topk: active latents per token.")
    d_sae: int = Field(1024, ge=8, description="Number of SAE latents.")
    l1_coefficient: float = Field(2.0, ge=0.0, description="L1 sparsity penalty of the ReLU SAE (inputs scaled so their mean squared distance from the mean is d_model).")
    steps: int = Field(250, ge=1, description="SAE optimizer steps per layer.")
    batch_tokens: int = Field(512, ge=8, description="Activations per SAE optimizer step.")
    lr: float = Field(1e-3, gt=0.0, description="SAE learning rate (Adam).")
    wordnet_glosses: int = Field(2000, ge=0, description="WordNet glosses added to the fitting text (0 disables WordNet).")
    max_text_tokens: int = Field(48, ge=4, description="Fitting texts are truncated to this many tokens.")
    lm_batch_size: int = Field(32, ge=1, description="Texts per LM forward pass when collecting activations.")
    text_sources: list[str] = Field(
        default_factory=lambda: ["wordnet", "captions"],
        description="Fitting texts, read in order as a stream: wordnet (probes.wordnet_glosses glosses), captions (the "
        "training captions), file:PATH (UTF-8, one text per non-empty line), hf:PATH[:COLUMN] (a datasets.save_to_disk "
        "folder; column default text).",
    )
    max_fit_texts: int | None = Field(None, ge=1, description="Read at most this many texts per pass over the text sources; null reads them all.")
    buffer_tokens: int = Field(65536, ge=8, description="Activations held per probed layer while fitting; SAE batches are drawn from this buffer, which is refilled from the text stream.")
    checkpoint_every: int = Field(50, ge=1, description="Save the fitting state (SAE weights, Adam state, generators, text position) every this many steps, so an interrupted fit resumes.")

    @field_validator("text_sources")
    @classmethod
    def _check_text_sources(cls, sources: list[str]) -> list[str]:
        if not sources:
            raise ValueError("probes.text_sources is an empty list; give at least one of wordnet, captions, file:PATH, hf:PATH[:COLUMN]")
        for source in sources:
            kind, colon, rest = source.partition(":")
            if source in ("wordnet", "captions") or (kind in ("file", "hf") and colon and rest.strip()):
                continue
            raise ValueError(
                f"probes.text_sources entry {source!r} is not a text source; accepted: wordnet, captions, "
                "file:PATH (a text file, one text per line), hf:PATH[:COLUMN] (a Hugging Face dataset saved with save_to_disk)"
            )
        return sources

    @field_validator("buffer_tokens")
    @classmethod
    def _check_buffer_tokens(cls, buffer_tokens: int, info) -> int:
        max_text_tokens = info.data.get("max_text_tokens")
        if max_text_tokens is not None and buffer_tokens < max_text_tokens:
            raise ValueError(
                f"probes.buffer_tokens = {buffer_tokens} cannot hold one text of probes.max_text_tokens = {max_text_tokens} "
                "tokens; raise buffer_tokens or lower max_text_tokens"
            )
        return buffer_tokens

    def hash_fields(self) -> dict[str, Any]:
        """Return the fields that name a fitted probe set.

        Fields added after probe directories were first named are left out while they keep
        their default values, so probe sets fitted before they existed keep their names.
        """
        later_fields = ("text_sources", "max_fit_texts", "buffer_tokens", "checkpoint_every")
        defaults = ProbesConfig.model_fields
        unchanged = {name for name in later_fields if getattr(self, name) == defaults[name].get_default(call_default_factory=True)}
        return self.model_dump(exclude=unchanged)


class EvalConfig(_Section):
    """Per-layer evaluation on the validation split."""

    batch_size: int = Field(16, ge=1, description="Image-caption pairs per LM forward pass.")
    n_bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples over images for confidence intervals.")
    ci_level: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence level of the bootstrap intervals.")
    top_k: int = Field(10, ge=1, description="SAE features per image compared between image tokens and caption tokens.")
    knn_k: int = Field(10, ge=1, description="Neighbours for mutual k-NN and CKNNA (capped at n - 2).")
    max_pair_images: int = Field(
        4096, ge=4, description="Pairwise metrics (CKA, k-NN, SVCCA, retrieval, linear probe) use a seeded sample of at "
        "most this many validation images, so their memory stays bounded; the n column reports the sample size.")
    splice_images: int = Field(16, ge=0, description="Validation images used for the CE-loss-recovered and KL scores (two extra LM passes per layer); 0 disables them.")
    bits_per_byte_images: int = Field(8, ge=0, description="Validation images whose caption likelihood is scored in bits per byte (byte-level and canonical tokens); 0 disables it.")
    evaluate_steps: bool = Field(True, description="mmalign run evaluates every step checkpoint, not only final/.")
    feature_examples: int = Field(4, ge=0, description="Validation images whose top SAE features are drawn on the patch grid in the report; 0 skips the feature descriptions and examples.")
    feature_top_k: int = Field(5, ge=1, description="SAE latents listed per example image, ranked by activation summed over its image tokens.")
    feature_contexts: int = Field(5, ge=1, description="Top-activating text contexts kept per SAE latent for its description.")
    feature_texts: int | None = Field(500, ge=1, description="Fitting texts read for the feature descriptions (the first N); null reads all of them. Each text costs one more LM pass, about 0.13 s on 2 CPU cores for SmolLM2-135M.")
    feature_max_density: float = Field(0.1, gt=0.0, le=1.0, description="Latents firing on more than this share of fitting-text tokens are dense and rank after all other latents in the examples (1 ranks all alike).")


class RunConfig(_Section):
    """One invocation of `mmalign run`: every stage's settings."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; the run directory is OUTPUT/NAME.")
    seed: int = Field(0, description="Seed for every random choice.")
    output_dir: str = Field("runs", description="Directory under which the run directory is made.")
    vision_encoder: VisionEncoderConfig = Field(default_factory=VisionEncoderConfig)
    lm: LMConfig = Field(default_factory=LMConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    treatment: dict[str, Any] = Field(default_factory=dict, description="Settings of the treatment run by `mmalign treat`; each treatment validates its own.")

    @field_validator("probes")
    @classmethod
    def _check_layers(cls, probes: ProbesConfig) -> ProbesConfig:
        if isinstance(probes.layers, list) and not probes.layers:
            raise ValueError("probes.layers is an empty list; give layer indices or 'default'")
        return probes


def _fields_at(path: tuple) -> list[str]:
    """Return the field names of the config section at `path` (empty path: the top level)."""
    model: type[BaseModel] = RunConfig
    for part in path:
        annotation = model.model_fields.get(str(part))
        section = getattr(annotation, "annotation", None)
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return []
        model = section
    return list(model.model_fields)


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        value = item.get("input")
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            accepted = ", ".join(_fields_at(item["loc"][:-1]))
            message = f"unknown field; remove it or check the spelling (accepted here: {accepted})"
        lines.append(f"  {field} = {value!r}: {message}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a config mapping.

    Raises:
        ConfigError: naming each invalid field, its value and what is accepted.
    """
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a YAML run config.

    Args:
        path: The YAML file.
        overrides: Top-level keys that replace the file's values (for example `output_dir`).

    Raises:
        ConfigError: when the file is missing, is not a YAML mapping or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; presets are in configs/ (demo.yaml, quick.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping of sections, found {type(data).__name__}")
    data.update(overrides or {})
    return parse_config(data, source=str(path))
