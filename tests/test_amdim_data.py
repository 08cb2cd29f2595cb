"""Every dataset format, read from small files written by the test, including malformed ones."""
import os
import pickle

import numpy as np
import pytest
import torch

from amdim.data import datasets as data


def _cifar_record(name, x, labels, file):
    """The dict of one CIFAR python file, with the keys the original files hold."""
    d = {b"batch_label": f"{file} of 1".encode(), b"data": x,
         b"filenames": [f"img_{i}.png".encode() for i in range(len(x))]}
    if name == "cifar10":
        d[b"labels"] = labels
    else:
        d[b"fine_labels"], d[b"coarse_labels"] = labels, [v // 5 for v in labels]
    return d


def _cifar_dir(tmp_path, name):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        root = tmp_path / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        root = tmp_path / "cifar-100-python"
        files = ["train", "test"]
    root.mkdir()
    for i, f in enumerate(files):
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        x[0, :1024] = i   # red plane of the first image marks the file
        with open(root / f, "wb") as fh:   # protocol 2, as the original (Python 2) files
            pickle.dump(_cifar_record(name, x, [i % 10, 1, 2, 3], f), fh, protocol=2)
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


def _write_batch(root, value, file="data_batch_3", protocol=2):
    with open(root / file, "wb") as fh:
        pickle.dump(value, fh, protocol=protocol)


def _good_x(n=4):
    return np.random.default_rng(3).integers(0, 256, (n, 3072), dtype=np.uint8)


# each case: (b"data", b"labels", what the error must say besides the file name)
CIFAR_MALFORMED = {
    "float data in [0, 1)": (np.random.default_rng(0).random((4, 3072)), [0, 1, 2, 3],
                             r"b'data' is an array of dtype float64.*expected uint8"),
    "int64 data above 255": (np.full((4, 3072), 300, np.int64), [0, 1, 2, 3], r"values in \[300, 300\].*0\.\.255"),
    "negative int16 data": (np.full((4, 3072), -1, np.int16), [0, 1, 2, 3], r"values in \[-1, -1\]"),
    "bool data": (np.ones((4, 3072), bool), [0, 1, 2, 3], r"dtype bool"),
    "object data": (np.array([[2 ** 70] * 3072] * 4, dtype=object), [0, 1, 2, 3], r"dtype object"),
    "flat data": (_good_x().ravel(), [0, 1, 2, 3], r"shape \(12288,\), expected \(N, 3072\)"),
    "empty batch": (np.zeros((0, 3072), np.uint8), [], r"holds no images"),
    "labels None": (_good_x(), None, r"b'labels' is NoneType None"),
    "labels shaped (N, 1)": (_good_x(), [[0], [1], [2], [3]], r"b'labels' of shape \(4, 1\) for 4 images"),
    "string labels": (_good_x(), ["0", "1", "2", "3"], r"b'labels' is list \['0', '1'.*integer labels"),
    "float labels": (_good_x(), [0.0, 1.0, 2.0, 3.0], r"b'labels' is list \[0.0, 1.0.*integer labels"),
    "huge labels": (_good_x(), [2 ** 70, 1, 2, 3], r"b'labels' is list \[1180591620717411303424, 1"),
    "ragged labels": (_good_x(), [0, [1], 2, 3], r"b'labels' is list"),
    "too few labels": (_good_x(), [0, 1, 2], r"shape \(3,\) for 4 images"),
    "label 10": (_good_x(), [0, 1, 2, 10], r"label 10 at index 3.*\[0, 10\)"),
    "label -1": (_good_x(), [0, -1, 2, 3], r"label -1 at index 1"),
}


@pytest.mark.parametrize("case", sorted(CIFAR_MALFORMED))
def test_cifar_malformed_contents_name_the_file(tmp_path, case):
    x, y, why = CIFAR_MALFORMED[case]
    root = _cifar_dir(tmp_path, "cifar10")
    _write_batch(root, _cifar_record("cifar10", x, y, "data_batch_3"))
    with pytest.raises(ValueError, match=r"data_batch_3'?:? .*" + why + r".*Expected the CIFAR-10 python"):
        data.load("cifar10", str(tmp_path))


def test_cifar_lossless_integer_data_and_labels_are_accepted(tmp_path):
    root = _cifar_dir(tmp_path, "cifar10")
    x = _good_x().astype(np.int64)
    _write_batch(root, {"data": x, "labels": np.array([9, 8, 7, 6], np.uint8)})   # str keys, arrays
    ds = data.load("cifar10", str(tmp_path))
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int64
    assert np.array_equal(ds.train.images[8:12].reshape(4, -1), x)
    assert ds.train.labels[8:12].tolist() == [9, 8, 7, 6]


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_numpy_scalar_labels_are_accepted(tmp_path, protocol):
    """Labels saved as numpy scalars (a list of np.int64, as a script indexing a label array
    writes): reconstructed from their dtype and bytes, still without running code."""
    root = _cifar_dir(tmp_path, "cifar10")
    labels = [np.int64(9), np.int32(8), np.uint8(7), np.int16(6)]
    _write_batch(root, {b"data": _good_x(), b"labels": labels}, protocol=protocol)
    ds = data.load("cifar10", str(tmp_path))
    assert ds.train.labels[8:12].tolist() == [9, 8, 7, 6]


def test_cifar_numpy_scalars_of_other_dtypes_are_refused(tmp_path):
    root = _cifar_dir(tmp_path, "cifar10")
    scalar = np.int64(0).__reduce__()[0]

    class ObjectScalar:
        def __reduce__(self):
            return scalar, (np.dtype(object), 3)
    _write_batch(root, {b"data": _good_x(), b"labels": [ObjectScalar(), 1, 2, 3]})
    with pytest.raises(ValueError, match="numpy scalars are allowed only of a numeric dtype"):
        data.load("cifar10", str(tmp_path))


def test_cifar100_fine_label_range(tmp_path):
    root = _cifar_dir(tmp_path, "cifar100")
    _write_batch(root, _cifar_record("cifar100", _good_x(), [0, 99, 5, 5], "test"), "test")
    assert data.load("cifar100", str(tmp_path)).test.labels.tolist() == [0, 99, 5, 5]
    _write_batch(root, _cifar_record("cifar100", _good_x(), [0, 100, 5, 5], "test"), "test")
    with pytest.raises(ValueError, match=r"test'.*label 100 at index 1.*\[0, 100\)"):
        data.load("cifar100", str(tmp_path))


def _py2_cifar_pickle(x, labels):
    """The bytes Python 2's cPickle.dump(d, f, 2) wrote for the original CIFAR files: str (not
    unicode) keys and array data, and numpy's globals under their numpy 1 names (numpy.core.*)."""
    import struct

    def s(b):   # a Python 2 str
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)

    def i(v):
        return b"J" + struct.pack("<i", v)
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
           + b"(" + i(1) + i(x.shape[0]) + i(x.shape[1]) + b"\x86"
           + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
           + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
           + b"\x89" + s(x.tobytes()) + b"tb")
    lab = b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 3 of 5") + s(b"data") + arr \
        + s(b"labels") + lab + b"u."


