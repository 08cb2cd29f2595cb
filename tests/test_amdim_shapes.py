"""The built-in "shapes" dataset: registration, determinism, the fixed split, class balance, the
shapes it draws, and that its nuisances keep a linear probe on raw pixels near chance."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from amdim.data import datasets as data, shapes
from amdim.evaluate import linear_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_shapes_shapes_dtypes_balance_and_generated_once(monkeypatch):
    assert "shapes" in data.DATASETS and data.NATURAL_SIZE["shapes"] == 32
    shapes._CACHE.clear()
    ds = data.load("shapes")
    # generated once per process (a few seconds): a second load reuses the arrays, as copies
    monkeypatch.setattr(shapes, "generate", lambda *a, **k: pytest.fail("the dataset was generated again"))
    again = data.load("shapes")
    assert np.array_equal(again.train.images, ds.train.images) and again.train.images is not ds.train.images
    assert ds.name == "shapes" and ds.n_classes == 10 == len(shapes.CLASSES)
    assert ds.train is ds.train_labeled
    for part, n in ((ds.train, 10000), (ds.test, 2000)):
        assert part.images.shape == (n, 3, 32, 32) and part.images.dtype == np.uint8
        assert part.labels.shape == (n,) and part.labels.dtype == np.int64
        assert np.bincount(part.labels, minlength=10).tolist() == [n // 10] * 10
    x, y = ds.test.batch([0, 5, 1999])
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == ds.test.labels[[0, 5, 1999]].tolist()
    # images use the whole range and are not constant (the nuisances are drawn)
    assert ds.train.images.min() == 0 and ds.train.images.max() == 255
    assert ds.train.images.reshape(10000, -1).std(1).min() > 5


def test_generation_is_deterministic_and_the_split_fixed():
    a_x, a_y = shapes.generate("train", 1200)
    b_x, b_y = shapes.generate("train", 1200)
    assert np.array_equal(a_x, b_x) and np.array_equal(a_y, b_y)
    # the first k images of a split do not depend on how many are generated
    c_x, c_y = shapes.generate("train", 1000)
    assert np.array_equal(a_x[:1000], c_x) and np.array_equal(a_y[:1000], c_y)
    # train and test are different images
    t_x, _ = shapes.generate("test", 1000)
    train_rows = {r.tobytes() for r in a_x.reshape(len(a_x), -1)}
    assert not any(r.tobytes() in train_rows for r in t_x.reshape(len(t_x), -1))
    # repeated loads give identical arrays, and writing into one load does not change the next
    d1 = data.load("shapes")
    d1.train.images[:] = 0
    d2, d3 = data.load("shapes"), data.load("shapes")
    assert np.array_equal(d2.train.images[:1200], a_x) and np.array_equal(d2.train.labels[:1200], a_y)
    assert np.array_equal(d2.test.images, d3.test.images) and np.array_equal(d2.test.labels, d3.test.labels)


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        shapes.generate("val")
    with pytest.raises(ValueError, match="n must be a positive"):
        shapes.generate("train", 0)


def _polygon_area(v):
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


AREAS = {   # the area of each shape in object units, from its construction
    "circle": np.pi * 0.85 ** 2,
    "square": 1.36 ** 2,
    "triangle": _polygon_area(shapes.TRIANGLE),
    "cross": 2 * 1.84 * 0.54 - 0.54 ** 2,
    "star": _polygon_area(shapes.STAR),
    "ring": np.pi * (0.92 ** 2 - 0.52 ** 2),
    "ellipse": np.pi * 0.95 * 0.5,
    "hexagon": _polygon_area(shapes.HEXAGON),
    "arrow": _polygon_area(shapes.ARROW),
}


@pytest.mark.parametrize("name", shapes.CLASSES)
def test_signed_distances_draw_the_named_shape(name):
    h = 2.4 / 600
    g = (np.arange(600, dtype=np.float32) + 0.5) * h - 1.2
    x, y = np.meshgrid(g, g)
    d = shapes.SDF[name](x, y)
    inside = d < 0
    assert (x[inside] ** 2 + y[inside] ** 2).max() <= 1.0 + 2 * h        # fits the unit circle
    assert inside.mean() > 0.1                                            # and fills a good part of it
    if name in AREAS:
        assert inside.sum() * h * h == pytest.approx(AREAS[name], rel=0.01)
    assert inside[300, 300] == (name != "ring")                           # the ring has a hole
    if name == "heart":
        assert np.array_equal(inside, inside[:, ::-1])                    # mirror-symmetric
    # a distance, not just a sign: one pixel outside the edge is about one unit of distance away
    edge = inside & ~np.roll(inside, 1, axis=1)
    step = shapes.SDF[name](x[edge] - 0.05, y[edge])
    assert np.median(step) == pytest.approx(0.05, abs=0.02)


def test_polygon_distance_matches_the_box():
    sq = np.array([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
    pts = np.random.default_rng(0).uniform(-1.5, 1.5, (2, 5000)).astype(np.float32)
    np.testing.assert_allclose(shapes._sd_polygon(pts[0], pts[1], sq),
                               shapes._sd_box(pts[0], pts[1], 0.5, 0.5), atol=1e-5)


def _pixels(x):
    return torch.from_numpy(x).float().div(255).flatten(1)


def _probe(features, nuisances, n_train, n_test):
    xtr, ytr = shapes.generate("train", n_train, nuisances=nuisances)
    xte, yte = shapes.generate("test", n_test, nuisances=nuisances)
    return linear_probe(features(xtr), torch.from_numpy(ytr), features(xte), torch.from_numpy(yte), 10)["test_top1"]


def test_pixel_probe_stays_near_chance():
    """A linear probe on raw pixels of a 1000-image training subset stays below 0.2 (chance 0.1;
    0.18 with all 10000). Without the nuisances the same probe is perfect: they are what makes the
    dataset hard, and this test fails if they stop doing so."""
    assert _probe(_pixels, shapes.DEFAULT, 1000, 500) < 0.2
    assert _probe(_pixels, shapes.EASY, 300, 200) > 0.9


def test_colours_alone_do_not_tell_the_class():
    """The colour-histogram baseline of benchmarks/method_evidence.py stays low (0.19 with all 10000,
    chance 0.10): object and background colours are drawn independently of the class, and what the
    histogram still tells is the object's area (its share of the pixels), which the class sets only
    in part beside the scale. A dataset whose colours followed the class (here: the red channel set
    by it) is caught."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from method_evidence import colour_histogram
    hist = lambda x: colour_histogram(torch.from_numpy(x))
    assert _probe(hist, shapes.DEFAULT, 1000, 500) < 0.25
    x, y = shapes.generate("train", 1000)
    xte, yte = shapes.generate("test", 500)
    for images, labels in ((x, y), (xte, yte)):
        images[:, 0] = (12 + 25 * labels)[:, None, None]           # the red channel follows the class
    leaky = linear_probe(hist(x), torch.from_numpy(y), hist(xte), torch.from_numpy(yte), 10)["test_top1"]
    assert leaky > 0.5


