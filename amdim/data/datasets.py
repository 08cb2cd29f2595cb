"""Datasets for AMDIM training and evaluation, held as uint8 (N, 3, H, W) arrays.

- "digits": scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes), upscaled to
  32x32 RGB; needs no download. A fixed stratified split holds out 20% for testing.
- "shapes": 10 classes of procedurally generated 32x32 objects under scale, rotation, colour, a
  small offset and noise nuisances (amdim/data/shapes.py); needs no download, 10000 train / 2000
  test, and a linear probe on its raw pixels is near chance, so an encoder has to learn shape.
- "cifar10" / "cifar100": the python pickle version (directory cifar-10-batches-py / cifar-100-python),
  read by a restricted unpickler that builds only dicts, lists, strings, numbers and numpy arrays:
  a crafted file cannot run code.
- "stl10": the binary version (directory stl10_binary); self-supervised training also uses the
  unlabeled split (label -1).
- "folder": a directory of class subfolders of images, read with Pillow and kept at their own
  sizes (shrunk only beyond 9/4 of the encoder size, `stored_side`), so that views are cropped from
  full resolution as amdim-public's ImageNet pipeline does; `train/` and `test/` subdirectories are
  used as splits when present, otherwise every fifth image of each class is held out. Names
  starting with "." are skipped. The whole folder is held in memory.
Everything read is validated (dtype, value range, shapes, label count and range, non-empty): a
missing or malformed file raises ValueError / FileNotFoundError naming it and what was expected.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "shapes", "cifar10", "cifar100", "stl10", "folder")
NATURAL_SIZE = {"digits": 32, "shapes": 32, "cifar10": 32, "cifar100": 32, "stl10": 64, "folder": 64}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

FORMATS = {
    "cifar10": "the CIFAR-10 python version: a directory holding cifar-10-batches-py/ (or that "
               "directory itself) with pickled data_batch_1..5 and test_batch",
    "cifar100": "the CIFAR-100 python version: a directory holding cifar-100-python/ (or that "
                "directory itself) with pickled train and test",
    "stl10": "the STL-10 binary version: a directory holding stl10_binary/ (or that directory "
             "itself) with train_X.bin, train_y.bin, test_X.bin, test_y.bin and unlabeled_X.bin",
    "folder": "a directory of class subfolders of images (optionally split into train/ and test/)",
}


@dataclass
class ImageSet:
    images: np.ndarray   # uint8 (N, 3, H, W), possibly memory-mapped; or RaggedImages
    labels: np.ndarray   # int64 (N,); -1 for unlabeled images

    def __len__(self):
        return len(self.labels)

    def batch(self, idx) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """(images, labels) of rows idx: a uint8 (B, 3, H, W) tensor, or for images of their own
        sizes (RaggedImages) a list of B uint8 (3, H_i, W_i) tensors."""
        idx = np.asarray(idx)
        labels = torch.from_numpy(self.labels[idx])
        if isinstance(self.images, RaggedImages):
            return [torch.from_numpy(self.images[i]) for i in idx], labels
        return torch.from_numpy(np.ascontiguousarray(self.images[idx])), labels


class RaggedImages(list):
    """uint8 (3, H_i, W_i) images of their own sizes (a folder's), indexable by row."""


@dataclass
class Dataset:
    train: ImageSet      # self-supervised training set (may include unlabeled images)
    train_labeled: ImageSet
    test: ImageSet
    n_classes: int
    name: str


def _fail(name, path, why):
    return ValueError(f"--data-path {path!r} is not valid for dataset {name!r}: {why}. "
                      f"Expected {FORMATS[name]}.")


def _find_dir(name, path, sub):
    if path is None:
        raise ValueError(f"dataset {name!r} needs --data-path: {FORMATS[name]}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--data-path {path!r} does not exist or is not a directory. "
                                f"Expected {FORMATS[name]}.")
    return os.path.join(path, sub) if sub and os.path.isdir(os.path.join(path, sub)) else path


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_digits   # bundled with scikit-learn: no download
    d = sk_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)            # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).numpy().copy()
    labels = d.target.astype(np.int64)
    # fixed stratified split: every fifth image of each class (in a seeded order) is test
    order = np.random.RandomState(0).permutation(len(labels))
    test = np.zeros(len(labels), bool)
    for c in range(10):
        test[order[labels[order] == c][::5]] = True
    tr = ImageSet(images[~test], labels[~test])
    return Dataset(tr, tr, ImageSet(images[test], labels[test]), 10, "digits")


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as Python 3 protocol-2 pickles use it for bytes, and for nothing else."""
    if not (isinstance(text, str) and isinstance(encoding, str)
            and encoding.lower().replace("_", "-") in ("latin1", "latin-1")):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only as encode(str, 'latin1'), "
                                     f"got encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _empty_bytes(*args):
    """`bytes()` as Python 3 protocol-2 pickles write an empty bytes object (an empty array's data)."""
    if args:
        raise pickle.UnpicklingError(f"bytes is allowed only as bytes(), got {len(args)} arguments")
    return b""


_SCALAR = np.int64(0).__reduce__()[0]


def _numeric_scalar(dtype, data):
    """numpy's scalar reconstruction (a label written as np.int64(3)), for a plain numeric dtype
    and its raw bytes only."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"numpy scalars are allowed only of a numeric dtype from raw bytes, got "
                                     f"scalar({dtype!r}, {type(data).__name__})")
    return _SCALAR(dtype, data)


# The globals a CIFAR python pickle references: numpy's array reconstruction (written by Python 2
# as numpy.core.*, by numpy 2 as numpy._core.*; _frombuffer by protocol 5), numeric numpy scalars
# (labels saved as np.int64), and the latin-1 encode and empty bytes() that Python 3 protocol-2
# pickles use for bytes. The dict, lists, strings and numbers need none.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]
SAFE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy.core.multiarray", "scalar"): _numeric_scalar,
    ("numpy._core.multiarray", "scalar"): _numeric_scalar,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR format holds; any other global (a callable that a crafted
    pickle would invoke) is refused before it is imported, so loading never runs code from the file."""

    def find_class(self, module, name):
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"refused global {module}.{name} (a CIFAR pickle holds only a dict "
                                 f"of lists and numpy arrays)") from None


