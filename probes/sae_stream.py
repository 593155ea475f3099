"""Fit the SAE probes of many layers together from a stream of text, in bounded memory, resumably.

Texts are tokenized and run through the LM in batches; one forward pass serves every
probed layer. Each layer's activations of those tokens fill a buffer of at most
`probes.buffer_tokens` rows, and every optimizer step draws `probes.batch_tokens` rows
from it at random. A buffer that contains the whole corpus is filled once and serves every
step. Otherwise the buffer is refilled with the next texts after about one draw per row
(`ceil(rows / batch_tokens)` steps), and the stream starts again at its first text when
it ends, until `probes.steps` are done. Memory grows with the buffer, never with the corpus.

Every `probes.checkpoint_every` steps the fitting state is written atomically to
`fit_state.pt`: the SAE weights, Adam state and batch generator of every layer, the
global torch generator, the step, and the text position where the current buffer fill
began. A resumed fit refills that buffer from the same texts, so it continues exactly as
the uninterrupted fit would have.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from sae_lens import (
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata, TrainingSAE, TrainStepInput

from mmalign.adapters.compose import ComposedBatch
from mmalign.capture import capture_resid_post
from mmalign.config import ProbesConfig
from mmalign.io import stable_hash
from mmalign.lm import LanguageModel
from mmalign.probes.corpus import TextSource, iter_texts
from mmalign.progress import progress

logger = logging.getLogger("mmalign.probes")

STATE_FILE = "fit_state.pt"
_STATE_VERSION = 1
_CHUNK_ROWS = 4096  # rows per chunk of the float64 statistics of a buffer


def new_training_sae(config: ProbesConfig, d_in: int, seed: int, metadata: dict[str, object]) -> TrainingSAE:
    """Build an untrained sae-lens training SAE of the configured architecture, seeded."""
    torch.manual_seed(seed)
    common = {"d_in": d_in, "d_sae": config.d_sae, "metadata": SAEMetadata(**metadata)}
    if config.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=config.k, **common))
    if config.architecture == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=config.l1_coefficient, **common))
    return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=config.l1_coefficient, **common))


def sae_coefficients(sae: TrainingSAE) -> dict[str, float]:
    """Return the loss coefficients of a training SAE as plain numbers."""
    return {name: getattr(value, "value", value) for name, value in sae.get_coefficients().items()}


def sae_train_step(sae: TrainingSAE, optimizer: torch.optim.Optimizer, sae_in: torch.Tensor,
                   coefficients: dict[str, float], step: int) -> None:
    """Take one Adam step of the SAE loss on a `[batch_tokens, d_in]` batch."""
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=sae_in, coefficients=coefficients,
            dead_neuron_mask=None, n_training_steps=step, is_logging_step=False,
        )
    )
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    optimizer.step()


def input_scale(activations: torch.Tensor) -> float:
    """Return the factor that makes the mean squared distance of `[M, D]` rows from their mean equal D.

    Computed in float64 over chunks of rows, so no float64 copy of the whole buffer is made.
    """
    n_rows, d_in = activations.shape
    total = torch.zeros(d_in, dtype=torch.float64)
    for start in range(0, n_rows, _CHUNK_ROWS):
        total += activations[start : start + _CHUNK_ROWS].double().sum(dim=0)
    mean = total / n_rows
    squared = 0.0
    for start in range(0, n_rows, _CHUNK_ROWS):
        squared += float(((activations[start : start + _CHUNK_ROWS].double() - mean) ** 2).sum())
    if squared == 0.0:
        raise ValueError(
            f"the {n_rows} activation rows of the first buffer are all equal, so the SAE inputs cannot be scaled; "
            "fit on more text (add texts or sources to probes.text_sources)"
        )
    return math.sqrt(d_in / (squared / n_rows))


def _scaled_mean(activations: torch.Tensor, scale: float) -> torch.Tensor:
    total = torch.zeros(activations.shape[1], dtype=torch.float64)
    for start in range(0, activations.shape[0], _CHUNK_ROWS):
        total += (activations[start : start + _CHUNK_ROWS] * scale).double().sum(dim=0)
    return (total / activations.shape[0]).float()


def text_batch(lm: LanguageModel, chunk: Sequence[Sequence[int]]) -> tuple[ComposedBatch, torch.Tensor]:
    """Build `[start] text` rows padded on the right.

    Returns:
        The LM batch, and the `[B, L]` mask of text positions (without the start and padding).
    """
    length = 1 + max(len(ids) for ids in chunk)
    input_ids = torch.full((len(chunk), length), lm.end_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(chunk):
        input_ids[row, : 1 + len(ids)] = torch.tensor([lm.start_token_id, *ids])
        attention_mask[row, : 1 + len(ids)] = 1
    keep = attention_mask.bool().clone()
    keep[:, 0] = False  # the start position is an attention sink with a very large norm
    device = lm.model.device
    return ComposedBatch(lm.embed(input_ids.to(device)), attention_mask.to(device), input_ids, keep, keep), keep


class TokenStream:
    """Tokenized texts from the sources, one pass after another, with a position that can be restored.

    `epoch` counts completed passes and `position` the texts taken (or skipped as empty)
    in the current pass. A text that did not fit into a buffer fill stays pending and opens
    the next fill, so a fill is determined by the position where it starts.
    """

    def __init__(self, sources: Sequence[TextSource], tokenizer, max_text_tokens: int, max_texts: int | None = None):
        self.sources, self.tokenizer = list(sources), tokenizer
        self.max_text_tokens, self.max_texts = max_text_tokens, max_texts
        self.epoch, self.position = 0, 0
        self.texts_per_epoch: int | None = None
        self._texts: Iterator[str] = iter_texts(self.sources, max_texts)
        self._pending: list[int] | None = None
        self._pass_has_tokens = False

    def seek(self, epoch: int, position: int) -> None:
        """Restart reading at text `position` of pass `epoch` (texts before it are read and skipped, not tokenized)."""
        self.epoch, self.position, self._pending = epoch, 0, None
        self._texts = iter_texts(self.sources, self.max_texts)
        self._pass_has_tokens = position > 0  # a fill began there, so the texts before it were read
        for _ in range(position):
            if next(self._texts, None) is None:
                raise ValueError(
                    f"the text sources hold fewer than {position} texts now; they changed since the fit state was "
                    "saved, so delete fit_state.pt in the probe directory to fit from the start"
                )
            self.position += 1

    def _next_ids(self) -> list[int] | None:
        """Return the next non-empty tokenized text, or None at the end of the pass."""
        if self._pending is not None:
            return self._pending
        for text in self._texts:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids[: self.max_text_tokens]
            if ids:
                self._pending = ids
                return ids
            self.position += 1  # a text without tokens is skipped
        return None

    def _take(self) -> None:
        self._pending = None
        self._pass_has_tokens = True
        self.position += 1

    def _restart(self) -> None:
        if self.texts_per_epoch is None:
            self.texts_per_epoch = self.position
        self.epoch, self.position, self._pending = self.epoch + 1, 0, None
        self._pass_has_tokens = False
        self._texts = iter_texts(self.sources, self.max_texts)

    def fill(self, capacity: int, wrap: bool) -> tuple[list[list[int]], bool]:
        """Take texts until the next one would pass `capacity` tokens.

        Args:
            capacity: Token budget of the fill.
            wrap: Start the next pass when the stream ends; otherwise stop there.

        Returns:
            The token ids of the texts taken, and whether the pass ended during the fill.

        Raises:
            ValueError: when the sources give no tokens at all.
        """
        taken: list[list[int]] = []
        total, ended = 0, False
        while True:
            ids = self._next_ids()
            if ids is None:
                ended = True
                if not self._pass_has_tokens:
                    raise ValueError(
                        f"the text sources {[source.name for source in self.sources]} give no tokens; "
                        "check that they hold text, or add a source to probes.text_sources"
                    )
                if not wrap:
                    return taken, ended
                self._restart()
                continue
            if total + len(ids) > capacity:
                return taken, ended
            taken.append(ids)
            total += len(ids)
            self._take()


@dataclass
class _LayerFit:
    """The fitting state of one layer's SAE."""

    sae: TrainingSAE
    optimizer: torch.optim.Adam
    generator: torch.Generator
    coefficients: dict[str, float]
    scale: float = 1.0
    buffer: torch.Tensor | None = None  # [rows, d_model] raw activations of the current fill


