"""Image-caption datasets: Tux Paint stamps, a user folder, and pip-only samples.

Every source becomes an :class:`ImageCaptionDataset`, a list of
:class:`ImageCaption` records plus a count of what was skipped and why.
Images are checked when the dataset is built (decoded in full and converted
to RGB), so a built dataset holds only pairs whose image can be read.

Specs accepted by :func:`load_dataset`:

``"tuxpaint"``
    The Debian package ``tuxpaint-stamps-default``: PNG stamps under
    ``/usr/share/tuxpaint/stamps/<category>/.../<name>.png`` with the caption
    on the first line of ``<name>.txt`` (later lines are translations).
    The top folder is the category; ``symbols`` (letters, digits, money) is
    excluded by default. Following Tux Paint's own conventions,
    ``<name>_mirror.png`` (a pre-mirrored copy of ``<name>.png``), stamps that
    exist only as SVG, and description files without any image are left out
    and counted in ``skipped`` without a warning.
``"folder:<path>"``
    A directory with ``captions.jsonl`` (one object per line:
    ``{"image": "rel/path.png", "caption": "...", "category": "optional"}``)
    or ``captions.csv`` (columns ``image``, ``caption``, optional ``category``).
``"samples"``
    Images bundled inside the scikit-image and scikit-learn wheels (no
    download), each with a hand-written English caption and a category.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import importlib.util
import json
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ACCEPTED_SPECS",
    "DEFAULT_TUXPAINT_ROOT",
    "DatasetError",
    "ImageCaption",
    "ImageCaptionDataset",
    "load_dataset",
    "split_train_val",
    "to_rgb",
]

logger = logging.getLogger("mmalign.data")

DEFAULT_TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_PACKAGE = "tuxpaint-stamps-default"
TUXPAINT_INSTALL = f"apt-get install -y --no-install-recommends {TUXPAINT_PACKAGE}"
ACCEPTED_SPECS = ("tuxpaint", "folder:<path>", "samples")

# Skip reasons. The first four are problems with the input and get one warning
# each; the rest are by design (source conventions) and are logged at DEBUG.
UNREADABLE_IMAGE = "unreadable image"
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
MISSING_IMAGE = "missing image file"
UNREADABLE_CAPTION = "unreadable caption file"
MALFORMED_ENTRY = "malformed captions entry"
DUPLICATE_ENTRY = "duplicate image entry"
MIRRORED_VARIANT = "mirrored variant"
SVG_ONLY = "svg only"
NO_IMAGE_FOR_CAPTION = "caption file without image"

_FINGERPRINT_VERSION = "mmalign.data.fingerprint/1"
_WHITE = (255, 255, 255)


class DatasetError(ValueError):
    """A dataset could not be built: nothing usable, or its source is missing."""


@dataclasses.dataclass(frozen=True)
class ImageCaption:
    image_id: str  # stable id, e.g. path relative to the dataset root
    caption: str
    category: str  # "" when unknown
    path: Path | None  # None for in-memory sources


# --------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image, background: tuple[int, int, int] = _WHITE) -> Image.Image:
    """Return ``image`` as an 8-bit RGB image.

    Transparency (RGBA, LA, PA, or a ``transparency`` key on P/L/RGB images)
    is composited onto ``background`` (white). Grayscale becomes RGB; 16-bit
    and 32-bit grayscale are scaled to 8 bits; EXIF orientation is applied.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        image = Image.fromarray(_wide_gray_to_uint8(image), mode="L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def _wide_gray_to_uint8(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 257.0
    elif image.mode == "I":
        # 16-bit PNGs may open as "I" with values up to 65535.
        scaled = array.astype(np.float64)
        if scaled.size and scaled.max() > 255:
            scaled = scaled / 257.0
    else:  # "F": [0, 1] floats or already in [0, 255]
        scaled = np.nan_to_num(array.astype(np.float64))
        if scaled.size and scaled.max() <= 1.0:
            scaled = scaled * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# The dataset


class ImageCaptionDataset:
    """An ordered list of image-caption pairs from one source.

    ``skipped`` maps a reason to how many candidates the loader left out for
    it (a subset keeps its source's counts). ``root`` is where the loader
    looked, when there is one place.
    """

    def __init__(
        self,
        name: str,
        items: Sequence[ImageCaption],
        skipped: Mapping[str, int] | None = None,
        *,
        root: Path | None = None,
        loaders: Mapping[str, Callable[[], Image.Image]] | None = None,
    ) -> None:
        self.name = name
        self.items: list[ImageCaption] = list(items)
        self.skipped: collections.Counter[str] = collections.Counter(skipped or {})
        self.root = root
        self._loaders: dict[str, Callable[[], Image.Image]] = dict(loaders or {})
        seen: set[str] = set()
        for item in self.items:
            if item.image_id in seen:
                raise ValueError(f"dataset {name!r}: duplicate image_id {item.image_id!r}")
            seen.add(item.image_id)
            if item.path is None and item.image_id not in self._loaders:
                raise ValueError(
                    f"dataset {name!r}: item {item.image_id!r} has no path and no loader"
                )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ImageCaption:
        return self.items[index]

    def __iter__(self) -> Iterator[ImageCaption]:
        return iter(self.items)

    def __repr__(self) -> str:
        skipped = sum(self.skipped.values())
        return f"ImageCaptionDataset(name={self.name!r}, items={len(self)}, skipped={skipped})"

    @property
    def categories(self) -> list[str]:
        """The distinct non-empty categories, sorted."""
        return sorted({item.category for item in self.items if item.category})

    def load_image(self, index: int) -> Image.Image:
        """The image of item ``index`` as RGB (transparency composited onto white)."""
        item = self.items[index]
        if item.path is None:
            return to_rgb(self._loaders[item.image_id]())
        try:
            return _read_rgb(item.path)
        except Exception as exc:
            raise OSError(
                f"dataset {self.name!r}: cannot read image {item.path} "
                f"(item {index}, {item.image_id!r}): {exc}"
            ) from exc

    def fingerprint(self) -> str:
        """SHA-256 over ids, captions, categories and each image's content hash.

        File contents are hashed on every call (538 Tux Paint stamps, 23 MB,
        take well under a second), so any edit to an image or caption changes
        the fingerprint.
        """
        digest = hashlib.sha256(_FINGERPRINT_VERSION.encode())
        for item in self.items:
            if item.path is None:
                image = self._loaders[item.image_id]()
                content = hashlib.sha256(
                    f"{image.mode}:{image.size}:".encode() + image.tobytes()
                ).hexdigest()
            else:
                content = _sha256_file(item.path)
            record = json.dumps(
                [item.image_id, item.caption, item.category, content], ensure_ascii=False
            )
            digest.update(record.encode("utf-8") + b"\n")
        return digest.hexdigest()

    def subset(self, indices: Sequence[int], name: str | None = None) -> ImageCaptionDataset:
        """A dataset of the items at ``indices``, in that order (no repeats)."""
        chosen: list[ImageCaption] = []
        seen: set[int] = set()
        for raw in indices:
            index = int(raw)
            if not -len(self.items) <= index < len(self.items):
                raise IndexError(
                    f"subset index {index} out of range for dataset {self.name!r} "
                    f"of {len(self.items)} items"
                )
            index %= len(self.items)
            if index in seen:
                raise ValueError(f"subset index {index} given twice")
            seen.add(index)
            chosen.append(self.items[index])
        loaders = {
            item.image_id: self._loaders[item.image_id] for item in chosen if item.path is None
        }
        return ImageCaptionDataset(
            self.name if name is None else name,
            chosen,
            self.skipped,
            root=self.root,
            loaders=loaders,
        )


# --------------------------------------------------------------------------
# Building a dataset: shared bookkeeping


class _Builder:
    """Collects items and skips, checks images, logs, and builds the dataset."""

    def __init__(self, name: str, where: str, *, noun: str = "images") -> None:
        self.name = name
        self.where = where
        self.noun = noun
        self.items: list[ImageCaption] = []
        self.skipped: collections.Counter[str] = collections.Counter()
        self.seen_ids: set[str] = set()
        self.candidates = 0

    def skip(
        self, location: object, reason: str, detail: str = "", *, expected: bool = False
    ) -> None:
        self.skipped[reason] += 1
        suffix = f" ({detail})" if detail else ""
        if expected:
            logger.debug("%s: leaving out %s: %s%s", self.name, location, reason, suffix)
        else:
            logger.warning("%s: skipping %s: %s%s", self.name, location, reason, suffix)

    def add(self, image_id: str, caption: str, category: str, path: Path, location: object) -> None:
        """Check the image at ``path`` and keep the pair if it decodes."""
        if image_id in self.seen_ids:
            self.skip(location, DUPLICATE_ENTRY, f"{image_id!r} already listed; first entry kept")
            return
        if not path.is_file():
            self.skip(location, MISSING_IMAGE, str(path))
            return
        try:
            _read_rgb(path)
        except Exception as exc:  # PIL raises many kinds for bad files
            self.skip(location, UNREADABLE_IMAGE, f"{type(exc).__name__}: {exc}")
            return
        self.seen_ids.add(image_id)
        self.items.append(ImageCaption(image_id, caption, category, path))

    def build(self, root: Path | None, extra: str = "") -> ImageCaptionDataset:
        reasons = _format_counts(self.skipped)
        if not self.items:
            if self.candidates == 0:
                found = f"found no {self.noun} in {self.where}"
            else:
                found = (
                    f"found {self.candidates} {self.noun} in {self.where}, "
                    f"all skipped: {reasons}"
                )
            raise DatasetError(
                f"dataset {self.name!r}: no usable image-caption pairs; {found}{extra}"
            )
        summary = f"{len(self.items)} usable image-caption pairs from {self.where}"
        if self.skipped:
            summary += f"; skipped {sum(self.skipped.values())}: {reasons}"
        level = logging.INFO if set(self.skipped) <= _EXPECTED_REASONS else logging.WARNING
        logger.log(level, "%s: %s", self.name, summary)
        return ImageCaptionDataset(self.name, self.items, self.skipped, root=root)


_EXPECTED_REASONS = {MIRRORED_VARIANT, SVG_ONLY, NO_IMAGE_FOR_CAPTION}


def _format_counts(counter: Mapping[str, int]) -> str:
    ordered = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{count} {reason}" for reason, count in ordered)


def _excluded_set(exclude_categories: Sequence[str] | str) -> set[str]:
    if isinstance(exclude_categories, str):
        return {exclude_categories}
    return set(exclude_categories)


def _clean_caption(value: object) -> str | None:
    """Whitespace-collapsed caption, "" when blank, None when not a string."""
    if not isinstance(value, str):
        return None
    return " ".join(value.split())


# --------------------------------------------------------------------------
# Tux Paint stamps


def load_tuxpaint(
    root: str | Path = DEFAULT_TUXPAINT_ROOT,
    exclude_categories: Sequence[str] | str = ("symbols",),
) -> ImageCaptionDataset:
    """The Tux Paint stamps under ``root``; see the module docstring."""
    root = Path(root).expanduser()
    excluded = _excluded_set(exclude_categories)
    if not root.is_dir():
        raise DatasetError(
            f"Tux Paint stamps not found: {root} is not a directory. Install the Debian "
            f"package {TUXPAINT_PACKAGE} (as root: {TUXPAINT_INSTALL}), pass root=<stamps "
            f"folder>, or use spec 'samples', which needs no Debian package."
        )
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = sorted(excluded - set(folders))
    if unknown:
        logger.warning(
            "tuxpaint: excluded categories %s are not folders in %s (folders: %s)",
            unknown, root, ", ".join(folders),
        )

    builder = _Builder("tuxpaint", str(root))
    stems: dict[Path, dict[str, Path]] = collections.defaultdict(dict)  # stem -> suffix -> file
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if len(relative.parts) > 1 and relative.parts[0] in excluded:
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue
        suffix = path.suffix.lower()
        if suffix in (".png", ".svg", ".txt") and path.is_file():
            stems[path.with_suffix("")][suffix] = path

    for stem in sorted(stems):
        kinds = stems[stem]
        relative = stem.relative_to(root)
        category = relative.parts[0] if len(relative.parts) > 1 else ""
        if ".png" not in kinds and ".svg" not in kinds:
            builder.skip(kinds[".txt"], NO_IMAGE_FOR_CAPTION, expected=True)
            continue
        builder.candidates += 1
        if stem.name.endswith("_mirror"):
            original = stem.with_name(stem.name[: -len("_mirror")])
            if stems.get(original, {}).keys() & {".png", ".svg"}:
                builder.skip(kinds.get(".png", kinds.get(".svg")), MIRRORED_VARIANT, expected=True)
                continue
        if ".png" not in kinds:
            builder.skip(
                kinds[".svg"], SVG_ONLY, "no PNG next to it; SVG is not rasterised",
                expected=True,
            )
            continue
        image_path = kinds[".png"]
        if ".txt" not in kinds:
            builder.skip(image_path, MISSING_CAPTION, f"no {stem.name}.txt")
            continue
        caption_path = kinds[".txt"]
        try:
            text = caption_path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            builder.skip(image_path, UNREADABLE_CAPTION, f"{caption_path.name}: {exc}")
            continue
        lines = text.splitlines()
        caption = _clean_caption(lines[0] if lines else "")
        if not caption:
            builder.skip(image_path, EMPTY_CAPTION, f"first line of {caption_path.name} is blank")
            continue
        image_id = image_path.relative_to(root).as_posix()
        builder.add(image_id, caption, category, image_path, image_path)

    extra = f" (excluded categories: {', '.join(sorted(excluded))})" if excluded else ""
    return builder.build(root, extra)


# --------------------------------------------------------------------------
# A user folder with captions.jsonl or captions.csv


def load_folder(
    folder: str | Path, exclude_categories: Sequence[str] | str = ()
) -> ImageCaptionDataset:
    """A folder of images described by ``captions.jsonl`` or ``captions.csv``.

    Entries whose category is in ``exclude_categories`` are left out (not
    counted as skipped).
    """
    folder = Path(folder).expanduser()
    excluded = _excluded_set(exclude_categories)
    name = f"folder:{folder}"
    if not folder.is_dir():
        raise DatasetError(f"dataset {name!r}: {folder} is not a directory")
    jsonl, csv_path = folder / "captions.jsonl", folder / "captions.csv"
    present = [p for p in (jsonl, csv_path) if p.is_file()]
    if not present:
        images = [
            p for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in Image.registered_extensions()
        ]
        if images:
            found = f"found {len(images)} image files there"
        elif any(folder.iterdir()):
            found = "found no image files there"
        else:
            found = "the folder is empty"
        raise DatasetError(
            f"dataset {name!r}: no captions.jsonl or captions.csv in {folder} ({found}); "
            'write one line per image like {"image": "cat.png", "caption": "A cat."}'
        )
    if len(present) == 2:
        raise DatasetError(
            f"dataset {name!r}: both captions.jsonl and captions.csv are in {folder}; "
            "keep one so it is clear which captions count"
        )
    captions_file = present[0]
    builder = _Builder(name, str(captions_file), noun="entries")
    read = _read_jsonl if captions_file == jsonl else _read_csv
    rows = read(captions_file, builder)
    for location, image, caption, category in rows:
        if isinstance(category, str) and category.strip() in excluded:
            continue
        builder.candidates += 1
        if not isinstance(image, str) or not image.strip():
            builder.skip(location, MALFORMED_ENTRY, "no image path")
            continue
        if category is None:
            category = ""
        if not isinstance(category, str):
            builder.skip(location, MALFORMED_ENTRY, f"category is not a string: {category!r}")
            continue
        category = category.strip()
        image_path = folder / image.strip()
        if caption is None:
            builder.skip(image_path, MISSING_CAPTION, str(location))
            continue
        text = _clean_caption(caption)
        if text is None:
            builder.skip(location, MALFORMED_ENTRY, f"caption is not a string: {caption!r}")
            continue
        if not text:
            builder.skip(image_path, EMPTY_CAPTION, str(location))
            continue
        image_id = PurePosixPath(image.strip().replace("\\", "/")).as_posix()
        builder.add(image_id, text, category, image_path, f"{image_path} ({location})")
    extra = f" (excluded categories: {', '.join(sorted(excluded))})" if excluded else ""
    return builder.build(folder, extra)


_Row = tuple[str, object, object, object]  # location, image, caption, category


def _read_jsonl(path: Path, builder: _Builder) -> list[_Row]:
    rows: list[_Row] = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                builder.candidates += 1
                builder.skip(location, MALFORMED_ENTRY, f"invalid JSON: {exc}")
                continue
            if not isinstance(record, dict):
                builder.candidates += 1
                builder.skip(location, MALFORMED_ENTRY, "not a JSON object")
                continue
            rows.append(
                (location, record.get("image"), record.get("caption"), record.get("category"))
            )
    return rows


def _read_csv(path: Path, builder: _Builder) -> list[_Row]:
    rows: list[_Row] = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return rows
        columns = [column.strip().lower() for column in header]
        missing = [c for c in ("image", "caption") if c not in columns]
        if missing:
            raise DatasetError(
                f"dataset {builder.name!r}: {path} lacks column(s) {', '.join(missing)}; "
                f"its header is {header}; expected image, caption and optional category"
            )
        where = {
            column: columns.index(column)
            for column in ("image", "caption", "category")
            if column in columns
        }
        for number, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue

            def cell(column: str) -> str | None:
                index = where.get(column)
                return row[index] if index is not None and index < len(row) else None

            location = f"{path.name} line {number}"
            rows.append((location, cell("image"), cell("caption"), cell("category")))
    return rows


# --------------------------------------------------------------------------
# Pip-only samples: images inside the scikit-image and scikit-learn wheels

# (package, path inside the package, caption, category). Captions written by
# looking at each image.
_SAMPLES: tuple[tuple[str, str, str, str], ...] = (
    ("skimage", "data/astronaut.png",
     "A smiling astronaut in an orange spacesuit beside an American flag.", "people"),
    ("skimage", "data/camera.png",
     "A black-and-white photo of a man looking through a camera on a tripod.", "people"),
    ("skimage", "data/coffee.png", "A cup of espresso on a red saucer with a spoon.", "food"),
    ("skimage", "data/chelsea.png", "A close-up of a tabby cat's face with green eyes.", "animals"),
    ("skimage", "data/horse.png", "A black silhouette of a horse.", "animals"),
    ("skimage", "data/rocket.jpg",
     "A rocket on a launch pad at dusk between tall towers.", "vehicles"),
    ("skimage", "data/motorcycle_left.png", "A red motorcycle parked in a garage.", "vehicles"),
    ("skimage", "data/moon.png", "A grey close-up of the cratered surface of the moon.", "space"),
    ("skimage", "data/hubble_deep_field.jpg",
     "Hundreds of distant galaxies scattered across a black sky.", "space"),
    ("skimage", "data/coins.png", "Rows of old coins on a dark background.", "objects"),
    ("skimage", "data/retina.jpg",
     "A photo of the back of a human eye, red with branching blood vessels.", "medical"),
    ("skimage", "data/ihc.png", "A microscope image of tissue stained brown and blue.", "medical"),
    ("skimage", "data/page.png", "A printed page of text about image segmentation.", "text"),
    ("skimage", "data/text.png", "Handwritten math formulas on a sheet of paper.", "text"),
    ("skimage", "data/brick.png", "A grey brick wall.", "textures"),
    ("skimage", "data/grass.png", "A close-up of grass in black and white.", "textures"),
    ("skimage", "data/gravel.png", "A close-up of small gravel stones.", "textures"),
    ("skimage", "data/chessboard_RGB.png", "A black and white checkerboard pattern.", "patterns"),
    ("skimage", "data/color.png", "A color wheel of bright rainbow colors on black.", "patterns"),
    ("skimage", "data/logo.png", "A round green and orange logo with a snake's head.", "patterns"),
    ("sklearn", "datasets/images/china.jpg",
     "A tall Chinese pagoda above a lake, among green trees.", "town"),
    ("sklearn", "datasets/images/flower.jpg",
     "An orange dahlia flower against dark green leaves.", "plants"),
)
_PIP_NAMES = {"skimage": "scikit-image", "sklearn": "scikit-learn"}


def _package_dir(package: str) -> Path | None:
    """Where an installed package lives, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def load_samples(exclude_categories: Sequence[str] | str = ()) -> ImageCaptionDataset:
    """Sample images shipped inside the scikit-image and scikit-learn wheels."""
    excluded = _excluded_set(exclude_categories)
    samples = [sample for sample in _SAMPLES if sample[3] not in excluded]
    dirs = {package: _package_dir(package) for package in _PIP_NAMES}
    where = ", ".join(
        f"{package} ({directory})" if directory else f"{package} (not installed)"
        for package, directory in dirs.items()
    )
    builder = _Builder("samples", where)
    for package in _PIP_NAMES:
        if dirs[package] is None:
            count = sum(1 for sample in samples if sample[0] == package)
            if not count:
                continue
            logger.warning(
                "samples: %s is not installed; leaving out its %d images "
                "(pip install %s)", package, count, _PIP_NAMES[package],
            )
            builder.skipped[f"{_PIP_NAMES[package]} not installed"] += count
    for package, relative, caption, category in samples:
        directory = dirs[package]
        if directory is None:
            continue
        builder.candidates += 1
        path = directory / relative
        builder.add(f"{package}/{PurePosixPath(relative).name}", caption, category, path, path)
    extra = f" (excluded categories: {', '.join(sorted(excluded))})" if excluded else ""
    return builder.build(None, extra)


# --------------------------------------------------------------------------
# Entry points


def load_dataset(spec: str, **options: object) -> ImageCaptionDataset:
    """Build a dataset from ``spec``: "tuxpaint", "folder:<path>" or "samples".

    Options go to the source: every spec takes ``exclude_categories``
    (default ``("symbols",)`` for tuxpaint, none for the others); ``tuxpaint``
    also takes ``root``.
    """
    if not isinstance(spec, str):
        raise ValueError(
            f"dataset spec must be a string, one of {', '.join(ACCEPTED_SPECS)}; got {spec!r}"
        )
    text = spec.strip()
    if text == "tuxpaint":
        return load_tuxpaint(**options)  # type: ignore[arg-type]
    if text == "samples":
        return load_samples(**options)  # type: ignore[arg-type]
    if text.startswith("folder:"):
        path = text[len("folder:"):].strip()
        if not path:
            raise ValueError("spec 'folder:<path>' needs a path after 'folder:'")
        return load_folder(path, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown dataset spec {spec!r}; accepted specs: {', '.join(ACCEPTED_SPECS)}")


def split_train_val(
    dataset: ImageCaptionDataset, val_fraction: float, seed: int
) -> tuple[ImageCaptionDataset, ImageCaptionDataset]:
    """Split into (train, val), deterministic for ``seed``.

    The validation size is ``round(len * val_fraction)``, clamped so both parts
    are non-empty. When items have categories the split is stratified: each
    category gives its proportional share to validation (largest-remainder
    rounding, so the total is exact). Each part keeps the dataset order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1; got {val_fraction}")
    total = len(dataset)
    if total < 2:
        raise DatasetError(
            f"dataset {dataset.name!r} has {total} item(s); a train/val split needs at least 2"
        )
    n_val = min(max(round(total * val_fraction), 1), total - 1)

    groups: dict[str, list[int]] = collections.defaultdict(list)
    for index, item in enumerate(dataset.items):
        groups[item.category].append(index)
    categories = sorted(groups)

    quotas = {c: len(groups[c]) * n_val / total for c in categories}
    take = {c: int(quotas[c]) for c in categories}
    remaining = n_val - sum(take.values())
    tie_break = random.Random(f"{seed}:ties")
    order = sorted(categories, key=lambda c: (-(quotas[c] - take[c]), tie_break.random()))
    for category in order[:remaining]:
        take[category] += 1

    val_indices: set[int] = set()
    for category in categories:
        members = list(groups[category])
        random.Random(f"{seed}:{category}").shuffle(members)
        val_indices.update(members[: take[category]])

    train = [i for i in range(total) if i not in val_indices]
    val = [i for i in range(total) if i in val_indices]
    return (
        dataset.subset(train, name=f"{dataset.name}/train"),
        dataset.subset(val, name=f"{dataset.name}/val"),
    )