SYMMETRIC = [k for k, c in enumerate(shapes.CLASSES) if c not in ("arrow", "heart")]   # centroid = centre


def _centroids(nuisances, n=400):
    """The objects' centres from white-on-black renders (the centroid of coverage, exact for the
    shapes symmetric about their centre)."""
    import dataclasses
    plain = dataclasses.replace(nuisances, colour=False, gradient=0.0, noise_std=0.0)
    x, y = shapes.generate("train", n, nuisances=plain)
    keep = np.isin(y, SYMMETRIC)
    a = x[keep, 0].astype(np.float64)
    g = np.arange(shapes.SIZE) + 0.5
    return np.stack([(a.sum(1) * g).sum(1), (a.sum(2) * g).sum(1)], 1) / a.sum((1, 2))[:, None]


def test_object_and_background_are_light_on_dark_or_dark_on_light():
    """shapes-v3: the object and the background are the two grey levels of PALETTE[:2] (0.85 and
    0.15), one each, either way round with equal odds, and independent of the class. A bad palette
    is refused."""
    x, y = shapes.generate("train", 400)
    f = x.astype(np.float64) / 255
    corner = f[:, :, :3, :3].mean((2, 3))                # background (the object never reaches a corner)
    centre = f[:, :, 15:17, 15:17].mean((2, 3))          # object, for the classes that cover it (offset <= 3 px)
    filled = np.isin(y, [shapes.CLASSES.index(c) for c in ("circle", "square", "hexagon")])
    for part in (corner, centre[filled]):
        # (pixel noise of std 0.04, averaged over 4-9 pixels)
        assert np.abs(part - part.mean(1, keepdims=True)).max() < 0.1         # grey: no hue
        assert np.all((np.abs(part - 0.15) < 0.1) | (np.abs(part - 0.85) < 0.1))
    light_bg = corner[:, 0] > 0.5
    assert np.all(light_bg[filled] != (centre[filled, 0] > 0.5))               # the other level
    assert 0.4 < light_bg.mean() < 0.6
    for k in range(len(shapes.CLASSES)):                                      # not set by the class
        assert 0.2 < light_bg[y == k].mean() < 0.8
    for bad in (1, len(shapes.PALETTE) + 1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="Nuisances.palette must be"):
            shapes.Nuisances(palette=bad)