def _unpickle(name, path, file):
    full = os.path.join(path, file)
    if not os.path.isfile(full):
        raise _fail(name, path, f"missing file {full!r}")
    try:
        with open(full, "rb") as f:
            return SafeUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise _fail(name, path, f"{full!r} is not a plain CIFAR pickle: {e}") from None
    except Exception as e:   # any unpickling failure means the file is not the expected format
        raise _fail(name, path, f"cannot unpickle {full!r} ({type(e).__name__}: {e})") from None


def _describe(v):
    if isinstance(v, np.ndarray):
        return f"an array of dtype {v.dtype} and shape {v.shape}"
    return f"{type(v).__name__} {v!r}"[:80]


def _int_array(name, root, full, key, value, what):
    """value as an integer ndarray, or an error naming the file, the key and what it holds."""
    try:
        a = np.asarray(value)
    except Exception:   # ragged nested lists and the like
        a = None
    if a is None or a.dtype.kind not in "ui":
        raise _fail(name, root, f"{full!r}: {key!r} is {_describe(value)}, expected {what}")
    return a


def _cifar_part(name, path, files, label_key, n_classes):
    xs, ys = [], []
    for file in files:
        full = os.path.join(path, file)
        d = _unpickle(name, path, file)
        if isinstance(d, dict):   # keys are bytes in the original files; accept str keys too
            d = {k.encode() if isinstance(k, str) else k: v for k, v in d.items()}
        if not isinstance(d, dict) or b"data" not in d or label_key not in d:
            raise _fail(name, path, f"{full!r} holds {_describe(d)}, expected a dict with keys "
                                    f"b'data' and {label_key!r}")
        x = _int_array(name, path, full, b"data", d[b"data"], "uint8 pixels of shape (N, 3072)")
        if x.ndim != 2 or x.shape[1] != 3072:
            raise _fail(name, path, f"{full!r} data has shape {x.shape}, expected (N, 3072)")
        if len(x) == 0:
            raise _fail(name, path, f"{full!r} holds no images (data has shape {x.shape})")
        if x.dtype != np.uint8:   # wider integers are accepted only when the cast loses nothing
            lo, hi = x.min(), x.max()
            if lo < 0 or hi > 255:
                raise _fail(name, path, f"{full!r} data ({x.dtype}) has values in [{lo}, {hi}], "
                                        f"expected pixel values 0..255")
            x = x.astype(np.uint8)
        y = _int_array(name, path, full, label_key, d[label_key],
                       f"a list of {len(x)} integer labels in [0, {n_classes})")
        if y.ndim != 1 or len(y) != len(x):
            raise _fail(name, path, f"{full!r} has {label_key!r} of shape {y.shape} for {len(x)} images, "
                                    f"expected ({len(x)},)")
        bad = np.flatnonzero((y < 0) | (y >= n_classes))
        if len(bad):
            raise _fail(name, path, f"{full!r} has label {y[bad[0]]} at index {bad[0]} "
                                    f"({len(bad)} labels out of range), expected labels in [0, {n_classes})")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y.astype(np.int64))
    return ImageSet(np.concatenate(xs), np.concatenate(ys))


