"""Image data: folders of class sub-folders in, uint8 arrays out, and how to split them.

A data folder is the layout a lab user already has on disk::

    root/<class name>/<any name>.jpg|.jpeg|.png

The class list and its order come from the federation's configuration, never from the
local folder: a Pi that holds no images of a class, or lists its folders in another
order, must still produce the same label numbers as every other node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from grbfl.errors import DataError

log = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

# Every model and every granular ball works on 32x32 RGB; larger images are reduced.
IMAGE_SIZE = 32

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

# What operating systems and tools leave in folders (compared in lower case):
# never images, never classes. Names starting with "." are hidden files, macOS
# .DS_Store and AppleDouble "._name" files and folders like .ipynb_checkpoints.
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
_JUNK_FOLDERS = frozenset(
    {
        "__macosx",
        "__pycache__",
        "lost+found",
        "$recycle.bin",
        "system volume information",
    }
)

# Transparent pixels are composited onto this colour: fixed, so that a transparent
# area means the same input to every device's model.
BACKGROUND = (0, 0, 0)

# Largest image decoded, in pixels after a JPEG's shrink-on-load. A 50-megapixel
# photo decodes to 200 MB of RGBA; a PNG declaring more is skipped unread, since
# a few kilobytes of compressed zeros can declare gigabytes (a decompression bomb).
# PIL's own guard only warns up to 179 M pixels.
MAX_DECODE_PIXELS = 50_000_000

# Skipped files named one by one in warnings before the rest are only counted.
_NAMED_FILES = 20

# Progress is reported every this many files: often enough for a progress bar, rarely
# enough to cost nothing next to decoding (about 0.2 s per 1,000 small JPEGs).
_PROGRESS_EVERY = 1000

# Bumped whenever the decoding below changes, so that old caches are not reused.
_CACHE_VERSION = 2
# What a cache file holds; one that lacks any of these is decoded again.
_CACHE_ARRAYS = ("images", "labels", "index", "requested")

# export_digits: 80/20 stratified split with a fixed seed, the same on every machine.
_DIGITS_TEST_SHARE = 0.2
_DIGITS_SEED = 0
_DIGITS_MARKER = ".grbfl-digits-complete"

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageSet:
    """Decoded images with their labels and the class names the labels index."""

    images: np.ndarray  # uint8 (N, 32, 32, 3), RGB
    labels: np.ndarray  # int64 (N,), index into classes
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The images at the given indices (a copy), with the same class list."""
        idx = np.asarray(idx)
        return ImageSet(self.images[idx], self.labels[idx], self.classes)

    def as_float(self) -> np.ndarray:
        """float32 (N, 3, 32, 32) in [0, 1]: the model input and the balls' space."""
        out = np.empty((len(self), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        # Divide rather than multiply by 1/255: the result then matches, bit for bit,
        # the per-batch conversion the training loop applies to uint8 input.
        np.divide(self.images.transpose(0, 3, 1, 2), np.float32(255.0), out=out)
        return out

    def class_counts(self) -> np.ndarray:
        """Number of images per class, int64 (len(classes),)."""
        return np.bincount(self.labels, minlength=len(self.classes)).astype(np.int64)


def discover_classes(root: Path) -> tuple[str, ...]:
    """Sorted names of the sub-folders of root: a class list when none is configured."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    names = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and not is_junk_folder(entry.name)
    )
    if not names:
        raise DataError(f"data folder {root} has no class sub-folders")
    return tuple(names)


def is_junk_folder(name: str) -> bool:
    """Whether a folder is system or tool litter that can never be a class."""
    return name.startswith(".") or name.lower() in _JUNK_FOLDERS


def _not_an_image(name: str) -> str | None:
    """Why a file in a class folder is not read as an image; None if it is one."""
    if name.startswith("._"):
        return "AppleDouble metadata"
    if name.startswith("."):
        return "hidden file"
    if name.lower() in _SYSTEM_FILES:
        return "system file"
    if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
        return "not a .jpg, .jpeg or .png file"
    return None


def check_class_names(root: Path, classes: Sequence[str]) -> None:
    """DataError naming the first class that is not one folder name under root.

    The class list may come from a federation's configuration rather than from the
    local disk; '..', '/etc' or 'a/b' would make the loader read outside root.
    """
    separators = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    for name in classes:
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or any(sep in name for sep in separators)
        ):
            raise DataError(
                f"data folder {root}: class {name!r} is not a folder name directly "
                "under the data folder (no empty name, '.', '..', '/' or '\\')"
            )


def _inside(path: str, real_root: str) -> bool:
    """Whether path, with its links followed, lies within real_root."""
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _unreadable(exc: OSError) -> None:
    """os.walk's report of a folder it cannot list: its images are left out."""
    log.warning("skipping folder %s: %s", exc.filename, exc.strerror or exc)


def list_images(root: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """(path relative to root, label) of every JPEG and PNG in root's class folders.

    Sorted by path. A listed class without a local folder is fine (a device may hold no
    images of it); a sub-folder that is not a listed class is skipped with one warning,
    and so are links that lead outside root: nothing outside root is ever read.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    check_class_names(root, classes)
    label_of = {name: i for i, name in enumerate(classes)}
    if len(label_of) != len(classes):
        raise DataError(f"class list for {root} names a class twice: {list(classes)}")

    # Only class folders hold images; files lying directly in root belong to no class.
    unknown = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir()
        and not is_junk_folder(entry.name)
        and entry.name not in label_of
    )
    if unknown:
        log.warning(
            "data folder %s: skipping %d sub-folder(s) not in the class list: %s",
            root,
            len(unknown),
            ", ".join(unknown),
        )
    # os.walk does not descend into linked folders below a class folder, so only the
    # class folder itself and linked files can lead outside root: check those.
    real_root = os.path.realpath(root)
    found: list[tuple[str, int]] = []
    outside: list[str] = []
    ignored: list[str] = []
    for name, label in label_of.items():
        folder = root / name
        if not folder.is_dir():
            continue
        if folder.is_symlink() and not _inside(str(folder), real_root):
            outside.append(name)
            continue
        for dirpath, dirnames, filenames in os.walk(folder, onerror=_unreadable):
            dirnames[:] = sorted(d for d in dirnames if not is_junk_folder(d))
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for fname in sorted(filenames):
                reason = _not_an_image(fname)
                if reason is not None:
                    ignored.append(f"{rel_dir}/{fname} ({reason})")
                    continue
                full = os.path.join(dirpath, fname)
                if os.path.islink(full) and not _inside(full, real_root):
                    outside.append(f"{rel_dir}/{fname}")
                    continue
                found.append((f"{rel_dir}/{fname}", label))
    if outside:
        log.warning(
            "data folder %s: skipping %d link(s) that lead outside it, e.g. %s",
            root,
            len(outside),
            outside[0],
        )
    if ignored:
        more = len(ignored) - _NAMED_FILES
        log.warning(
            "data folder %s: skipping %d file(s) that are not images: %s%s",
            root,
            len(ignored),
            ", ".join(ignored[:_NAMED_FILES]),
            f" and {more} more" if more > 0 else "",
        )
    found.sort()
    return found


def _to_rgb(img: Image.Image) -> Image.Image:
    """The image as 8-bit RGB; transparent areas become BACKGROUND.

    Transparency comes as an alpha channel (RGBA, LA, PA), as a palette entry or
    as one colour named transparent (PNG tRNS in P, L and RGB images).
    """
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("RGBA")
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greyscale PNG: keep the top byte rather than clipping at 255.
        arr = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.clip(np.asarray(img, dtype=np.float64), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _square_resize(img: Image.Image) -> Image.Image:
    """Center-crop to a square (keeps proportions), then resize to IMAGE_SIZE."""
    w, h = img.size
    if (w, h) == (IMAGE_SIZE, IMAGE_SIZE):
        return img
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)


def decode_image(path: Path) -> np.ndarray:
    """One image file as uint8 (32, 32, 3) RGB; DataError naming it if unusable."""
    too_large: tuple[int, int] | None = None
    try:
        # PIL warns above 89 Mpixel and refuses above twice that; the refusal skips
        # the file below, and so does MAX_DECODE_PIXELS, well under the warning.
        # catch_warnings swaps process-wide state; nothing else in grbfl uses it
        # during a load.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.format == "JPEG" and min(img.size) > 2 * IMAGE_SIZE:
                # Let libjpeg scale a large photo down while decoding: much faster.
                img.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))
            if img.size[0] * img.size[1] > MAX_DECODE_PIXELS:
                too_large = img.size
            else:
                img.load()
                arr = np.asarray(_square_resize(_to_rgb(img)), dtype=np.uint8)
    except Exception as exc:
        # A malformed file trips PIL in many ways: OSError, SyntaxError, EOFError,
        # struct.error, DecompressionBombError for a huge one. Each costs one image.
        reason = str(exc) or type(exc).__name__
        raise DataError(f"cannot read image {path}: {reason}") from exc
    if too_large is not None:
        raise DataError(
            f"cannot read image {path}: it declares {too_large[0]}x{too_large[1]} "
            f"pixels, above the {MAX_DECODE_PIXELS} decoded (a decompression bomb?)"
        )
    if arr.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DataError(f"image {path} decoded to unexpected shape {arr.shape}")
    return arr


def _cache_name(
    root: Path,
    classes: Sequence[str],
    files: Sequence[str] | None,
    listing: Sequence[tuple[str, int]],
) -> tuple[str, str]:
    """(prefix, file name) of the cache for this load.

    The prefix names the request (folder, classes, requested files); the rest hashes
    what decides the decoded arrays (paths, labels, sizes, times). A cache with the
    same prefix and another hash is outdated and can go.
    """
    request = [_CACHE_VERSION, str(root.resolve()), list(classes)]
    if files is not None:
        request.append(sorted(Path(f).as_posix() for f in files))
    prefix = "images-" + hashlib.sha256(json.dumps(request).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for rel, label in listing:
        try:
            st = os.stat(root / rel)
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:
            # A dangling link or an unreadable entry: decoding will skip it with a
            # warning; the cache is still keyed on its absence.
            stamp = "unreadable"
        h.update(f"\0{rel}\0{label}\0{stamp}".encode())
    return prefix, f"{prefix}-{h.hexdigest()[:16]}.npz"


def _load_cache(
    path: Path, listing: Sequence[tuple[str, int]]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) from a cache of this listing; None, with a warning, if unfit.

    A cache holds the decoded images, their labels, their positions in the listing
    (files that could not be decoded have none) and the listing's length; all of it
    must agree with the listing, or the folder is decoded again.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = sorted(set(_CACHE_ARRAYS) - set(npz.files))
            if missing:
                # Most likely written by an earlier grbfl, which stored no index.
                log.warning(
                    "ignoring image cache %s: no %s; decoding again",
                    path,
                    ", ".join(missing),
                )
                return None
            images, labels = npz["images"], npz["labels"]
            index, requested = npz["index"], npz["requested"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable image cache %s: %s", path, exc)
        return None

    n = len(listing)
    problem = None
    if requested.shape != () or requested.dtype.kind not in "iu":
        problem = "no file count"
    elif int(requested) != n:
        problem = f"made for {int(requested)} files, not {n}"
    elif images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        problem = f"images are {images.dtype} {images.shape}"
    elif not 0 < images.shape[0] <= n:
        problem = f"{images.shape[0]} images for {n} files"
    elif index.dtype.kind not in "iu" or index.shape != (images.shape[0],):
        problem = f"index is {index.dtype} {index.shape}"
    elif index[0] < 0 or index[-1] >= n or np.any(np.diff(index) <= 0):
        problem = "index out of order or out of range"
    elif labels.dtype.kind not in "iu" or labels.shape != index.shape:
        problem = f"labels are {labels.dtype} {labels.shape}"
    else:
        expected = np.fromiter((label for _, label in listing), np.int64, count=n)
        if not np.array_equal(labels, expected[index]):
            problem = "labels differ from the class folders"
    if problem is not None:
        log.warning("ignoring image cache %s: %s; decoding again", path, problem)
        return None
    return images, labels.astype(np.int64, copy=False)


def _write_cache(
    path: Path, images: np.ndarray, labels: np.ndarray, index: np.ndarray, n: int
) -> None:
    """Write the arrays next to path, then rename: a crash never leaves half a cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    images=images,
                    labels=labels,
                    index=index,
                    requested=np.int64(n),
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        # A cache is an optimisation: failing to write one must not fail the load.
        log.warning("cannot write image cache %s: %s", path, exc)


def load_image_folder(
    root: Path,
    classes: Sequence[str],
    *,
    files: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> ImageSet:
    """Decode every image under root's class folders into an ImageSet.

    classes fixes the label numbers (the federation's list, not the folder order).
    files, when given, restricts the load to those paths relative to root. Unreadable
    files are skipped with a warning; if none can be read, DataError. With cache_dir,
    the decoded arrays are kept there and reused while no file changes.
    """
    root = Path(root)
    listing = list_images(root, classes)

    # Restrict to the requested files, which must lie in a class folder under root.
    if files is not None:
        for f in files:
            rel = Path(f)
            if not str(f).strip() or rel.is_absolute() or ".." in rel.parts:
                raise DataError(
                    f"data folder {root}: requested file {str(f)!r} is not a path "
                    "inside the data folder"
                )
        by_path = dict(listing)
        wanted = [Path(f).as_posix() for f in files]
        missing = [f for f in wanted if f not in by_path]
        if missing:
            raise DataError(
                f"data folder {root}: {len(missing)} requested file(s) not found in a "
                f"class folder, e.g. {missing[0]}"
            )
        listing = sorted((f, by_path[f]) for f in set(wanted))
    if not listing:
        raise DataError(
            f"data folder {root} holds no JPEG or PNG images in class folders "
            f"{', '.join(classes)}"
        )

    # Reuse the cache when nothing changed.
    cache_path: Path | None = None
    if cache_dir is not None:
        prefix, name = _cache_name(root, classes, files, listing)
        cache_path = Path(cache_dir) / name
        if cache_path.is_file():
            cached = _load_cache(cache_path, listing)
            if cached is not None:
                log.debug(
                    "loaded %d images of %s from cache %s",
                    len(cached[1]),
                    root,
                    cache_path,
                )
                if progress is not None:
                    progress(len(listing), len(listing))
                return ImageSet(cached[0], cached[1], tuple(classes))

    images, labels, index = _decode_all(root, listing, progress)
    if cache_path is not None:
        _write_cache(cache_path, images, labels, index, len(listing))

        # Drop caches of earlier versions of this folder, so a device whose images
        # change does not fill its disk with stale copies.
        for old in cache_path.parent.glob(f"{prefix}-*.npz"):
            if old != cache_path:
                old.unlink(missing_ok=True)
    return ImageSet(images, labels, tuple(classes))


def _decode_all(
    root: Path,
    listing: Sequence[tuple[str, int]],
    progress: ProgressFn | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, listing positions) of the files that decode, in order.

    Unreadable files are skipped with one warning.
    """
    n = len(listing)
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    failures: list[str] = []

    # One thread on purpose. PIL holds the GIL while it parses a small JPEG, so threads
    # gained under 20%; worker processes doubled the speed but spawn re-runs the
    # caller's main script, which breaks any script without a __main__ guard.
    for i, (rel, _) in enumerate(listing):
        try:
            images[i] = decode_image(root / rel)
            ok[i] = True
        except DataError as exc:
            failures.append(str(exc))
        if progress is not None and ((i + 1) % _PROGRESS_EVERY == 0 or i + 1 == n):
            progress(i + 1, n)

    for failure in failures[:_NAMED_FILES]:
        log.warning("%s; skipped", failure)
    if len(failures) > _NAMED_FILES:
        log.warning(
            "data folder %s: skipped %d unreadable files (the first %d named above)",
            root,
            len(failures),
            _NAMED_FILES,
        )
    if not ok.any():
        raise DataError(
            f"data folder {root}: none of its {n} image files could be read"
        )
    labels = np.fromiter((label for _, label in listing), dtype=np.int64, count=n)
    index = np.flatnonzero(ok).astype(np.int64)
    if ok.all():
        return images, labels, index
    return images[ok], labels[ok], index


def export_digits(dest: Path) -> tuple[Path, Path]:
    """Write scikit-learn's handwritten digits as PNG folders; return (train, test).

    The 8x8 images (grey levels 0..16) are scaled to 0..255, enlarged to 32x32 and
    split 80/20 per class with a fixed seed into dest/train/<digit>/ and
    dest/test/<digit>/.
    Returns at once if a previous call completed; a crash mid-way is redone next time.
    """
    dest = Path(dest)
    train_dir, test_dir = dest / "train", dest / "test"
    marker = dest / _DIGITS_MARKER
    if marker.is_file() and train_dir.is_dir() and test_dir.is_dir():
        return train_dir, test_dir

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    # Build the whole set in a private folder on the same file system.
    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    index = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        index,
        test_size=_DIGITS_TEST_SHARE,
        stratify=digits.target,
        random_state=_DIGITS_SEED,
    )
    try:
        dest.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=dest, prefix=".digits-"))
    except OSError as exc:
        raise DataError(f"cannot create digits folder {dest}: {exc}") from exc
    try:
        for split, idx in (("train", train_idx), ("test", test_idx)):
            for i in sorted(idx.tolist()):
                folder = work / split / str(int(digits.target[i]))
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(pixels[i], mode="L").resize(
                    (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR
                )
                img.save(folder / f"{i:04d}.png")

        # Another process may have finished meanwhile: then its folders stand.
        if marker.is_file() and train_dir.is_dir() and test_dir.is_dir():
            return train_dir, test_dir

        # Replace whatever a crashed run left, then mark the set complete last.
        for split_dir in (train_dir, test_dir):
            if split_dir.exists():
                shutil.rmtree(split_dir)
            os.replace(work / split_dir.name, split_dir)
        marker.write_text(
            json.dumps({"train": len(train_idx), "test": len(test_idx)}) + "\n"
        )
    except OSError as exc:
        raise DataError(
            f"cannot write digits image folders under {dest}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "wrote %d training and %d test digit images under %s",
        len(train_idx),
        len(test_idx),
        dest,
    )
    return train_dir, test_dir


def parse_partition_scheme(scheme: str) -> tuple[str, float | None]:
    """("iid", None) or ("dirichlet", alpha); ValueError naming the allowed forms."""
    text = scheme.strip().lower()
    if text == "iid":
        return "iid", None
    allowed = "allowed: 'iid', or 'dirichlet:ALPHA' with ALPHA > 0 (e.g. dirichlet:0.5)"
    if text.startswith("dirichlet:"):
        try:
            alpha = float(text.split(":", 1)[1])
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return "dirichlet", alpha
    raise ValueError(f"partition scheme {scheme!r} is not valid; {allowed}")


def partition(
    labels: np.ndarray, n_parts: int, scheme: str, seed: int
) -> list[np.ndarray]:
    """Split sample indices into n_parts disjoint, non-empty, sorted int64 arrays.

    "iid": a random split into near-equal parts. "dirichlet:ALPHA": for each class, the
    share each part gets is drawn from Dirichlet(ALPHA); small ALPHA gives each part few
    classes, large ALPHA approaches iid. Deterministic for a seed.
    """
    kind, alpha = parse_partition_scheme(scheme)
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    if n_parts < 1:
        raise ValueError(f"n_parts must be at least 1, got {n_parts}")
    if n_parts > n:
        raise ValueError(f"cannot split {n} samples into {n_parts} non-empty parts")
    rng = np.random.default_rng(seed)

    if kind == "iid":
        order = rng.permutation(n)
        return [
            np.sort(part).astype(np.int64) for part in np.array_split(order, n_parts)
        ]

    assert alpha is not None
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]

    # Draw until no part is empty; with tiny ALPHA that may never happen, so a part left
    # empty after a few draws gets one sample from the largest part.
    for _ in range(20):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for p, piece in enumerate(np.split(idx, cuts)):
                chunks[p].append(piece)
        parts = [np.concatenate(c) if c else np.empty(0, np.int64) for c in chunks]
        if all(len(p) for p in parts):
            break
    for p in range(n_parts):
        if len(parts[p]) == 0:
            donor = int(np.argmax([len(q) for q in parts]))
            parts[p], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return [np.sort(p).astype(np.int64) for p in parts]


def random_subset(images: ImageSet, limit: int, seed: int) -> ImageSet:
    """At most limit images, drawn at random but in each class's proportion.

    For data.limit and `grbfl balls --limit`: the first N files of a sorted listing
    would be the first classes only. Each class's images are shuffled and spread
    evenly over [0, 1); the limit lowest positions are kept, so every class gets its
    share within one image. Deterministic for a seed; the order of the kept images is
    the order they had. limit 0, or one at least the set's size, keeps everything.
    """
    if limit < 0:
        raise ValueError(f"limit must be 0 (all) or more, got {limit}")
    n = len(images)
    if limit == 0 or limit >= n:
        return images
    rng = np.random.default_rng(seed)

    # Position of each image: (its rank within its shuffled class + one random offset
    # per class) / the class's size.
    order = rng.permutation(n)
    shuffled = images.labels[order]
    position = np.empty(n, dtype=np.float64)
    for label in np.unique(shuffled):
        members = np.flatnonzero(shuffled == label)
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    chosen = order[np.argsort(position, kind="stable")[:limit]]
    return images.subset(np.sort(chosen))