class StreamingSaeFitter:
    """Fit one SAE per layer on LM activations of a text stream, in one pass over the LM per text batch.

    Args:
        lm: The frozen LM.
        layers: The layers to fit.
        config: Probe settings (architecture, steps, batch and buffer sizes, checkpoint interval).
        seed: Seed; layer L uses `seed + L` for its initialization and batch draws.
        metadata: Layer -> sae-lens metadata recorded in the SAE's `cfg.json`.

    Attributes (after `fit`):
        n_tokens_read_: Tokens run through the LM while fitting, over all fills.
        n_fit_texts_: Texts in one pass over the stream, or the texts read if no pass ended.
        peak_buffer_rows_: The maximum number of activation rows in one layer's buffer.
        resumed_from_step_: The step a saved state resumed from, or 0.
    """

    def __init__(self, lm: LanguageModel, layers: Sequence[int], config: ProbesConfig, seed: int,
                 metadata: dict[int, dict[str, object]]):
        self.lm, self.layers, self.config, self.seed = lm, list(layers), config, seed
        self.metadata = metadata
        self.n_tokens_read_ = 0
        self.n_fit_texts_ = 0
        self.peak_buffer_rows_ = 0
        self.resumed_from_step_ = 0

    def _fingerprint(self) -> str:
        settings = self.config.model_dump(exclude={"checkpoint_every", "layers"})
        return stable_hash([settings, self.layers, self.seed, self.lm.lm_id, self.lm.d_model])

    def _fill(self, stream: TokenStream, fits: dict[int, _LayerFit], wrap: bool) -> tuple[int, bool]:
        """Refill every layer's buffer from the stream; return the rows and whether the pass ended."""
        for fit in fits.values():
            fit.buffer = None  # release the old fill before making the new one
        encoded, ended = stream.fill(self.config.buffer_tokens, wrap)
        encoded.sort(key=len)  # batches of similar length waste less padding
        n_rows = sum(len(ids) for ids in encoded)
        buffers = {layer: torch.empty(n_rows, self.lm.d_model) for layer in fits}  # [rows, D] each
        row = 0
        batch_size = self.config.lm_batch_size
        for start in range(0, len(encoded), batch_size):
            batch, keep = text_batch(self.lm, encoded[start : start + batch_size])
            hidden = capture_resid_post(self.lm, batch, list(fits))  # layer -> [B, L, D]
            n_kept = int(keep.sum())
            for layer in fits:
                buffers[layer][row : row + n_kept] = hidden[layer].float().cpu()[keep]
            row += n_kept
        for layer, fit in fits.items():
            fit.buffer = buffers[layer]
        self.n_tokens_read_ += n_rows
        self.peak_buffer_rows_ = max(self.peak_buffer_rows_, n_rows)
        return n_rows, ended

    def _save_state(self, path: Path, fits: dict[int, _LayerFit], step: int, generation_step: int,
                    generation_start: tuple[int, int], whole_corpus: bool, stream: TokenStream) -> None:
        state = {
            "version": _STATE_VERSION, "fingerprint": self._fingerprint(), "layers": self.layers,
            "step": step, "generation_step": generation_step, "generation_start": list(generation_start),
            "whole_corpus": whole_corpus, "texts_per_epoch": stream.texts_per_epoch,
            "n_tokens_read": self.n_tokens_read_, "torch_rng": torch.get_rng_state(),
            "per_layer": {
                str(layer): {"sae": fit.sae.state_dict(), "optimizer": fit.optimizer.state_dict(),
                             "generator": fit.generator.get_state(), "scale": fit.scale}
                for layer, fit in fits.items()
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            torch.save(state, temp_name)
            os.replace(temp_name, path)
        finally:
            if os.path.exists(temp_name):
                os.unlink(temp_name)

    def _load_state(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        state = torch.load(path, weights_only=True)
        if state.get("version") != _STATE_VERSION or state.get("fingerprint") != self._fingerprint() or state.get("layers") != self.layers:
            logger.warning("SAE fit state %s was saved for other settings or layers; fitting from the start", path)
            return None
        return state

    def fit(self, sources: Sequence[TextSource], state_path: Path | None = None,
            on_step: Callable[[int], None] | None = None) -> dict[int, TrainingSAE]:
        """Fit every layer's SAE and return them, with the input scale folded into the weights.

        Args:
            sources: The text sources, read in order, pass after pass.
            state_path: Where the fitting state is saved every `checkpoint_every` steps and
                resumed from; None keeps no state.
            on_step: Called with the number of finished steps after each step and after any
                state save. An exception raised there stops the fit, as an interruption would.

        Raises:
            ValueError: when the sources give no tokens.
        """
        config = self.config
        stream = TokenStream(sources, self.lm.tokenizer, config.max_text_tokens, config.max_fit_texts)
        fits: dict[int, _LayerFit] = {}
        for layer in self.layers:
            sae = new_training_sae(config, self.lm.d_model, self.seed + layer, self.metadata[layer])
            fits[layer] = _LayerFit(
                sae, torch.optim.Adam(sae.parameters(), lr=config.lr),
                torch.Generator().manual_seed(self.seed + layer), sae_coefficients(sae),
            )
        state = self._load_state(state_path) if state_path is not None else None
        start = time.perf_counter()
        if state is None:
            step, generation_step, generation_start = 0, 0, (0, 0)
            n_rows, ended = self._fill(stream, fits, wrap=False)
            whole_corpus = ended  # the first fill reached the end, so the buffer contains the whole corpus
            for fit in fits.values():
                fit.scale = input_scale(fit.buffer)
                with torch.no_grad():
                    fit.sae.b_dec.copy_(_scaled_mean(fit.buffer, fit.scale))
        else:
            step, generation_step = int(state["step"]), int(state["generation_step"])
            generation_start = tuple(state["generation_start"])
            whole_corpus = bool(state["whole_corpus"])
            torch.set_rng_state(state["torch_rng"])
            for layer, fit in fits.items():
                saved = state["per_layer"][str(layer)]
                fit.sae.load_state_dict(saved["sae"])
                fit.optimizer.load_state_dict(saved["optimizer"])
                fit.generator.set_state(saved["generator"])
                fit.scale = float(saved["scale"])
            stream.seek(*generation_start)
            stream.texts_per_epoch = state["texts_per_epoch"]
            n_rows, ended = self._fill(stream, fits, wrap=not whole_corpus)
            self.n_tokens_read_ = int(state["n_tokens_read"])
            self.resumed_from_step_ = step
            logger.info("SAE probes: resumed the fit of layers %s at step %d from %s", self.layers, step, state_path)
        if whole_corpus and stream.texts_per_epoch is None:
            stream.texts_per_epoch = stream.position
        logger.info("SAE probes: first buffer of %d tokens in %.1f s (%s)", n_rows, time.perf_counter() - start,
                    "the whole corpus" if whole_corpus else f"of at most {config.buffer_tokens}")
        steps_per_fill = math.ceil(n_rows / config.batch_tokens)
        for step in progress(range(step, config.steps), "fit SAE probes", "step"):
            if not whole_corpus and generation_step >= steps_per_fill:
                generation_start, generation_step = (stream.epoch, stream.position), 0
                n_rows, _ = self._fill(stream, fits, wrap=True)
                steps_per_fill = math.ceil(n_rows / config.batch_tokens)
            for fit in fits.values():
                rows = torch.randint(0, fit.buffer.shape[0], (config.batch_tokens,), generator=fit.generator)
                sae_train_step(fit.sae, fit.optimizer, fit.buffer[rows] * fit.scale, fit.coefficients, step)
            generation_step += 1
            done = step + 1
            if state_path is not None and done % config.checkpoint_every == 0 and done < config.steps:
                self._save_state(state_path, fits, done, generation_step, generation_start, whole_corpus, stream)
            if on_step is not None:
                on_step(done)
        self.n_fit_texts_ = stream.texts_per_epoch if stream.texts_per_epoch is not None else stream.position
        saes = {}
        for layer, fit in fits.items():
            fit.buffer = None
            fit.sae.fold_activation_norm_scaling_factor(fit.scale)
            fit.sae.cfg.metadata.n_fit_tokens = self.n_tokens_read_
            saes[layer] = fit.sae
        return saes