def load_cifar(name, path) -> Dataset:
    if name == "cifar10":
        root = _find_dir(name, path, "cifar-10-batches-py")
        train = _cifar_part(name, root, [f"data_batch_{i}" for i in range(1, 6)], b"labels", 10)
        test = _cifar_part(name, root, ["test_batch"], b"labels", 10)
    else:
        root = _find_dir(name, path, "cifar-100-python")
        train = _cifar_part(name, root, ["train"], b"fine_labels", 100)
        test = _cifar_part(name, root, ["test"], b"fine_labels", 100)
    return Dataset(train, train, test, 10 if name == "cifar10" else 100, name)


STL_IMAGE_BYTES = 3 * 96 * 96


def _stl_images(name, root, file):
    full = os.path.join(root, file)
    if not os.path.isfile(full):
        raise _fail(name, root, f"missing file {full!r}")
    size = os.path.getsize(full)
    if size == 0:
        raise _fail(name, root, f"{full!r} is empty, expected 96x96 RGB images of 3*96*96 bytes each")
    if size % STL_IMAGE_BYTES:
        raise _fail(name, root, f"{full!r} has {size} bytes, not a multiple of 3*96*96 (the size of one image)")
    # STL-10 stores each channel column-major; memory-map so the 100k unlabeled images stay on disk
    try:
        x = np.memmap(full, dtype=np.uint8, mode="r")
    except OSError as e:
        raise _fail(name, root, f"cannot read {full!r} ({e})") from None
    return x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)


def _stl_labels(name, root, file, n, images_file):
    full = os.path.join(root, file)
    if not os.path.isfile(full):
        raise _fail(name, root, f"missing file {full!r}")
    try:
        y = np.fromfile(full, dtype=np.uint8).astype(np.int64)       # one byte per label, 1..10
    except OSError as e:
        raise _fail(name, root, f"cannot read {full!r} ({e})") from None
    if len(y) != n:
        raise _fail(name, root, f"{full!r} must hold {n} labels (one byte per image of {images_file}), "
                                f"got {len(y)}")
    bad = np.flatnonzero((y < 1) | (y > 10))
    if len(bad):
        raise _fail(name, root, f"{full!r} has label byte {y[bad[0]]} at index {bad[0]} "
                                f"({len(bad)} out of range), expected labels 1..10")
    return y - 1


def load_stl10(path) -> Dataset:
    root = _find_dir("stl10", path, "stl10_binary")
    parts = {}
    for split in ("train", "test"):
        x = _stl_images("stl10", root, f"{split}_X.bin")
        parts[split] = ImageSet(x, _stl_labels("stl10", root, f"{split}_y.bin", len(x), f"{split}_X.bin"))
    unl = _stl_images("stl10", root, "unlabeled_X.bin")
    train_all = ImageSet(_ConcatImages(parts["train"].images, unl),
                         np.concatenate([parts["train"].labels, np.full(len(unl), -1, np.int64)]))
    return Dataset(train_all, parts["train"], parts["test"], 10, "stl10")


