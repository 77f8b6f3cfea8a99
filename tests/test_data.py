"""Image-folder loading, the bundled digits export and partitioning, on real files."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grbfl import data
from grbfl.data import (
    DIGIT_CLASSES,
    IMAGE_SIZE,
    ImageSet,
    discover_classes,
    export_digits,
    list_images,
    load_image_folder,
    parse_partition_scheme,
    partition,
)
from grbfl.errors import DataError

# The federation's class order, deliberately not the alphabetical order of the folders.
CLASSES = ("dog", "cat", "bird", "frog")

RED = (200, 30, 40)
GREEN = (20, 180, 60)


def _solid(mode: str, color: object, size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new(mode, size, color)  # type: ignore[arg-type]


@pytest.fixture()
def image_root(tmp_path: Path) -> Path:
    """A class-folder tree with every kind of file a user might have.

    dog: RGB JPEG, greyscale PNG, RGBA PNG (half transparent), upper-case .PNG
    cat: palette PNG, CMYK JPEG, a 64x48 RGB PNG (cropped and resized), a corrupt .jpg
    bird: one greyscale JPEG, a text file that is not an image
    frog: listed in CLASSES but absent locally
    extra: a folder that is not a class
    """
    root = tmp_path / "images"
    for name in ("dog", "cat", "bird", "extra"):
        (root / name).mkdir(parents=True)

    _solid("RGB", RED).save(root / "dog" / "a_rgb.jpg", quality=95)
    _solid("L", 77).save(root / "dog" / "b_grey.png")
    rgba = _solid("RGBA", (*GREEN, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 16, 32))  # left half fully transparent
    rgba.save(root / "dog" / "c_rgba.png")
    _solid("RGB", GREEN).save(root / "dog" / "d_upper.PNG")

    palette = _solid("RGB", RED).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(root / "cat" / "a_palette.png")
    _solid("CMYK", (0, 255, 255, 0)).save(root / "cat" / "b_cmyk.jpg")
    wide = _solid("RGB", GREEN, size=(64, 48))
    wide.paste(RED, (0, 0, 8, 48))  # a red strip the center crop cuts away
    wide.save(root / "cat" / "c_wide.png")
    (root / "cat" / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

    _solid("L", 200).save(root / "bird" / "a_grey.jpg")
    (root / "bird" / "notes.txt").write_text("not an image")

    _solid("RGB", GREEN).save(root / "extra" / "stray.png")
    return root


def test_loader_returns_rgb_uint8_32x32_for_every_image_mode(image_root: Path) -> None:
    """Greyscale, RGBA, palette, CMYK and oversized images all come out 32x32 RGB."""
    images = load_image_folder(image_root, CLASSES)

    assert images.images.dtype == np.uint8
    assert images.images.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert images.labels.dtype == np.int64
    assert images.classes == CLASSES


def test_labels_follow_the_callers_class_order_not_the_folder_order(
    image_root: Path,
) -> None:
    """dog is class 0 because the federation says so, although 'bird' sorts first."""
    images = load_image_folder(image_root, CLASSES)

    counts = images.class_counts()
    assert counts.tolist() == [4, 3, 1, 0]  # dog, cat, bird, frog (absent)


def test_pixels_are_converted_faithfully(image_root: Path) -> None:
    """Colours survive every conversion; transparency turns black; crops keep center."""
    listing = [rel for rel, _ in list_images(image_root, CLASSES)]
    readable = [rel for rel in listing if not rel.endswith("d_corrupt.jpg")]
    loaded = load_image_folder(image_root, CLASSES)
    by_name = {
        Path(rel).name: img for rel, img in zip(readable, loaded.images, strict=True)
    }

    assert np.abs(by_name["a_rgb.jpg"].astype(int) - RED).max() <= 3
    assert (by_name["b_grey.png"] == 77).all()
    assert (by_name["c_rgba.png"][:, :16] == 0).all()
    assert (by_name["c_rgba.png"][:, 16:] == GREEN).all()
    assert (by_name["d_upper.PNG"] == GREEN).all()
    assert (by_name["a_palette.png"] == RED).all()
    cmyk = by_name["b_cmyk.jpg"].astype(int)
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60  # cyan-free red
    assert (by_name["c_wide.png"] == GREEN).all()
    assert np.abs(by_name["a_grey.jpg"].astype(int) - 200).max() <= 2


def test_corrupt_file_is_skipped_with_one_warning_naming_it(
    image_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken file costs one image and one warning, not the whole load."""
    with caplog.at_level(logging.WARNING, logger="grbfl.data"):
        images = load_image_folder(image_root, CLASSES)

    assert len(images) == 8
    corrupt = [r for r in caplog.records if "d_corrupt.jpg" in r.getMessage()]
    assert len(corrupt) == 1


