"""Text corpora for fitting SAE probes: WordNet glosses and plain text files."""

from __future__ import annotations

import logging
import random
from pathlib import Path

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