@pytest.mark.parametrize("protocol", ["py2", 2, 3, 4, 5])
def test_cifar_pickles_of_every_protocol_load(tmp_path, protocol):
    root = _cifar_dir(tmp_path, "cifar10")
    x = _good_x()
    if protocol == "py2":
        (root / "data_batch_3").write_bytes(_py2_cifar_pickle(x, [3, 1, 4, 1]))
    else:
        _write_batch(root, _cifar_record("cifar10", x, [3, 1, 4, 1], "data_batch_3"), protocol=protocol)
    ds = data.load("cifar10", str(tmp_path))
    assert np.array_equal(ds.train.images[8:12].reshape(4, -1), x)
    assert ds.train.labels[8:12].tolist() == [3, 1, 4, 1]


class _RunsCode:
    """Unpickling this calls os.system: what a crafted dataset file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_cifar_pickle_cannot_run_code(tmp_path):
    root = _cifar_dir(tmp_path, "cifar10")
    # the payload really runs code under plain pickle.load (so the refusal below is what stops it)
    probe = tmp_path / "plain_pickle_ran"
    pickle.loads(pickle.dumps(_RunsCode(probe), protocol=2))
    assert probe.exists()
    marker = tmp_path / "marker"
    for payload in (_RunsCode(marker),                                              # top level
                    _cifar_record("cifar10", _good_x(), [0, 1, _RunsCode(marker), 3], "x")):   # nested
        _write_batch(root, payload)
        with pytest.raises(ValueError, match=r"data_batch_3' is not a plain CIFAR pickle: refused "
                                             r"global (posix|nt|os)\.system"):
            data.load("cifar10", str(tmp_path))
        assert not marker.exists()
    _write_batch(root, {b"data": _CallsEval(), b"labels": [0]})
    with pytest.raises(ValueError, match=r"refused global (__builtin__|builtins)\.eval"):
        data.load("cifar10", str(tmp_path))


def test_cifar_codecs_encode_only_decodes_latin1(tmp_path):
    import codecs
    root = _cifar_dir(tmp_path, "cifar10")

    class Rot13:
        def __reduce__(self):
            return codecs.encode, ("abc", "rot13")
    _write_batch(root, {b"data": Rot13(), b"labels": [0]})
    with pytest.raises(ValueError, match=r"_codecs.encode is allowed only as encode\(str, 'latin1'\)"):
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


@pytest.mark.parametrize("case, file, content, why", [
    ("label byte 0", "train_y.bin", bytes([1, 0, 3]), r"train_y.bin' has label byte 0 at index 1.*1\.\.10"),
    ("label byte 11", "test_y.bin", bytes([11, 2]), r"test_y.bin' has label byte 11 at index 0"),
    ("too many labels", "test_y.bin", bytes([1, 2, 3]), r"test_y.bin' must hold 2 labels.*test_X.bin.*got 3"),
    ("empty images", "test_X.bin", b"", r"test_X.bin' is empty"),
    ("empty unlabeled", "unlabeled_X.bin", b"", r"unlabeled_X.bin' is empty"),
], ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_stl10_malformed_contents_name_the_file(tmp_path, case, file, content, why):
    root = _stl_dir(tmp_path)
    (root / file).write_bytes(content)
    with pytest.raises(ValueError, match=why + ".*STL-10 binary"):
        data.load("stl10", str(tmp_path))


def _folder(root, classes=("cat", "dog"), per_class=5, size=(12, 9)):
    Image = pytest.importorskip("PIL.Image")   # writes the images (reading them is what is tested)
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
    assert all(im.shape == (3, 9, 12) for im in ds.train.images)         # kept at their own size
    assert sorted(ds.test.labels.tolist()) == [0, 1]
    images, labels = ds.train.batch([0, 3])
    assert [im.shape for im in images] == [(3, 9, 12)] * 2 and labels.tolist() == ds.train.labels[[0, 3]].tolist()
    _folder(tmp_path / "split" / "train", per_class=3)
    _folder(tmp_path / "split" / "test", per_class=2)
    ds = data.load("folder", str(tmp_path / "split"), 64)
    assert len(ds.train) == 6 and len(ds.test) == 4


def test_image_folder_keeps_full_resolution_up_to_9_4_of_the_encoder(tmp_path):
    """Views are cropped from (almost) full resolution, as amdim-public's ImageNet pipeline: an
    image is shrunk, keeping its aspect ratio, only where its shorter side exceeds 9/4 of the
    encoder size."""
    _folder(tmp_path / "big", per_class=5, size=(300, 200))                  # 300 wide, 200 high
    ds = data.load("folder", str(tmp_path / "big"), 64)                      # cap: 144
    assert data.stored_side(64) == 144 and all(im.shape == (3, 144, 216) for im in ds.train.images)
    ds = data.load("folder", str(tmp_path / "big"), 128)                     # cap 288 > 200: as read
    assert all(im.shape == (3, 200, 300) for im in ds.train.images)


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


def _png_claiming_size(width, height):
    """A tiny PNG whose header claims width x height pixels (Pillow checks the size on open)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_image_folder_decompression_bomb_names_the_file(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    _folder(tmp_path / "bomb")
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 10     # past the limit at which Pillow raises
    (tmp_path / "bomb" / "dog" / "huge.png").write_bytes(_png_claiming_size(side, side))
    with pytest.raises(ValueError, match=r"image .*dog/huge.png' is larger than Pillow's decompression-bomb limit"):
        data.load("folder", str(tmp_path / "bomb"))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_image_folder_truncated_image_names_the_file(tmp_path, fmt):
    Image = pytest.importorskip("PIL.Image")
    _folder(tmp_path / "t")
    path = tmp_path / "t" / "cat" / f"cut.{fmt}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cannot read image .*cat/cut.{fmt}'"):
        data.load("folder", str(tmp_path / "t"))


def test_image_folder_class_layout_errors(tmp_path):
    _folder(tmp_path / "e")
    (tmp_path / "e" / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"class subfolder .*empty_class' holds no image files"):
        data.load("folder", str(tmp_path / "e"))
    _folder(tmp_path / "s" / "train")
    _folder(tmp_path / "s" / "test", classes=("cat", "dog", "eel"), per_class=1)
    with pytest.raises(ValueError, match=r"class subfolders \['eel'\] are not in the training split"):
        data.load("folder", str(tmp_path / "s"))
    _folder(tmp_path / "h" / "train")
    with pytest.raises(ValueError, match=r"train' holds class subfolders but there is no test/"):
        data.load("folder", str(tmp_path / "h"))


def test_image_folder_skips_hidden_entries(tmp_path):
    _folder(tmp_path / "d")
    (tmp_path / "d" / ".ipynb_checkpoints").mkdir()                      # not a class
    (tmp_path / "d" / "cat" / "._0.png").write_bytes(b"macOS resource fork")   # not an image
    ds = data.load("folder", str(tmp_path / "d"), 32)
    assert ds.n_classes == 2 and len(ds.train) + len(ds.test) == 10


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