# sha256 of the first 120 images and labels of each split of shapes-v2, as its own generator
# (commit d2a2396) rendered them
V2_SHA256 = {"train": "84d60b89c7825ee792d617316203c9d54b87ef3532b08b391ccf670673c6b9da",
             "test": "357d4707c46400ad2aa15300f9ed2b28138676403a79f9220db2540d2bbe2baa"}


def test_v2_is_still_generated_exactly():
    """generate(nuisances=V2, seed=V2_SEED) is shapes-v2 byte for byte (the images behind
    results/method_evidence_shapes_v2.md and docs/shapes.md's v2 rows), and V2 differs from v3
    in the colours and the gradient only."""
    import dataclasses
    import hashlib
    for split, digest in V2_SHA256.items():
        x, y = shapes.generate(split, 120, nuisances=shapes.V2, seed=shapes.V2_SEED)
        assert hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest() == digest, split
    assert shapes.V2 == dataclasses.replace(shapes.DEFAULT, palette=None, gradient=0.25)


def test_the_object_stays_near_the_image_centre():
    """Since shapes-v2: the object's centre is within offset_px (3 px) of the image centre along each axis,
    so its position cannot tell two images apart across the trainer's translations (up to 4 px). With
    offset_px None (shapes-v1) objects lie anywhere they fit, which this test tells apart."""
    assert shapes.DEFAULT.offset_px == 3.0
    off = np.abs(_centroids(shapes.DEFAULT) - shapes.SIZE / 2)
    assert off.max() <= 3.0 + 0.05 and off.max() > 2.5          # the whole +-3 px range is used
    anywhere = np.abs(_centroids(shapes.Nuisances(offset_px=None)) - shapes.SIZE / 2)
    assert anywhere.max() > 6


def test_trainer_accepts_dataset_shapes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "amdim.train", "--dataset", "shapes", "--ndf", "4", "--n-rkhs", "16",
           "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "2", "--no-eval",
           "--loss-backend", "reference", "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_sample_grid(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    shapes.sample_grid(str(tmp_path / "g.png"), per_class=2, scale=1)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (2 * 34, 10 * 34)


def test_cpu_sized_defaults_for_shapes_sit_under_recipes_and_explicit_options():
    """On shapes AMDIM trains 10 epochs at lr 2e-3 and DIM 20 at lr 1e-3 (amdim.config.DATASET_DEFAULTS,
    docs/shapes.md), AMDIM with the official schedule scaled to them; the rest of each method, other
    datasets, a recipe and an explicit option are unaffected; --help says so."""
    from amdim.config import default_text, resolve
    o = resolve({"dataset": "shapes"}).options()
    assert (o["epochs"], o["lr"], o["lr_milestones"], o["warmup_steps"]) == (10, 2e-3, [8, 9], 500)
    assert (o["betas"], o["weight_decay"], o["estimator"], o["augment"]) == ([0.8, 0.999], 1e-5, "nce", "amdim-cifar")
    assert resolve({"dataset": "shapes", "lr": 3e-4, "epochs": 4}).options()["lr"] == 3e-4
    d = resolve({}).options()
    assert (d["dataset"], d["epochs"], d["lr"]) == ("digits", 30, 2e-4)
    r = resolve({"recipe": "amdim-cifar10", "dataset": "shapes"}).options()
    assert (r["epochs"], r["lr"]) == (300, 2e-4)
    m = resolve({"method": "dim", "dataset": "shapes"}).options()
    assert (m["epochs"], m["lr"]) == (20, 1e-3)
    assert (m["betas"], m["estimator"], m["augment"], m["lr_milestones"]) == ([0.5, 0.999], "jsd", "none", [])
    assert resolve({"method": "dim", "dataset": "digits"}).options()["lr"] == 1e-4
    assert "10 for amdim on shapes" in default_text("epochs") and "0.002 for amdim on shapes" in default_text("lr")
    assert "20 for dim on shapes" in default_text("epochs") and "0.001 for dim on shapes" in default_text("lr")
