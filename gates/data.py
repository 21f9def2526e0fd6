"""Data sets as float32 NCHW in [0, 1] with int64 labels.

- Fashion-MNIST through torchvision's own `FashionMNIST` class: offline from Debian's
  `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist, IDX .gz files), from an
  existing torchvision root, or downloaded when `download=True` and the network allows.
- scikit-learn's bundled `load_digits` (8x8, always available; used by fast tests).
- A user's held-out set: `.npz` with keys `x` and `y`, or an image folder (torchvision
  `ImageFolder`: one sub-folder per class).
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataValidationError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class Dataset:
    """Images x (n, C, H, W) float32 in [0, 1], labels y (n,) int64."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple = ()
    name: str = ""

    def __len__(self):
        return len(self.y)

    def subset(self, idx) -> "Dataset":
        """The rows `idx` (an index array, mask or slice) as a new Dataset with the same classes and name."""
        return Dataset(self.x[idx], self.y[idx], self.classes, self.name)

    def save_npz(self, path):
        """Write x and y to a compressed `.npz` at `path` (keys ``x``, ``y``; the form `load_heldout` reads)."""
        np.savez_compressed(path, x=self.x, y=self.y)


def default_cache_dir() -> Path:
    """The cache folder: ``$TROJAN_GATE_CACHE``, else ~/.cache/trojan-gate."""
    return Path(os.environ.get("TROJAN_GATE_CACHE", Path.home() / ".cache" / "trojan-gate"))


def _prepare_debian_root(source: Path, root: Path) -> bool:
    """Lay Debian's IDX files out the way torchvision's FashionMNIST expects them.

    Safe when several processes do it at once: each writes its own temporary file beside the
    target and renames it into place (atomic on one file system), so a reader never sees a
    half-written file and no writer loses its temporary file to another.
    """
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in _FMNIST_FILES):
        return True
    if not all((source / f"{f}.gz").is_file() or (source / f).is_file() for f in _FMNIST_FILES):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for f in _FMNIST_FILES:
        dst = raw / f
        if dst.is_file():
            continue
        fd, name = tempfile.mkstemp(dir=raw, prefix=f".{f}.", suffix=".part")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as fout:
                if (source / f).is_file():
                    with open(source / f, "rb") as fin:
                        shutil.copyfileobj(fin, fout)
                else:
                    with gzip.open(source / f"{f}.gz", "rb") as fin:
                        shutil.copyfileobj(fin, fout)
            tmp.replace(dst)
        finally:
            tmp.unlink(missing_ok=True)
    return True


def load_fashion_mnist(train: bool = True, root: str | Path | None = None, download: bool = False,
                       limit: int | None = None, seed: int = 0) -> Dataset:
    """Fashion-MNIST via torchvision.datasets.FashionMNIST, offline when possible.

    Search order: `root` (a torchvision root), Debian's /usr/share/datasets/fashion-mnist
    (unpacked once into the cache), the cache itself; with `download=True` torchvision may
    fetch the files. `limit` keeps a seeded, class-stratified-by-shuffle subset.
    """
    from torchvision.datasets import FashionMNIST

    candidates = []
    if root is not None:
        candidates.append(Path(root))
    cache = default_cache_dir() / "torchvision"
    if DEBIAN_FASHION_MNIST.is_dir():
        _prepare_debian_root(DEBIAN_FASHION_MNIST, cache)
    candidates.append(cache)
    last_err = None
    for r in candidates:
        try:
            ds = FashionMNIST(root=str(r), train=train, download=False)
            break
        except RuntimeError as e:
            last_err = e
    else:
        if not download:
            raise FileNotFoundError(
                "Fashion-MNIST not found offline: install Debian's dataset-fashion-mnist, pass a torchvision "
                f"root, or allow download=True ({last_err})")
        ds = FashionMNIST(root=str(candidates[0]), train=train, download=True)
    x = ds.data.numpy().astype(np.float32)[:, None] / 255.0
    y = ds.targets.numpy().astype(np.int64)
    if limit is not None and limit < len(y):
        idx = np.random.default_rng(seed).permutation(len(y))[:limit]
        x, y = x[idx], y[idx]
    return Dataset(np.ascontiguousarray(x), y, FASHION_MNIST_CLASSES, "fashion-mnist-" + ("train" if train else "test"))


def load_digits_dataset(seed: int = 0, test_fraction: float = 0.3) -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits split into seeded train/test, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = idx[:n_test], idx[n_test:]
    classes = tuple(str(i) for i in range(10))
    return (Dataset(x[tr], y[tr], classes, "digits-train"), Dataset(x[te], y[te], classes, "digits-test"))


