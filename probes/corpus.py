"""Text sources for fitting SAE probes: WordNet glosses, captions, text files and saved datasets.

Every source is read lazily as an iterator, so a large file or dataset is never held in
memory whole, and can be read again from its start for another pass.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

logger = logging.getLogger("mmalign.probes")

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def wordnet_glosses(count: int, seed: int, root: Path = WORDNET_DIR) -> list[str]:
    """Return `count` WordNet 3.0 glosses (definition and usage examples), a seeded sample.

    Args:
        count: Number of glosses; 0 returns an empty list without reading anything.
        seed: Sampling seed.
        root: Folder of the WordNet database files (Debian package wordnet-base).

    Raises:
        FileNotFoundError: when the database is missing, naming the Debian package.
    """
    if count == 0:
        return []
    glosses: list[str] = []
    for name in WORDNET_FILES:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"WordNet file {path} not found; install it with `apt-get install -y wordnet-base`, "
                "or set probes.wordnet_glosses: 0 to fit on captions only"
            )
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("  "):  # license header
                    continue
                _, bar, gloss = line.partition(" | ")
                gloss = gloss.strip()
                if bar and gloss:
                    glosses.append(gloss[0].upper() + gloss[1:])
    rng = random.Random(seed)
    sample = rng.sample(glosses, min(count, len(glosses)))
    logger.info("WordNet: sampled %d of %d glosses from %s", len(sample), len(glosses), root)
    return sample


@dataclass(frozen=True)
class TextSource:
    """One source of fitting texts that can be read again from its start.

    Attributes:
        name: The `probes.text_sources` entry it came from, e.g. `file:corpus.txt`.
        read: Returns a fresh iterator over the texts; nothing is read before it is called.
        fingerprint: What identifies the content (a file's path, size and modification
            time, a dataset's fingerprint); empty for sources fixed by the config and seed.
    """

    name: str
    read: Callable[[], Iterator[str]]
    fingerprint: str = ""


def _file_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for raw in _checked_lines(handle, path):
            text = raw.strip()
            if text:
                yield text


def _checked_lines(handle, path: Path) -> Iterator[str]:
    line = 0
    while True:
        try:
            raw = handle.readline()
        except UnicodeDecodeError as error:
            raise ValueError(
                f"text source file:{path} is not UTF-8 after line {line} ({error.reason}); convert it, "
                "e.g. `iconv -f latin1 -t utf-8`"
            ) from None
        if not raw:
            return
        line += 1
        yield raw


def _file_source(spec: str, path_text: str) -> TextSource:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"probes.text_sources entry {spec!r}: no file at {path}; give the path of a UTF-8 text file, one text per line")
    if next(_file_lines(path), None) is None:
        raise ValueError(f"probes.text_sources entry {spec!r}: {path} has no non-empty lines; add texts or remove the entry")
    stat = path.stat()
    return TextSource(spec, lambda: _file_lines(path), f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")


def _split_hf_spec(rest: str) -> tuple[Path, str]:
    """Split `PATH[:COLUMN]`; a path that exists as given keeps any colon it contains."""
    if Path(rest).expanduser().exists() or ":" not in rest:
        return Path(rest).expanduser(), "text"
    path_text, _, column = rest.rpartition(":")
    if not column or "/" in column:
        return Path(rest).expanduser(), "text"
    return Path(path_text).expanduser(), column


def _hf_texts(dataset, column: str, spec: str) -> Iterator[str]:
    for batch in dataset.select_columns([column]).iter(batch_size=1024):
        for value in batch[column]:
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(
                    f"probes.text_sources entry {spec!r}: column {column!r} contains {type(value).__name__} values, "
                    "not text; name a text column as hf:PATH:COLUMN"
                )
            text = value.strip()
            if text:
                yield text


def _hf_source(spec: str, rest: str) -> TextSource:
    import datasets

    path, column = _split_hf_spec(rest)
    if not path.exists():
        raise FileNotFoundError(
            f"probes.text_sources entry {spec!r}: no dataset folder at {path}; save one with "
            "Dataset.save_to_disk(PATH) and give that folder"
        )
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"probes.text_sources entry {spec!r}: {path} is not a folder written by save_to_disk ({error}); "
            "save the dataset with Dataset.save_to_disk(PATH)"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(
                f"probes.text_sources entry {spec!r}: {path} contains the splits {sorted(dataset)} and no 'train' split; "
                f"give one split's folder, e.g. hf:{path / sorted(dataset)[0]}"
            )
        dataset = dataset["train"]
    if column not in dataset.column_names:
        raise ValueError(
            f"probes.text_sources entry {spec!r}: the dataset has no column {column!r}; its columns are "
            f"{dataset.column_names}; name one as hf:{path}:COLUMN"
        )
    if next(_hf_texts(dataset, column, spec), None) is None:
        raise ValueError(f"probes.text_sources entry {spec!r}: column {column!r} contains no non-empty text; choose another column or source")
    return TextSource(spec, lambda: _hf_texts(dataset, column, spec), f"{path.resolve()}:{column}:{dataset._fingerprint}")


def open_text_sources(
    specs: Sequence[str], *, wordnet_count: int, seed: int, captions: Sequence[str], wordnet_root: Path = WORDNET_DIR
) -> list[TextSource]:
    """Check each `probes.text_sources` entry and return the sources, none of them read yet.

    `wordnet` samples `wordnet_count` glosses, held in memory, and is left out when the
    count is 0. `captions` reads the given training captions. `file:` and `hf:` sources
    are opened here only to check them, and are read lazily while fitting.

    Raises:
        ValueError: for an unknown kind, an empty source or a missing dataset column.
        FileNotFoundError: for a missing file, dataset folder or WordNet database.
    """
    sources = []
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if spec == "wordnet":
            if wordnet_count == 0:
                logger.info("text source wordnet left out: probes.wordnet_glosses is 0")
                continue
            glosses = wordnet_glosses(wordnet_count, seed, wordnet_root)
            sources.append(TextSource(spec, lambda glosses=glosses: iter(glosses)))
        elif spec == "captions":
            if not captions:
                raise ValueError("probes.text_sources lists 'captions', but the training split has no captions; remove the entry or add images")
            sources.append(TextSource(spec, lambda captions=captions: iter(captions)))
        elif kind == "file" and rest:
            sources.append(_file_source(spec, rest))
        elif kind == "hf" and rest:
            sources.append(_hf_source(spec, rest))
        else:
            raise ValueError(
                f"probes.text_sources entry {spec!r} is not a text source; accepted: wordnet, captions, file:PATH, hf:PATH[:COLUMN]"
            )
    if not sources:
        raise ValueError(f"probes.text_sources {list(specs)} gives no texts; add a source or set probes.wordnet_glosses above 0")
    return sources


def iter_texts(sources: Sequence[TextSource], max_texts: int | None = None) -> Iterator[str]:
    """Yield the texts of every source in order, at most `max_texts` in all."""
    count = 0
    for source in sources:
        for text in source.read():
            if max_texts is not None and count >= max_texts:
                return
            count += 1
            yield text