def test_sub_folder_outside_the_class_list_is_skipped_with_a_warning(
    image_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stray folder is named once in the log and contributes no images."""
    with caplog.at_level(logging.WARNING, logger="grbfl.data"):
        listing = list_images(image_root, CLASSES)

    assert not any(rel.startswith("extra/") for rel, _ in listing)
    assert any("extra" in r.getMessage() for r in caplog.records)


def test_listing_holds_only_jpeg_and_png_files_sorted(image_root: Path) -> None:
    """Text files are ignored, extensions match in any case, the order is stable."""
    listing = list_images(image_root, CLASSES)

    paths = [rel for rel, _ in listing]
    assert paths == sorted(paths)
    assert "bird/notes.txt" not in paths
    assert "dog/d_upper.PNG" in paths
    assert len(paths) == 9  # 8 readable images and the corrupt one


def test_every_file_unreadable_raises_data_error_naming_the_folder(
    tmp_path: Path,
) -> None:
    """If nothing can be decoded, the load fails instead of returning an empty set."""
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "x.png").write_bytes(b"garbage")
    (tmp_path / "cat" / "y.jpg").write_bytes(b"")

    with pytest.raises(DataError, match=str(tmp_path)):
        load_image_folder(tmp_path, ("cat",))


def test_missing_root_raises_data_error_naming_it(tmp_path: Path) -> None:
    """A mistyped data folder is reported by name."""
    missing = tmp_path / "nowhere"

    with pytest.raises(DataError, match="nowhere"):
        load_image_folder(missing, CLASSES)


def test_folder_without_images_of_listed_classes_raises(tmp_path: Path) -> None:
    """Class folders that exist but hold no images are an error, not an empty set."""
    (tmp_path / "cat").mkdir()

    with pytest.raises(DataError, match="no JPEG or PNG"):
        load_image_folder(tmp_path, ("cat",))


def test_files_argument_restricts_the_load_to_those_paths(image_root: Path) -> None:
    """The simulator hands each participant only its partition."""
    images = load_image_folder(
        image_root, CLASSES, files=["dog/b_grey.png", "bird/a_grey.jpg"]
    )

    assert len(images) == 2
    assert sorted(images.labels.tolist()) == [0, 2]


def test_files_argument_with_an_unknown_path_raises(image_root: Path) -> None:
    """A partition that names a file the folder lacks is reported, not ignored."""
    with pytest.raises(DataError, match="dog/missing.png"):
        load_image_folder(image_root, CLASSES, files=["dog/missing.png"])


def test_cache_is_reused_until_a_file_changes(
    image_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart loads from the cache; touching an image invalidates it."""
    cache = tmp_path / "cache"
    first = load_image_folder(image_root, CLASSES, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    # Decoding now fails loudly: a second load can only succeed from the cache.
    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(data, "_decode_all", no_decoding)
    second = load_image_folder(image_root, CLASSES, cache_dir=cache)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)

    # Rewriting a file changes its size and time, so the cache key no longer matches.
    _solid("RGB", GREEN).save(image_root / "bird" / "a_grey.jpg")
    os.utime(image_root / "bird" / "a_grey.jpg", ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded"):
        load_image_folder(image_root, CLASSES, cache_dir=cache)


def test_rebuilding_the_cache_removes_the_outdated_one(
    image_root: Path, tmp_path: Path
) -> None:
    """A changed folder leaves one cache file, not one per version."""
    cache = tmp_path / "cache"
    load_image_folder(image_root, CLASSES, cache_dir=cache)
    load_image_folder(image_root, CLASSES, cache_dir=cache, files=["dog/b_grey.png"])
    (image_root / "bird" / "a_grey.jpg").unlink()

    reloaded = load_image_folder(image_root, CLASSES, cache_dir=cache)

    assert len(reloaded) == 7
    assert len(list(cache.glob("*.npz"))) == 2  # the new full load and the partition
    assert not list(cache.glob("*.tmp"))


def test_progress_reports_the_final_count(image_root: Path) -> None:
    """The progress callback ends at (total, total)."""
    calls: list[tuple[int, int]] = []

    load_image_folder(image_root, CLASSES, progress=lambda d, t: calls.append((d, t)))

    assert calls[-1] == (9, 9)


def test_discover_classes_lists_sorted_sub_folders(image_root: Path) -> None:
    """Without a configured list, the folder names sorted are the classes."""
    assert discover_classes(image_root) == ("bird", "cat", "dog", "extra")


def test_as_float_is_channels_first_in_the_unit_range() -> None:
    """The model input layout: float32 (N, 3, 32, 32), 0 and 255 map to 0.0 and 1.0."""
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[1, :, :, 2] = 255
    subset = ImageSet(images, np.array([0, 1]), ("a", "b")).subset(np.array([1]))

    x = subset.as_float()

    assert x.dtype == np.float32 and x.shape == (1, 3, 32, 32)
    assert x[0, 2].min() == 1.0 and x[0, :2].max() == 0.0


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    export_digits(root)
    return root


def test_export_digits_writes_real_png_folders_split_80_20(digits_root: Path) -> None:
    """All 1,797 digits land as 32x32 PNGs, each class in both splits."""
    train = list_images(digits_root / "train", DIGIT_CLASSES)
    test = list_images(digits_root / "test", DIGIT_CLASSES)

    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=1)
    assert {label for _, label in test} == set(range(10))
    with Image.open(digits_root / "train" / train[0][0]) as img:
        assert img.format == "PNG" and img.size == (32, 32)
    assert not set(train) & set(test)


def test_exported_digits_load_through_the_image_folder_loader(
    digits_root: Path,
) -> None:
    """The default data set goes through the same loader as a user's photos."""
    test = load_image_folder(digits_root / "test", DIGIT_CLASSES)

    assert len(test) == 360
    assert test.images.max() == 255
    assert (test.images[..., 0] == test.images[..., 2]).all()  # greyscale as RGB


def test_export_digits_is_idempotent(digits_root: Path) -> None:
    """A second call finds the complete set and rewrites nothing."""
    some_file = next((digits_root / "train" / "3").iterdir())
    before = some_file.stat().st_mtime_ns

    train, test = export_digits(digits_root)

    assert train == digits_root / "train" and test == digits_root / "test"
    assert some_file.stat().st_mtime_ns == before


def test_export_digits_redoes_an_interrupted_export(tmp_path: Path) -> None:
    """Without the completion marker, a half-written folder is replaced entirely."""
    (tmp_path / "train" / "0").mkdir(parents=True)
    (tmp_path / "train" / "0" / "leftover.png").write_bytes(b"half")

    export_digits(tmp_path)

    assert not (tmp_path / "train" / "0" / "leftover.png").exists()
    total = len(list_images(tmp_path / "train", DIGIT_CLASSES))
    assert total + len(list_images(tmp_path / "test", DIGIT_CLASSES)) == 1797
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".digits-")]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "dirichlet:100"])
def test_partition_is_disjoint_and_covers_every_sample(scheme: str) -> None:
    """Each index lands in exactly one non-empty part."""
    labels = np.random.default_rng(1).integers(0, 10, size=1000)

    parts = partition(labels, 5, scheme, seed=0)

    assert len(parts) == 5 and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(1000))
    assert all(p.dtype == np.int64 for p in parts)


