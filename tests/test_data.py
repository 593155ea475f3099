"""Tests for mmalign.data: real files in tmp_path, plus the real Tux Paint stamps."""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.data import (
    DatasetError,
    ImageCaption,
    ImageCaptionDataset,
    load_dataset,
    split_train_val,
    to_rgb,
)

TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")


# -- helpers ----------------------------------------------------------------


def save_rgb(path: Path, color=(200, 30, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def save_rgba_half_transparent(path: Path) -> Path:
    """Left half fully transparent (stored colour black), right half opaque blue."""
    array = np.zeros((6, 8, 4), dtype=np.uint8)
    array[:, 4:] = (0, 0, 255, 255)
    Image.fromarray(array, mode="RGBA").save(path)
    return path


def write_jsonl(folder: Path, records: list[dict]) -> None:
    (folder / "captions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """A folder with good images and every kind of bad input."""
    save_rgb(tmp_path / "good.png")
    save_rgb(tmp_path / "sub" / "nested.jpg", color=(10, 200, 10))
    save_rgba_half_transparent(tmp_path / "cutout.png")
    Image.new("L", (5, 4), 77).save(tmp_path / "gray.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good_bytes = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    save_rgb(tmp_path / "nocaption.png")
    save_rgb(tmp_path / "blank.png")
    write_jsonl(
        tmp_path,
        [
            {"image": "good.png", "caption": "A red square.", "category": "shapes"},
            {"image": "sub/nested.jpg", "caption": "  A green\nsquare. ", "category": "shapes"},
            {"image": "cutout.png", "caption": "A blue bar.", "category": "cutouts"},
            {"image": "gray.png", "caption": "A gray square."},
            {"image": "corrupt.png", "caption": "Broken."},
            {"image": "truncated.png", "caption": "Cut short."},
            {"image": "nocaption.png"},
            {"image": "blank.png", "caption": "   "},
            {"image": "gone.png", "caption": "Not there."},
        ],
    )
    return tmp_path


# -- folder datasets --------------------------------------------------------


def test_folder_jsonl_keeps_good_pairs_and_counts_skips(messy_folder: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mmalign.data"):
        ds = load_dataset(f"folder:{messy_folder}")

    assert [item.image_id for item in ds.items] == [
        "good.png", "sub/nested.jpg", "cutout.png", "gray.png",
    ]
    assert ds.items[0] == ImageCaption(
        "good.png", "A red square.", "shapes", messy_folder / "good.png"
    )
    assert ds.items[1].caption == "A green square."  # whitespace collapsed
    assert ds.items[3].category == ""
    assert len(ds) == 4
    assert ds.skipped == collections.Counter(
        {"unreadable image": 2, "missing caption": 1, "empty caption": 1, "missing image file": 1}
    )

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    per_skip = [r.getMessage() for r in warnings if "skipping" in r.getMessage()]
    assert len(per_skip) == 5
    for name, reason in [
        ("corrupt.png", "unreadable image"),
        ("truncated.png", "unreadable image"),
        ("nocaption.png", "missing caption"),
        ("blank.png", "empty caption"),
        ("gone.png", "missing image file"),
    ]:
        assert any(str(messy_folder / name) in m and reason in m for m in per_skip), name
    summary = [r.getMessage() for r in warnings if "usable image-caption pairs" in r.getMessage()]
    assert len(summary) == 1
    assert "4 usable" in summary[0] and "2 unreadable image" in summary[0]


def test_load_image_rgba_composited_on_white_and_grayscale_becomes_rgb(messy_folder: Path) -> None:
    ds = load_dataset(f"folder:{messy_folder}")
    ids = [item.image_id for item in ds.items]

    cutout = ds.load_image(ids.index("cutout.png"))
    assert cutout.mode == "RGB"
    pixels = np.asarray(cutout)
    assert (pixels[:, :4] == 255).all()  # transparent black -> white
    assert (pixels[:, 4:] == (0, 0, 255)).all()

    gray = ds.load_image(ids.index("gray.png"))
    assert gray.mode == "RGB" and gray.size == (5, 4)
    assert (np.asarray(gray) == 77).all()

    assert ds.load_image(0).mode == "RGB"


def test_folder_csv_works_with_and_without_category(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "b.png", color=(0, 0, 0))
    (tmp_path / "captions.csv").write_text(
        "image,caption,category\n"
        'a.png,"A red square, small.",shapes\n'
        "b.png,A black square.,\n"
        "c.png,,\n",
        encoding="utf-8",
    )
    ds = load_dataset(f"folder:{tmp_path}")
    assert [(i.image_id, i.caption, i.category) for i in ds.items] == [
        ("a.png", "A red square, small.", "shapes"),
        ("b.png", "A black square.", ""),
    ]
    assert ds.skipped == collections.Counter({"empty caption": 1})

    other = tmp_path / "nocat"
    save_rgb(other / "x.png")
    (other / "captions.csv").write_text("image,caption\nx.png,An x.\n", encoding="utf-8")
    ds2 = load_dataset(f"folder:{other}")
    assert [(i.image_id, i.caption, i.category) for i in ds2.items] == [("x.png", "An x.", "")]


def test_csv_without_caption_column_is_an_error(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("image,text\na.png,hello\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="caption"):
        load_dataset(f"folder:{tmp_path}")


def test_malformed_and_duplicate_jsonl_lines_are_skipped(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text(
        '{"image": "a.png", "caption": "First."}\n'
        "\n"
        "not json\n"
        '["a list"]\n'
        '{"image": "a.png", "caption": "Second."}\n',
        encoding="utf-8",
    )
    ds = load_dataset(f"folder:{tmp_path}")
    assert [i.caption for i in ds.items] == ["First."]
    assert ds.skipped == collections.Counter(
        {"malformed captions entry": 2, "duplicate image entry": 1}
    )


def test_empty_folder_raises_dataset_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(f"folder:{tmp_path}")
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_folder_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


def test_all_skipped_error_says_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"garbage")
    (tmp_path / "y.png").write_bytes(b"more garbage")
    save_rgb(tmp_path / "z.png")
    write_jsonl(
        tmp_path,
        [
            {"image": "x.png", "caption": "X."},
            {"image": "y.png", "caption": "Y."},
            {"image": "z.png", "caption": ""},
        ],
    )
    with pytest.raises(DatasetError) as info:
        load_dataset(f"folder:{tmp_path}")
    message = str(info.value)
    assert str(tmp_path) in message
    assert "found 3 entries" in message
    assert "all skipped: 2 unreadable image, 1 empty caption" in message


# -- specs ------------------------------------------------------------------


def test_unknown_spec_lists_accepted_specs() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("coco")
    for spec in ("tuxpaint", "folder:<path>", "samples"):
        assert spec in str(info.value)


def test_missing_tuxpaint_folder_names_package_and_fallback(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("tuxpaint", root=tmp_path / "stamps")
    message = str(info.value)
    assert "apt-get install -y --no-install-recommends tuxpaint-stamps-default" in message
    assert "'samples'" in message
    assert str(tmp_path / "stamps") in message


# -- split --------------------------------------------------------------------


def make_dataset(categories: dict[str, int]) -> ImageCaptionDataset:
    items = [
        ImageCaption(f"{cat}/{k}.png", f"A {cat} number {k}.", cat, Path(f"/nowhere/{cat}/{k}.png"))
        for cat, n in categories.items()
        for k in range(n)
    ]
    return ImageCaptionDataset("synthetic", items)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    ds = make_dataset({"animals": 20, "food": 10, "plants": 5, "space": 1})
    train, val = split_train_val(ds, 0.25, seed=3)
    again_train, again_val = split_train_val(ds, 0.25, seed=3)
    assert [i.image_id for i in train.items] == [i.image_id for i in again_train.items]
    assert [i.image_id for i in val.items] == [i.image_id for i in again_val.items]

    train_ids = {i.image_id for i in train.items}
    val_ids = {i.image_id for i in val.items}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {i.image_id for i in ds.items}
    assert len(val) == 9  # round(36 * 0.25)

    per_category = collections.Counter(i.category for i in val.items)
    assert per_category["animals"] == 5 and per_category["food"] in (2, 3)  # stratified

    _, other_val = split_train_val(ds, 0.25, seed=4)
    assert {i.image_id for i in other_val.items} != val_ids


def test_split_both_parts_non_empty_and_too_small_errors() -> None:
    train, val = split_train_val(make_dataset({"a": 2}), 0.01, seed=0)
    assert len(train) == 1 and len(val) == 1
    train, val = split_train_val(make_dataset({"": 3}), 0.99, seed=0)
    assert len(train) == 1 and len(val) == 2
    with pytest.raises(DatasetError):
        split_train_val(make_dataset({"a": 1}), 0.5, seed=0)
    with pytest.raises(ValueError):
        split_train_val(make_dataset({"a": 4}), 0.0, seed=0)


def test_subset_keeps_order_and_checks_indices() -> None:
    ds = make_dataset({"a": 4})
    sub = ds.subset([2, 0])
    assert [i.image_id for i in sub.items] == ["a/2.png", "a/0.png"]
    with pytest.raises(IndexError):
        ds.subset([4])
    with pytest.raises(ValueError):
        ds.subset([1, 1])


# -- fingerprint ----------------------------------------------------------------


def test_fingerprint_changes_with_caption_and_image(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "b.png", color=(1, 2, 3))
    records = [{"image": "a.png", "caption": "A."}, {"image": "b.png", "caption": "B."}]
    write_jsonl(tmp_path, records)
    spec = f"folder:{tmp_path}"
    first = load_dataset(spec).fingerprint()
    assert load_dataset(spec).fingerprint() == first
    assert len(first) == 64

    records[1]["caption"] = "B, changed."
    write_jsonl(tmp_path, records)
    second = load_dataset(spec).fingerprint()
    assert second != first

    save_rgb(tmp_path / "a.png", color=(201, 30, 30))  # same size, one value differs
    third = load_dataset(spec).fingerprint()
    assert third not in (first, second)


# -- image conversion -----------------------------------------------------------


def test_to_rgb_handles_palette_transparency_and_16_bit_gray() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).reshape(-1, 3).tolist() == [[255, 255, 255], [10, 20, 30]]

    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(wide)).reshape(-1, 3).tolist() == [[0, 0, 0], [255, 255, 255]]

    half = Image.new("LA", (1, 1), (0, 128))
    (value,) = np.asarray(to_rgb(half)).reshape(-1, 3).tolist()
    assert all(126 <= v <= 128 for v in value)


# -- Tux Paint --------------------------------------------------------------------


def test_tuxpaint_layout_on_a_fake_tree(tmp_path: Path) -> None:
    root = tmp_path / "stamps"
    save_rgb(root / "animals" / "mammals" / "chimp.png")
    (root / "animals" / "mammals" / "chimp.txt").write_text(
        "A chimpanzee.\nfr.utf8=Un chimpanzé.\n", encoding="utf-8"
    )
    save_rgb(root / "animals" / "mammals" / "chimp_mirror.png")
    save_rgb(root / "vehicles" / "car.png")
    (root / "vehicles" / "car.txt").write_text("A car.\n", encoding="utf-8")
    (root / "vehicles" / "car.svg").write_text("<svg/>", encoding="utf-8")
    (root / "vehicles" / "bus.svg").write_text("<svg/>", encoding="utf-8")
    (root / "vehicles" / "bus.txt").write_text("A bus.\n", encoding="utf-8")
    save_rgb(root / "vehicles" / "nocaption.png")
    (root / "food" / "gift.txt").parent.mkdir(parents=True)
    (root / "food" / "gift.txt").write_text("A gift.\n", encoding="utf-8")
    save_rgb(root / "symbols" / "a.png")
    (root / "symbols" / "a.txt").write_text("The letter a.\n", encoding="utf-8")

    ds = load_dataset("tuxpaint", root=root)
    assert [(i.image_id, i.caption, i.category) for i in ds.items] == [
        ("animals/mammals/chimp.png", "A chimpanzee.", "animals"),
        ("vehicles/car.png", "A car.", "vehicles"),
    ]
    assert ds.skipped == collections.Counter(
        {
            "mirrored variant": 1,
            "svg only": 1,
            "missing caption": 1,
            "caption file without image": 1,
        }
    )
    with_symbols = load_dataset("tuxpaint", root=root, exclude_categories=())
    assert "symbols/a.png" in {i.image_id for i in with_symbols.items}


@pytest.mark.skipif(
    not TUXPAINT_ROOT.is_dir(),
    reason=f"{TUXPAINT_ROOT} missing: apt-get install -y --no-install-recommends "
    "tuxpaint-stamps-default",
)
def test_real_tuxpaint_dataset_loads() -> None:
    ds = load_dataset("tuxpaint")
    assert len(ds) > 500
    assert len(ds.categories) >= 10
    assert {"animals", "food", "plants", "vehicles"} <= set(ds.categories)
    assert "symbols" not in ds.categories
    assert all(item.caption and "=" not in item.caption.split()[0] for item in ds.items)
    assert all(not item.image_id.endswith("_mirror.png") for item in ds.items)
    chimp = [i for i in ds.items if i.image_id.endswith("/chimp.png")]
    assert chimp and chimp[0].caption == "A chimpanzee."
    image = ds.load_image(0)
    assert image.mode == "RGB"

    train, val = split_train_val(ds, 0.2, seed=0)
    assert len(train) + len(val) == len(ds)
    assert set(val.categories) <= set(ds.categories)


# -- samples ----------------------------------------------------------------------


def test_samples_dataset_loads() -> None:
    ds = load_dataset("samples")
    assert len(ds) >= 2
    assert all(item.caption and item.category for item in ds.items)
    assert len({item.image_id for item in ds.items}) == len(ds)
    for index in range(len(ds)):
        image = ds.load_image(index)
        assert image.mode == "RGB" and min(image.size) > 0
    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image not installed: only the 2 scikit-learn samples were checked")
    assert len(ds) >= 12
    assert "skimage/astronaut.png" in {item.image_id for item in ds.items}


def test_in_memory_items_use_their_loader() -> None:
    def loader() -> Image.Image:
        return Image.new("LA", (3, 2), (10, 255))

    item = ImageCaption("mem/a", "A dark patch.", "", None)
    ds = ImageCaptionDataset("memory", [item], loaders={"mem/a": loader})
    image = ds.load_image(0)
    assert image.mode == "RGB" and (np.asarray(image) == 10).all()
    assert len(ds.fingerprint()) == 64
    assert ds.subset([0]).load_image(0).mode == "RGB"
    with pytest.raises(ValueError, match="no path and no loader"):
        ImageCaptionDataset("memory", [item])


def test_exclude_categories_works_for_every_spec(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "b.png")
    write_jsonl(
        tmp_path,
        [
            {"image": "a.png", "caption": "A.", "category": "keep"},
            {"image": "b.png", "caption": "B.", "category": "drop"},
        ],
    )
    ds = load_dataset(f"folder:{tmp_path}", exclude_categories=["drop"])
    assert [i.image_id for i in ds.items] == ["a.png"]
    assert not ds.skipped
    with pytest.raises(DatasetError, match="excluded categories: drop, keep"):
        load_dataset(f"folder:{tmp_path}", exclude_categories=["drop", "keep"])

    samples = load_dataset("samples", exclude_categories=["symbols", "plants"])
    assert samples.items and "plants" not in samples.categories
