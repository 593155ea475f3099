"""The treatment interface: a procedure that takes a checkpoint and returns treated checkpoints.

Treatments are registered by name. Third-party packages add theirs through the Python
entry-point group `mmalign.treatments`, whose entries point at a `Treatment` subclass.
Every returned checkpoint is evaluated with the same probes as the untreated baseline.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from mmalign.pipeline import RunContext

logger = logging.getLogger("mmalign.loops")

ENTRY_POINT_GROUP = "mmalign.treatments"
OptionsModel = TypeVar("OptionsModel", bound=BaseModel)


@dataclass
class TreatmentContext:
    """What a treatment may use: the run's frozen models, data and prompt, and where to write.

    Attributes:
        run: The run context (LM, vision features, train/validation rows, prompt, config).
        output_dir: The treatment's directory inside the run (`treatments/<name>/`).
        options: The treatment's own settings from the config file's `treatment:` mapping.
        seed: Seed for every random choice of the treatment.
    """

    run: "RunContext"
    output_dir: Path
    options: dict[str, Any]
    seed: int


@dataclass
class TreatedCheckpoint:
    """One treated checkpoint with the treatment's own per-iteration measurements."""

    name: str  # e.g. "self-rewarding/M1"
    directory: Path
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)  # wall seconds, samples generated, ...


class Treatment(ABC):
    """Base class of treatments; subclasses set `name` and implement `apply`."""

    name: str = ""

    @abstractmethod
    def apply(self, checkpoint: Path, context: TreatmentContext) -> list[TreatedCheckpoint]:
        """Run the treatment from `checkpoint` and return the treated checkpoints in order.

        Implementations write each checkpoint atomically and skip iterations whose
        checkpoint already exists, so an interrupted treatment resumes.
        """

    def report_tables(self, output_dir: Path) -> list[dict[str, Any]]:
        """Return extra tables for the treatment's report section, read from `output_dir`.

        Each table is a dict with `title`, `columns`, `rows` (lists of cells, one per
        column) and optionally `note`. The default adds none.
        """
        return []


_REGISTRY: dict[str, type[Treatment]] = {}


def validate_options(model: type[OptionsModel], options: dict[str, Any], treatment: str) -> OptionsModel:
    """Validate a treatment's `treatment:` mapping with its pydantic options model.

    Raises:
        ValueError: naming each invalid or unknown field, its value and the problem.
    """
    try:
        return model.model_validate(options)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(map(str, item["loc"])) or "options"
            problems.append(f"{where} = {item.get('input')!r}: {item['msg']}")
        raise ValueError(f"invalid {treatment} treatment options: {'; '.join(problems)}") from None


def register_treatment(cls: type[Treatment]) -> type[Treatment]:
    """Class decorator that registers a treatment under its `name`."""
    if not cls.name:
        raise ValueError(f"treatment class {cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            continue
        try:
            cls = entry.load()
        except Exception as error:  # a broken third-party plugin must not stop the run
            logger.warning("treatment entry point %s could not be loaded: %s", entry.value, error)
            continue
        if isinstance(cls, type) and issubclass(cls, Treatment):
            _REGISTRY[entry.name] = cls
        else:
            logger.warning("treatment entry point %s is not a Treatment subclass; skipped", entry.value)


def available_treatments() -> list[str]:
    """Return the names of built-in and entry-point treatments."""
    _load_builtin()
    _load_entry_points()
    return sorted(_REGISTRY)


def get_treatment(name: str) -> Treatment:
    """Instantiate a registered treatment.

    Raises:
        ValueError: for an unknown name, listing the available treatments.
    """
    names = available_treatments()
    if name not in _REGISTRY:
        raise ValueError(f"unknown treatment {name!r}; available treatments: {', '.join(names) or 'none'}")
    return _REGISTRY[name]()


def _load_builtin() -> None:
    import importlib

    builtin = ("mmalign.loops.self_rewarding", "mmalign.loops.discovery", "mmalign.loops.self_correcting",
               "mmalign.loops.self_adapting", "mmalign.loops.bytelevel_treatment")
    for module in builtin:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