def test_iid_parts_are_equal_in_size_and_deterministic_per_seed() -> None:
    """Same seed, same split; sizes differ by at most one."""
    labels = np.zeros(1001, dtype=np.int64)

    parts = partition(labels, 3, "iid", seed=7)

    assert sorted(len(p) for p in parts) == [333, 334, 334]
    again = partition(labels, 3, "iid", seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 3, "iid", seed=8)
    assert not np.array_equal(parts[0], other[0])


def test_small_dirichlet_alpha_skews_each_parts_labels() -> None:
    """With alpha 0.1 a part is dominated by a few classes; iid parts are not."""
    labels = np.repeat(np.arange(10), 200)

    def top_class_share(scheme: str) -> float:
        parts = partition(labels, 4, scheme, seed=0)
        shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
        return float(np.mean(shares))

    assert top_class_share("dirichlet:0.1") > 0.3
    assert top_class_share("iid") < 0.15


def test_dirichlet_leaves_no_part_empty_even_with_tiny_alpha() -> None:
    """Twenty parts of forty samples at alpha 0.01: every part still gets one."""
    labels = np.repeat(np.arange(2), 20)

    parts = partition(labels, 20, "dirichlet:0.01", seed=3)

    assert all(len(p) >= 1 for p in parts)
    assert sum(len(p) for p in parts) == 40


