"""Progress bars that show on a terminal and stay out of logs and CI output."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], description: str, unit: str) -> tqdm:
    """Wrap an iterable in a tqdm bar that is disabled when stderr is not a terminal."""
    return tqdm(iterable, desc=description, unit=unit, leave=False, disable=None)