class _ConcatImages:
    """Row-indexable concatenation of two arrays without copying the (2.7 GB) unlabeled memmap."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.shape = (len(a) + len(b),) + a.shape[1:]

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        out = np.empty((len(idx),) + self.shape[1:], np.uint8)
        in_a = idx < len(self.a)
        out[in_a] = self.a[idx[in_a]]
        out[~in_a] = self.b[idx[~in_a] - len(self.a)]
        return out


def _listdir(d):
    """Sorted entries of d, without hidden ones (".ipynb_checkpoints", macOS "._x.png" forks)."""
    return sorted(e for e in os.listdir(d) if not e.startswith("."))


def stored_side(size: int) -> int:
    """The largest shorter side a folder image is kept at: 9/4 of the encoder size, so that even
    the smallest crop of the official policies (0.3 of the area at aspect ratio 1.4: 0.46 of the
    shorter side) is resampled down, not up: the crops come from (almost) full resolution."""
    return math.ceil(9 * size / 4)


def _read_image(root, full, size):
    """An image as uint8 (3, H, W) at its own aspect ratio, shrunk only where its shorter side is
    longer than stored_side(size)."""
    from PIL import Image
    try:
        with Image.open(full) as im:
            im = im.convert("RGB")
            short, cap = min(im.size), stored_side(size)
            if short > cap:
                w, h = im.size
                im = im.resize((max(1, round(w * cap / short)), max(1, round(h * cap / short))), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:   # not an OSError: it would escape unnamed
        raise _fail("folder", root, f"image {full!r} is larger than Pillow's decompression-bomb limit "
                                    f"({e})") from None
    except Exception as e:   # unidentified, truncated, corrupt chunks (OSError, SyntaxError, ...)
        raise _fail("folder", root, f"cannot read image {full!r} ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _read_folder(root, size, classes=None):
    found = [d for d in _listdir(root) if os.path.isdir(os.path.join(root, d))]
    if not found:
        raise _fail("folder", root, "it has no class subfolders")
    if classes is not None and set(found) - set(classes):
        extra = sorted(set(found) - set(classes))
        raise _fail("folder", root, f"class subfolders {extra} are not in the training split {classes}")
    classes = classes or found
    xs, ys = [], []
    for c, cls in enumerate(classes):
        cdir = os.path.join(root, cls)
        if not os.path.isdir(cdir):
            raise _fail("folder", root, f"class subfolder {cls!r} is missing")
        files = [f for f in _listdir(cdir) if f.lower().endswith(IMAGE_EXTS)]
        if not files:
            raise _fail("folder", root, f"class subfolder {cdir!r} holds no image files "
                                        f"({', '.join(IMAGE_EXTS)})")
        xs += [_read_image(root, os.path.join(cdir, f), size) for f in files]
        ys += [c] * len(files)
    return ImageSet(RaggedImages(xs), np.asarray(ys, np.int64)), classes


def load_folder(path, size) -> Dataset:
    root = _find_dir("folder", path, None)
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        raise ValueError("--dataset folder reads its images with Pillow, which is not installed: "
                         "pip install pillow") from None
    tr_dir, te_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(tr_dir) and os.path.isdir(te_dir):
        train, classes = _read_folder(tr_dir, size)
        test, _ = _read_folder(te_dir, size, classes)
    else:
        for half, other in ((tr_dir, "test"), (te_dir, "train")):
            if os.path.isdir(half) and any(os.path.isdir(os.path.join(half, d)) for d in _listdir(half)):
                raise _fail("folder", root, f"{half!r} holds class subfolders but there is no {other}/ "
                                            f"beside it (train/ and test/ are used as splits together)")
        full, classes = _read_folder(root, size)
        test_mask = np.zeros(len(full), bool)
        for c in range(len(classes)):
            test_mask[np.flatnonzero(full.labels == c)[::5]] = True
        train = ImageSet(RaggedImages(full.images[i] for i in np.flatnonzero(~test_mask)), full.labels[~test_mask])
        test = ImageSet(RaggedImages(full.images[i] for i in np.flatnonzero(test_mask)), full.labels[test_mask])
    return Dataset(train, train, test, len(classes), "folder")


def load_shapes() -> Dataset:
    from . import shapes
    xtr, ytr, xte, yte = shapes.shapes_arrays()
    train = ImageSet(xtr, ytr)
    return Dataset(train, train, ImageSet(xte, yte), len(shapes.CLASSES), "shapes")


def fingerprint(ds: Dataset, samples: int = 16) -> str:
    """A cheap SHA-256 of a dataset: its sizes, every label, and `samples` images of each split at
    evenly spaced rows. Two copies of a dataset that differ in their images' count, order, classes
    or (most likely) content give different fingerprints, without reading every image."""
    import hashlib
    h = hashlib.sha256(f"{ds.name}:{ds.n_classes}".encode())
    for part in (ds.train, ds.train_labeled, ds.test):
        n = len(part)
        h.update(f"|{n}|".encode())
        h.update(np.ascontiguousarray(part.labels, dtype=np.int64).tobytes())
        rows = np.unique(np.linspace(0, n - 1, min(n, samples)).round().astype(np.int64)) if n else []
        images, _ = part.batch(rows) if n else ([], None)
        for im in images:
            h.update(f"{tuple(im.shape)}".encode())
            h.update(im.contiguous().numpy().tobytes())
    return h.hexdigest()


def load(name: str, path: str | None = None, image_size: int | None = None) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "digits":
        return load_digits()
    if name == "shapes":
        return load_shapes()
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, path)
    if name == "stl10":
        return load_stl10(path)
    return load_folder(path, image_size or NATURAL_SIZE["folder"])