MAX_HELDOUT_BYTES = 2 * 1024**3  # what a held-out set may unpack to (an .npz is a zip: check before inflating)
MAX_FOLDER_FILES = 200_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def check_npz(path: Path, max_bytes: int = MAX_HELDOUT_BYTES):
    """Refuse an .npz that is not a zip or would unpack to more than `max_bytes` (a zip bomb)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            total = sum(i.file_size for i in z.infolist())
    except zipfile.BadZipFile as e:
        raise DataValidationError([f"{path.name} is not an .npz (zip) file: {e}"]) from e
    if total > max_bytes:
        raise DataValidationError([f"{path.name} would unpack to {total} bytes, over the cap of {max_bytes} "
                                   "(held-out data must fit in memory; is it a zip bomb?)"])


def load_heldout(path: str | Path, input_shape: tuple | None = None, max_bytes: int = MAX_HELDOUT_BYTES) -> Dataset:
    """A user's held-out set: `.npz` (keys `x`, `y`) or an image folder (one sub-folder per class).

    `.npz` images may be (n, C, H, W), (n, H, W) (a channel axis is added) or uint8 0..255
    (scaled to [0, 1]); the archive is refused before it is inflated if it would unpack to more
    than `max_bytes`, and pickled objects are never loaded. Image folders are walked without
    following symbolic links, and converted to `input_shape` (grayscale when C == 1). Values are
    *not* validated here; call `validate_heldout` before use.
    """
    path = Path(path)
    if path.is_symlink():
        raise DataValidationError([f"held-out data {path} is a symbolic link; give the file or folder itself"])
    if path.is_dir():
        return _load_image_folder(path, input_shape, max_bytes)
    if not path.is_file():
        raise FileNotFoundError(f"held-out data not found: {path}")
    check_npz(path, max_bytes)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise KeyError(f"{path} lacks key(s) {missing}; a held-out .npz needs 'x' (images) and 'y' (labels)")
            x, y = z["x"], z["y"]
    except ValueError as e:  # object arrays (pickles) and malformed members
        raise DataValidationError([f"{path.name} holds an array numpy will not load safely: {e}"]) from e
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    return Dataset(x, np.asarray(y), (), path.name)


def _image_files(path: Path) -> tuple[list, list]:
    """(classes, [(file, class index)]): one sub-folder per class, sorted; symbolic links are refused,
    never followed (a link loop cannot make the walk endless), and the file count is capped."""
    import os

    classes, files = [], []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_symlink():
            raise DataValidationError([f"{entry.path} is a symbolic link; image folders may not hold links"])
        if not entry.is_dir(follow_symlinks=False):
            continue
        classes.append(entry.name)
        stack = [entry.path]
        while stack:
            for item in sorted(os.scandir(stack.pop()), key=lambda e: e.name):
                if item.is_symlink():
                    raise DataValidationError([f"{item.path} is a symbolic link; image folders may not hold links"])
                if item.is_dir(follow_symlinks=False):
                    stack.append(item.path)
                elif item.name.lower().endswith(IMAGE_SUFFIXES):
                    files.append((item.path, len(classes) - 1))
                    if len(files) > MAX_FOLDER_FILES:
                        raise DataValidationError([f"{path} holds more than {MAX_FOLDER_FILES} images"])
    return classes, files


def _load_image_folder(path: Path, input_shape: tuple | None, max_bytes: int = MAX_HELDOUT_BYTES) -> Dataset:
    from PIL import Image
    from torchvision import transforms

    classes, files = _image_files(path)
    tf = []
    if input_shape is not None:
        c, h, w = input_shape
        if c == 1:
            tf.append(transforms.Grayscale(1))
        tf.append(transforms.Resize((h, w)))
        if len(files) * c * h * w * 4 > max_bytes:
            raise DataValidationError([f"{path} holds {len(files)} images, over {max_bytes} bytes at {input_shape}"])
    tf.append(transforms.ToTensor())
    compose = transforms.Compose(tf)
    xs, ys = [], []
    for file, label in files:
        with Image.open(file) as im:
            xs.append(compose(im.convert("RGB")).numpy())
        ys.append(label)
    x = np.stack(xs).astype(np.float32) if xs else np.zeros((0,) + tuple(input_shape or (1, 1, 1)), np.float32)
    return Dataset(x, np.asarray(ys, dtype=np.int64), tuple(classes), path.name)