@pytest.mark.parametrize(
    "scheme",
    ["", "noniid", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1",
     "dirichlet:abc", "dirichlet:nan", "dirichlet:inf"],
)  # fmt: skip
def test_bad_partition_scheme_raises_value_error_naming_the_allowed_forms(
    scheme: str,
) -> None:
    """The message tells the operator what to write instead."""
    with pytest.raises(ValueError, match=r"'iid', or 'dirichlet:ALPHA'"):
        partition(np.zeros(10), 2, scheme, seed=0)


def test_partition_scheme_parses_case_and_spaces_leniently() -> None:
    """A scheme from a command line or TOML file parses to its kind and alpha."""
    assert parse_partition_scheme(" IID ") == ("iid", None)
    assert parse_partition_scheme("Dirichlet:0.5") == ("dirichlet", 0.5)


def test_more_parts_than_samples_raises() -> None:
    """Five samples cannot fill six non-empty parts."""
    with pytest.raises(ValueError, match="6"):
        partition(np.zeros(5), 6, "iid", seed=0)


# --- hostile or damaged input ----------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds one tiny compressed row.

    PIL refuses or warns about an image by its declared size, at open; building the
    real 400-Mpixel file would take seconds and gigabytes.
    """
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4))
        + chunk(b"IEND", b"")
    )


def test_dangling_link_is_skipped_with_one_warning_and_the_cache_still_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A link to a deleted photo costs one image, with or without a cache."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    _solid("RGB", RED).save(root / "cat" / "a.png")
    (root / "cat" / "b_gone.png").symlink_to(root / "cat" / "deleted.png")

    with caplog.at_level(logging.WARNING, logger="grbfl.data"):
        plain = load_image_folder(root, ("cat",))
        cached = load_image_folder(root, ("cat",), cache_dir=tmp_path / "cache")
        again = load_image_folder(root, ("cat",), cache_dir=tmp_path / "cache")

    assert len(plain) == len(cached) == len(again) == 1
    warned = [r for r in caplog.records if "b_gone.png" in r.getMessage()]
    assert len(warned) == 2  # one per decoding load; the cached load decodes nothing


def test_decompression_bomb_is_skipped_like_an_unreadable_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PNG that claims 20000x20000 pixels is one skipped file, not a crash."""
    (tmp_path / "cat").mkdir()
    _solid("RGB", RED).save(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "b_bomb.png").write_bytes(_png_header_only(20000, 20000))

    with caplog.at_level(logging.WARNING, logger="grbfl.data"):
        images = load_image_folder(tmp_path, ("cat",))

    assert len(images) == 1
    (warned,) = [r for r in caplog.records if "b_bomb.png" in r.getMessage()]
    assert "decompression bomb" in warned.getMessage()


