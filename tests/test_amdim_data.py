"""Every dataset format, read from small files written by the test, including malformed ones."""
import os
import pickle

import numpy as np
import pytest
import torch

from amdim import data


def _cifar_dir(tmp_path, name):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        root = tmp_path / "cifar-10-batches-py"
        files, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        root = tmp_path / "cifar-100-python"
        files, key = ["train", "test"], b"fine_labels"
    root.mkdir()
    for i, f in enumerate(files):
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        x[0, :1024] = i   # red plane of the first image marks the file
        with open(root / f, "wb") as fh:
            pickle.dump({b"data": x, key: [i % 10, 1, 2, 3]}, fh)
    return root


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    root = _cifar_dir(tmp_path, name)
    ds = data.load(name, str(tmp_path))                  # parent directory works
    ds2 = data.load(name, str(root))                     # and the pickle directory itself
    n_train = 20 if name == "cifar10" else 4
    assert ds.train.images.shape == (n_train, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    assert ds.n_classes == (10 if name == "cifar10" else 100)
    assert np.array_equal(ds.train.labels, ds2.train.labels)
    x, y = ds.train.batch([0, n_train - 4])
    # files are concatenated in order: image n_train - 4 is the first of the last training file
    assert x.dtype == torch.uint8 and (x[0, 0] == 0).all() and y.tolist()[0] == 0
    assert (x[1, 0] == (4 if name == "cifar10" else 0)).all()


def test_cifar_malformed(tmp_path):
    root = _cifar_dir(tmp_path, "cifar10")
    os.remove(root / "data_batch_3")
    with pytest.raises(ValueError, match="data_batch_3.*CIFAR-10 python version"):
        data.load("cifar10", str(tmp_path))
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot unpickle"):
        data.load("cifar10", str(tmp_path))
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, fh)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        data.load("cifar10", str(tmp_path))
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(ValueError, match="data_batch_3.*holds list.*expected a dict"):
        data.load("cifar10", str(tmp_path))


def test_missing_paths_name_the_path_and_format(tmp_path):
    missing = str(tmp_path / "nowhere")
    for name in ("cifar10", "cifar100", "stl10", "folder"):
        with pytest.raises(FileNotFoundError, match="nowhere.*Expected"):
            data.load(name, missing)
        with pytest.raises(ValueError, match="needs --data-path"):
            data.load(name, None)
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("mnist")


def _stl_dir(tmp_path, n_train=3, n_test=2, n_unl=5):
    root = tmp_path / "stl10_binary"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unl)):
        hwc = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        # STL-10 stores each channel column-major: (N, 3, W, H) in file order
        hwc.transpose(0, 3, 2, 1).tofile(root / f"{split}_X.bin")
        np.save(root / f"{split}_ref.npy", hwc)
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(root / f"{split}_y.bin")
    return root


def test_stl10_binary(tmp_path):
    root = _stl_dir(tmp_path)
    ds = data.load("stl10", str(tmp_path))
    assert len(ds.train) == 8 and len(ds.train_labeled) == 3 and len(ds.test) == 2
    assert ds.train.labels.tolist() == [0, 1, 2] + [-1] * 5
    ref_train = np.load(root / "train_ref.npy")
    ref_unl = np.load(root / "unlabeled_ref.npy")
    x, _ = ds.train.batch([1, 4])                                  # one labeled, one unlabeled
    assert torch.equal(x[0], torch.from_numpy(ref_train[1].transpose(2, 0, 1).copy()))
    assert torch.equal(x[1], torch.from_numpy(ref_unl[1].transpose(2, 0, 1).copy()))


def test_stl10_malformed(tmp_path):
    root = _stl_dir(tmp_path)
    with open(root / "test_X.bin", "ab") as fh:
        fh.write(b"\0" * 7)
    with pytest.raises(ValueError, match="not a multiple of 3\\*96\\*96.*STL-10 binary"):
        data.load("stl10", str(tmp_path))
    root2 = _stl_dir(tmp_path / "b")
    (root2 / "train_y.bin").write_bytes(bytes([1, 2]))            # 2 labels for 3 images
    with pytest.raises(ValueError, match="must hold 3 labels"):
        data.load("stl10", str(root2))
    (root2 / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    os.remove(root2 / "unlabeled_X.bin")
    with pytest.raises(ValueError, match="missing file.*unlabeled_X.bin"):
        data.load("stl10", str(root2))


def _folder(root, classes=("cat", "dog"), per_class=5, size=(12, 9)):
    from PIL import Image
    rng = np.random.default_rng(2)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
        (root / c / "notes.txt").write_text("ignored: not an image")


def test_image_folder_single_and_split(tmp_path):
    _folder(tmp_path / "flat")
    ds = data.load("folder", str(tmp_path / "flat"), 32)
    assert ds.n_classes == 2 and len(ds.train) == 8 and len(ds.test) == 2   # every 5th held out
    assert ds.train.images.shape[1:] == (3, 32, 32)
    assert sorted(ds.test.labels.tolist()) == [0, 1]
    _folder(tmp_path / "split" / "train", per_class=3)
    _folder(tmp_path / "split" / "test", per_class=2)
    ds = data.load("folder", str(tmp_path / "split"), 64)
    assert len(ds.train) == 6 and len(ds.test) == 4 and ds.test.images.shape[2:] == (64, 64)


def test_image_folder_malformed(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders.*class subfolders of images"):
        data.load("folder", str(tmp_path / "empty"))
    _folder(tmp_path / "bad")
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image.*broken.png"):
        data.load("folder", str(tmp_path / "bad"))
    (tmp_path / "txt" / "a").mkdir(parents=True)
    (tmp_path / "txt" / "a" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="no image files"):
        data.load("folder", str(tmp_path / "txt"))


def test_builtin_digits_has_class_structure():
    ds = data.load("digits")
    assert ds.train.images.shape[1:] == (3, 32, 32) and ds.train.images.dtype == np.uint8
    assert len(ds.train) + len(ds.test) == 1797 and ds.n_classes == 10
    assert set(ds.test.labels.tolist()) == set(range(10))
    # class means differ: a nearest-class-mean classifier on pixels is far above chance
    x = ds.train.images.reshape(len(ds.train), -1).astype(np.float32)
    means = np.stack([x[ds.train.labels == c].mean(0) for c in range(10)])
    xt = ds.test.images.reshape(len(ds.test), -1).astype(np.float32)
    pred = ((xt[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == ds.test.labels).mean() > 0.7
