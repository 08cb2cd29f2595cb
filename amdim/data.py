"""Datasets for AMDIM training and evaluation, held as uint8 (N, 3, H, W) arrays.

- "digits": scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes), upscaled to
  32x32 RGB; needs no download. A fixed stratified split holds out 20% for testing.
- "cifar10" / "cifar100": the python pickle version (directory cifar-10-batches-py / cifar-100-python).
- "stl10": the binary version (directory stl10_binary); self-supervised training also uses the
  unlabeled split (label -1).
- "folder": a directory of class subfolders of images (read with Pillow, resized to the encoder
  size); `train/` and `test/` subdirectories are used as splits when present, otherwise every
  fifth image of each class is held out.
A missing or malformed path raises an error that names it and the expected format.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "cifar10", "cifar100", "stl10", "folder")
NATURAL_SIZE = {"digits": 32, "cifar10": 32, "cifar100": 32, "stl10": 64, "folder": 64}
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
    images: np.ndarray   # uint8 (N, 3, H, W); may be a memory-mapped view
    labels: np.ndarray   # int64 (N,); -1 for unlabeled images

    def __len__(self):
        return len(self.labels)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx)
        return torch.from_numpy(np.ascontiguousarray(self.images[idx])), torch.from_numpy(self.labels[idx])


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


def _unpickle(name, path, file):
    full = os.path.join(path, file)
    if not os.path.isfile(full):
        raise _fail(name, path, f"missing file {full!r}")
    try:
        with open(full, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:   # any unpickling failure means the file is not the expected format
        raise _fail(name, path, f"cannot unpickle {full!r} ({type(e).__name__}: {e})") from None


def _cifar_part(name, path, files, label_key):
    xs, ys = [], []
    for file in files:
        d = _unpickle(name, path, file)
        if not isinstance(d, dict) or b"data" not in d or label_key not in d:
            raise _fail(name, path, f"{file!r} is not a dict with keys b'data' and {label_key!r}")
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
            raise _fail(name, path, f"{file!r} data has shape {x.shape} with {len(y)} labels, "
                                    f"expected (N, 3072) with N labels")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return ImageSet(np.concatenate(xs), np.concatenate(ys))


def load_cifar(name, path) -> Dataset:
    if name == "cifar10":
        root = _find_dir(name, path, "cifar-10-batches-py")
        train = _cifar_part(name, root, [f"data_batch_{i}" for i in range(1, 6)], b"labels")
        test = _cifar_part(name, root, ["test_batch"], b"labels")
        n_classes = 10
    else:
        root = _find_dir(name, path, "cifar-100-python")
        train = _cifar_part(name, root, ["train"], b"fine_labels")
        test = _cifar_part(name, root, ["test"], b"fine_labels")
        n_classes = 100
    for part in (train, test):
        if part.labels.min() < 0 or part.labels.max() >= n_classes:
            raise _fail(name, root, f"labels outside [0, {n_classes})")
    return Dataset(train, train, test, n_classes, name)


def _stl_images(name, root, file):
    full = os.path.join(root, file)
    if not os.path.isfile(full):
        raise _fail(name, root, f"missing file {full!r}")
    size = os.path.getsize(full)
    if size == 0 or size % (3 * 96 * 96):
        raise _fail(name, root, f"{full!r} has {size} bytes, not a multiple of 3*96*96")
    # STL-10 stores each channel column-major; memory-map so the 100k unlabeled images stay on disk
    return np.memmap(full, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)


def _stl_labels(name, root, file, n):
    full = os.path.join(root, file)
    if not os.path.isfile(full):
        raise _fail(name, root, f"missing file {full!r}")
    y = np.fromfile(full, dtype=np.uint8).astype(np.int64) - 1      # stored as 1..10
    if len(y) != n or (n and (y.min() < 0 or y.max() > 9)):
        raise _fail(name, root, f"{full!r} must hold {n} labels in 1..10, got {len(y)}")
    return y


def load_stl10(path) -> Dataset:
    root = _find_dir("stl10", path, "stl10_binary")
    parts = {}
    for split in ("train", "test"):
        x = _stl_images("stl10", root, f"{split}_X.bin")
        parts[split] = ImageSet(x, _stl_labels("stl10", root, f"{split}_y.bin", len(x)))
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


def _read_folder(root, size, classes=None):
    from PIL import Image, UnidentifiedImageError
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = classes or found
    if not classes:
        raise _fail("folder", root, "it has no class subfolders")
    xs, ys = [], []
    for c, cls in enumerate(classes):
        cdir = os.path.join(root, cls)
        if not os.path.isdir(cdir):
            raise _fail("folder", root, f"class subfolder {cls!r} is missing")
        for f in sorted(os.listdir(cdir)):
            if not f.lower().endswith(IMAGE_EXTS):
                continue
            full = os.path.join(cdir, f)
            try:
                with Image.open(full) as im:
                    im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            except (UnidentifiedImageError, OSError) as e:
                raise _fail("folder", root, f"cannot read image {full!r} ({e})") from None
            xs.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
            ys.append(c)
    if not xs:
        raise _fail("folder", root, f"no image files ({', '.join(IMAGE_EXTS)}) in its class subfolders")
    return ImageSet(np.stack(xs), np.asarray(ys, np.int64)), classes


def load_folder(path, size) -> Dataset:
    root = _find_dir("folder", path, None)
    tr_dir, te_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(tr_dir) and os.path.isdir(te_dir):
        train, classes = _read_folder(tr_dir, size)
        test, _ = _read_folder(te_dir, size, classes)
    else:
        full, classes = _read_folder(root, size)
        test_mask = np.zeros(len(full), bool)
        for c in range(len(classes)):
            test_mask[np.flatnonzero(full.labels == c)[::5]] = True
        train = ImageSet(full.images[~test_mask], full.labels[~test_mask])
        test = ImageSet(full.images[test_mask], full.labels[test_mask])
    return Dataset(train, train, test, len(classes), "folder")


def load(name: str, path: str | None = None, image_size: int | None = None) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "digits":
        return load_digits()
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, path)
    if name == "stl10":
        return load_stl10(path)
    return load_folder(path, image_size or NATURAL_SIZE["folder"])