def test_large_images_do_not_print_pil_decompression_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above PIL's warning size each image still loads, and PIL stays silent."""
    import warnings

    (tmp_path / "cat").mkdir()
    for size in (40, 41, 42):
        _solid("RGB", RED, size=(size, size)).save(tmp_path / "cat" / f"{size}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warns from 32x32 on

    with warnings.catch_warnings(record=True) as caught:
        images = load_image_folder(tmp_path, ("cat",))

    assert len(images) == 3
    assert not [w for w in caught if w.category is Image.DecompressionBombWarning]


@pytest.mark.parametrize(
    "bad", ["..", ".", "", "/etc", "../images", "a/b", "a\\b", "nul\0l"]
)
def test_class_that_is_not_one_folder_name_raises_naming_it(
    image_root: Path, bad: str
) -> None:
    """A class list from elsewhere cannot point the loader outside the data folder."""
    with pytest.raises(DataError, match=f"class {re.escape(repr(bad))} is not a"):
        load_image_folder(image_root, ("dog", bad))


def test_links_leading_outside_the_data_folder_are_skipped(
    image_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither a linked class folder nor a linked file is read from outside root."""
    secret = tmp_path / "secret"
    secret.mkdir()
    _solid("RGB", RED).save(secret / "private.png")
    (image_root / "dog" / "e_link.png").symlink_to(secret / "private.png")
    (image_root / "frog").symlink_to(secret)
    (image_root / "bird" / "b_inside.png").symlink_to(image_root / "dog" / "b_grey.png")

    with caplog.at_level(logging.WARNING, logger="grbfl.data"):
        listing = [rel for rel, _ in list_images(image_root, CLASSES)]

    assert "dog/e_link.png" not in listing
    assert not [rel for rel in listing if rel.startswith("frog/")]
    assert "bird/b_inside.png" in listing  # a link within root is fine
    assert any("2 link(s)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", ["../x.png", "dog/../../x.png", "/etc/passwd.png"])
def test_requested_file_outside_the_data_folder_raises_naming_it(
    image_root: Path, bad: str
) -> None:
    """A files list entry that escapes root is refused, not looked up."""
    with pytest.raises(DataError, match=re.escape(repr(bad))):
        load_image_folder(image_root, CLASSES, files=["dog/b_grey.png", bad])


def _cache_file(cache: Path) -> Path:
    (path,) = cache.glob("*.npz")
    return path


def _rewrite_cache(path: Path, **changes: object) -> None:
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays.update(changes)
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "damage",
    [
        {"labels": np.array([0, 0, 0, 0, 99, 1, 1, 2])},
        {"labels": np.zeros(8, np.float32)},
        {"images": np.zeros((3, 32, 32, 3), np.uint8)},
        {"images": np.zeros((8, 32, 32), np.uint8)},
        {"images": np.zeros((8, 32, 32, 3), np.float32)},
        {"index": np.array([0, 1, 2, 3, 5, 4, 6, 7])},
        {"index": np.arange(1, 9)},
        {"requested": np.int64(400)},
    ],
    ids=["label-99", "float-labels", "3-images", "no-channels", "float-images",
         "index-order", "index-range", "count"],
)  # fmt: skip
def test_damaged_cache_is_decoded_again_with_a_warning(
    image_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: dict[str, np.ndarray],
) -> None:
    """A cache that disagrees with the folder is never used."""
    cache = tmp_path / "cache"
    first = load_image_folder(image_root, CLASSES, cache_dir=cache)
    _rewrite_cache(_cache_file(cache), **damage)

    with caplog.at_level(logging.WARNING, logger="grbfl.data"):
        second = load_image_folder(image_root, CLASSES, cache_dir=cache)

    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert any("ignoring image cache" in r.getMessage() for r in caplog.records)


def test_cache_of_another_file_list_is_not_used(
    image_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache copied over this load's name (3 of 9 files) is decoded again."""
    small, full = tmp_path / "small", tmp_path / "full"
    three = ["dog/a_rgb.jpg", "dog/b_grey.png", "cat/a_palette.png"]
    load_image_folder(image_root, CLASSES, files=three, cache_dir=small)
    load_image_folder(image_root, CLASSES, cache_dir=full)
    _cache_file(small).replace(_cache_file(full))

    with caplog.at_level(logging.WARNING, logger="grbfl.data"):
        images = load_image_folder(image_root, CLASSES, cache_dir=full)

    assert len(images) == 8
    assert any("made for 3 files, not 9" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 torn", b"not a zip at all"])
def test_unreadable_cache_file_is_decoded_again(
    image_root: Path, tmp_path: Path, content: bytes
) -> None:
    """Truncated or foreign bytes in the cache never fail the load."""
    cache = tmp_path / "cache"
    load_image_folder(image_root, CLASSES, cache_dir=cache)
    _cache_file(cache).write_bytes(content)

    assert len(load_image_folder(image_root, CLASSES, cache_dir=cache)) == 8


def test_cache_without_an_index_from_an_older_version_is_replaced(
    image_root: Path, tmp_path: Path
) -> None:
    """A cache written before the index existed is decoded again and rewritten."""
    cache = tmp_path / "cache"
    load_image_folder(image_root, CLASSES, cache_dir=cache)
    path = _cache_file(cache)
    with np.load(path) as npz:
        old = {"images": npz["images"], "labels": npz["labels"]}
    with path.open("wb") as fh:
        np.savez(fh, **old)

    load_image_folder(image_root, CLASSES, cache_dir=cache)

    with np.load(_cache_file(cache)) as npz:
        assert {"index", "requested"} <= set(npz.files)


# --- random subsets --------------------------------------------------------------


def _labelled(counts: list[int]) -> ImageSet:
    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None]
    images = np.broadcast_to(images, (len(labels), 32, 32, 3)).copy()
    return ImageSet(images, labels, tuple(f"c{i}" for i in range(len(counts))))


def test_random_subset_keeps_each_class_in_proportion() -> None:
    """Sorted files by class: the first 100 would all be c0; the subset is not."""
    images = _labelled([600, 300, 100])

    subset = data.random_subset(images, 100, seed=0)

    assert len(subset) == 100
    assert subset.class_counts().tolist() == [60, 30, 10]


def test_random_subset_is_random_but_fixed_per_seed() -> None:
    """Same seed, same images; another seed, other images; the order is kept."""
    images = _labelled([50, 50])

    first = data.random_subset(images, 10, seed=1)
    again = data.random_subset(images, 10, seed=1)
    other = data.random_subset(images, 10, seed=2)

    np.testing.assert_array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)
    assert np.all(np.diff(first.images[:, 0, 0, 0].astype(int)) > 0)
    assert first.images[:, 0, 0, 0].tolist() != list(range(10))


def test_random_subset_without_a_limit_keeps_everything() -> None:
    """0, or a limit at least the size, returns the set itself; negative is refused."""
    images = _labelled([3, 2])

    assert data.random_subset(images, 0, seed=0) is images
    assert data.random_subset(images, 5, seed=0) is images
    with pytest.raises(ValueError, match="-1"):
        data.random_subset(images, -1, seed=0)
