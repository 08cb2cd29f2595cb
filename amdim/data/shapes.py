"""The built-in "shapes" dataset: procedurally generated 32x32 RGB images of 10 object classes.

Each image holds one filled object (the class) under nuisances that a linear read-out of the pixels
cannot undo: random size and rotation, a random polarity (a light object on a dark background or a
dark one on a light background), pixel noise, and a centre up to 3 px from the image centre. The
class stays obvious to a human (see docs/shapes_samples.png), but a linear probe on the raw pixels
scores 0.18 (chance: 0.10), one on a colour histogram 0.19 and one on a randomly initialised AMDIM
encoder (ndf 16) 0.29: an encoder has to learn shape to do well.

Each version removed an instance cue that let a contrastive encoder tell images apart without their
shape (docs/shapes.md has the measurements): shapes-v1 put the object anywhere it fitted (AMDIM
learnt where it was), and its clutter kept even a supervised encoder at 0.35 within the CPU budget;
shapes-v2 drew the object and background colours from the whole RGB cube, and Deep InfoMax, which
sees no augmentation, matched an image's global and local features by those colours and gained
nothing over its random encoder. The earlier nuisances are still `Nuisances` fields (`V2`).

Images are rendered from signed distance functions with numpy alone (anti-aliased by the
distance to the edge), in chunks whose random streams are seeded by (VERSION_SEED, split, chunk):
the same arrays every time for a given VERSION, independent of anything else drawn from numpy.
numpy's legacy RandomState is used because its streams are frozen across numpy releases.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# bump both whenever a change alters the generated images: VERSION names the cached arrays,
# VERSION_SEED starts every random stream
VERSION = "shapes-v3"
VERSION_SEED = 3
CLASSES = ("circle", "square", "triangle", "cross", "star", "ring", "ellipse", "hexagon", "arrow", "heart")
SIZE = 32
N_TRAIN, N_TEST = 10000, 2000
CHUNK = 1000          # images rendered (and seeded) together; part of what VERSION fixes
SPLITS = {"train": 0, "test": 1}

MIN_CONTRAST = 0.45       # RGB distance (channels in [0, 1]) between object and background colours
# the corners of the RGB cube pulled in to [0.15, 0.85] (pixel noise, 3.75 standard deviations
# away, rarely clips): any two are 0.7 or more apart, more than MIN_CONTRAST
PALETTE = 0.15 + 0.7 * np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
                                 [0, 1, 1], [1, 0, 1]], np.float64)


@dataclass(frozen=True)
class Nuisances:
    """What varies besides the class. The defaults define the dataset; switching them off gives an
    easy variant (used by the tests to show that the nuisances are what defeats a pixel probe)."""
    # the largest offset (px, along x and along y) of the object's centre from the image centre; None:
    # anywhere the object fits (shapes-v1, where the position identified an image for the NCE task)
    offset_px: float | None = 3.0
    scale_px: tuple[float, float] = (7.0, 12.0)   # object "radius" in pixels (it fits that circle)
    rotation: bool = True                     # uniform in [0, 2 pi), else upright
    colour: bool = True                       # object / background colours as `palette` says, else white on black
    # with colour: the object and background colours are two different entries of PALETTE[:palette]
    # (since shapes-v3: 2, light on dark or dark on light); None: any RGB colour (shapes-v2)
    palette: int | None = 2
    # max per-channel change of the background across the image (shapes-v2: 0.25)
    gradient: float = 0.0
    # clutter (none by default since shapes-v2: with it even a supervised encoder reached only 0.35
    # at the CPU budget, see the module docstring)
    strokes_behind: int = 0                   # clutter strokes behind the object
    blobs: int = 0                            # small clutter discs / squares behind the object
    stroke_in_front: bool = False             # one thin stroke across the object
    noise_std: float = 0.04                   # Gaussian pixel noise (pixel values in [0, 1])

    def __post_init__(self):
        p = self.palette
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, np.integer))
                              or not 2 <= p <= len(PALETTE)):
            raise ValueError(f"Nuisances.palette must be None or an integer number of colours in "
                             f"[2, {len(PALETTE)}], got {p!r}")


DEFAULT = Nuisances()
# the nuisances of shapes-v2: generate(..., nuisances=V2, seed=V2_SEED) gives its images
V2 = Nuisances(palette=None, gradient=0.25)
V2_SEED = 2
EASY = Nuisances(offset_px=0.0, scale_px=(11.0, 11.0), rotation=False, colour=False, gradient=0.0,
                 strokes_behind=0, blobs=0, stroke_in_front=False, noise_std=0.0)


def _regular_polygon(n, radius, phase=np.pi / 2):
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _star(points=5, outer=1.0, inner=0.45):
    a = np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


ARROW = np.array([[0.95, 0.0], [0.15, 0.62], [0.15, 0.22], [-0.95, 0.22],
                  [-0.95, -0.22], [0.15, -0.22], [0.15, -0.62]])
# vertices in object units: every shape fits the unit circle, so SCALE_PX is comparable across classes
TRIANGLE = _regular_polygon(3, 1.0)
HEXAGON = _regular_polygon(6, 0.9, 0.0)
STAR = _star()


def _sd_polygon(x, y, verts):
    """Signed distance to a simple polygon (negative inside): nearest edge, crossing-number sign."""
    d2 = np.full(x.shape, np.inf, np.float32)
    inside = np.zeros(x.shape, bool)
    for i in range(len(verts)):
        (ax, ay), (bx, by) = verts[i - 1], verts[i]
        ex, ey = bx - ax, by - ay
        wx, wy = x - ax, y - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        np.minimum(d2, (wx - t * ex) ** 2 + (wy - t * ey) ** 2, out=d2)
        # the edge crosses the horizontal ray from (x, y) to +inf
        if ay != by:
            crosses = ((ay > y) != (by > y)) & (x < ax + (y - ay) * ex / ey)
            inside ^= crosses
    return np.where(inside, -1.0, 1.0).astype(np.float32) * np.sqrt(d2)


def _sd_box(x, y, hx, hy):
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _sd_ellipse(x, y, a, b):
    # first-order approximation (exact on the boundary, which is all the anti-aliasing needs)
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    k1 = np.sqrt((x / a ** 2) ** 2 + (y / b ** 2) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _sd_heart(x, y):
    # exact heart distance (tip at the origin, lobes towards +y), shifted and scaled to fit the unit circle
    s = 0.7
    px, py = np.abs(x) * s, 0.55 - y * s      # image rows grow downwards: lobes up
    upper = np.sqrt((px - 0.25) ** 2 + (py - 0.75) ** 2) - np.sqrt(2.0) / 4.0
    m = 0.5 * np.maximum(px + py, 0.0)
    lower = np.sqrt(np.minimum(px ** 2 + (py - 1.0) ** 2, (px - m) ** 2 + (py - m) ** 2)) * np.sign(px - py)
    return np.where(px + py > 1.0, upper, lower) / s


SDF = {
    "circle": lambda x, y: np.sqrt(x * x + y * y) - 0.85,
    "square": lambda x, y: _sd_box(x, y, 0.68, 0.68),
    "triangle": lambda x, y: _sd_polygon(x, y, TRIANGLE),
    "cross": lambda x, y: np.minimum(_sd_box(x, y, 0.92, 0.27), _sd_box(x, y, 0.27, 0.92)),
    "star": lambda x, y: _sd_polygon(x, y, STAR),
    "ring": lambda x, y: np.abs(np.sqrt(x * x + y * y) - 0.72) - 0.2,
    "ellipse": lambda x, y: _sd_ellipse(x, y, 0.95, 0.5),
    "hexagon": lambda x, y: _sd_polygon(x, y, HEXAGON),
    "arrow": lambda x, y: _sd_polygon(x, y, ARROW),
    "heart": _sd_heart,
}
assert tuple(SDF) == CLASSES


def _over(img, alpha, colour):
    """Alpha-composite a flat colour (n, 3) over img (n, 3, H, W) with coverage alpha (n, H, W)."""
    img += alpha[:, None] * (colour[:, :, None, None] - img)


def _segment_alpha(gx, gy, a, b, half_width):
    """Anti-aliased coverage of a thick segment from a to b (each (n, 2)) on the pixel grid."""
    ax, ay = a[:, 0, None, None], a[:, 1, None, None]
    ex, ey = (b - a)[:, 0, None, None], (b - a)[:, 1, None, None]
    wx, wy = gx - ax, gy - ay
    t = np.clip((wx * ex + wy * ey) / np.maximum(ex * ex + ey * ey, 1e-6), 0.0, 1.0)
    d = np.sqrt((wx - t * ex) ** 2 + (wy - t * ey) ** 2) - half_width[:, None, None]
    return np.clip(0.5 - d, 0.0, 1.0)


def _contrasting(rs, n, avoid, min_dist):
    """n random RGB colours at least min_dist from every colour in `avoid` (a list of (n, 3))."""
    c = rs.uniform(0, 1, (n, 3))
    for _ in range(200):   # rejection sampling; the admissible set is large, so this ends fast
        bad = np.zeros(n, bool)
        for other in avoid:
            bad |= np.linalg.norm(c - other, axis=1) < min_dist
        if not bad.any():
            return c
        c[bad] = rs.uniform(0, 1, (int(bad.sum()), 3))
    raise RuntimeError("could not draw contrasting colours")   # unreachable for MIN_CONTRAST < 0.8


def _render_chunk(labels, rs, size, nz):
    n = len(labels)
    f32 = np.float32
    gy, gx = (np.mgrid[0:size, 0:size].astype(f32) + 0.5)[:, None]        # pixel centres, (1, H, W)

    # every random draw happens here, in a fixed order, before any rendering
    scale = rs.uniform(*nz.scale_px, n)
    margin = 0.75 * scale                                                    # the object may touch the edge
    u = rs.uniform(0, 1, (2, n))
    if nz.offset_px is None:
        cx, cy = u * (size - 2 * margin) + margin
    else:
        cx, cy = size / 2 + (2 * u - 1) * nz.offset_px
    theta = rs.uniform(0, 2 * np.pi, n) if nz.rotation else np.zeros(n)
    if nz.colour and nz.palette is not None:
        k_bg = rs.randint(0, nz.palette, n)
        k_obj = (k_bg + rs.randint(1, nz.palette, n)) % nz.palette          # any other entry
        bg0, obj = PALETTE[k_bg], PALETTE[k_obj]
        bg1 = np.clip(bg0 + rs.uniform(-nz.gradient, nz.gradient, (n, 3)), 0, 1)
    elif nz.colour:
        bg0 = rs.uniform(0, 1, (n, 3))
        bg1 = np.clip(bg0 + rs.uniform(-nz.gradient, nz.gradient, (n, 3)), 0, 1)   # gradient end colour
        obj = _contrasting(rs, n, [bg0, bg1], MIN_CONTRAST)
    else:
        bg0 = bg1 = np.zeros((n, 3))
        obj = np.ones((n, 3))
    grad_dir = rs.uniform(0, 2 * np.pi, n)
    strokes = [(rs.uniform(-4, size + 4, (n, 2)), rs.uniform(-4, size + 4, (n, 2)),
                rs.uniform(0.5, 1.1, n), rs.uniform(0, 1, (n, 3))) for _ in range(nz.strokes_behind)]
    blobs = [(rs.uniform(0, size, (n, 2)), rs.uniform(1.5, 3.0, n), rs.uniform(0, 1, n) < 0.5,
              rs.uniform(0, 1, (n, 3))) for _ in range(nz.blobs)]
    front = [(rs.uniform(-4, size + 4, (n, 2)), rs.uniform(-4, size + 4, (n, 2)),
              rs.uniform(0.35, 0.6, n), rs.uniform(0, 1, (n, 3)))] if nz.stroke_in_front else []
    noise = rs.normal(0, nz.noise_std, (n, 3, size, size)).astype(f32) if nz.noise_std else 0

    # background: a linear gradient from bg0 to bg1 along a random direction
    u = (np.cos(grad_dir)[:, None, None] * (gx - size / 2) + np.sin(grad_dir)[:, None, None] * (gy - size / 2))
    t = (u / size + 0.5).clip(0, 1).astype(f32)[:, None]                    # (n, 1, H, W)
    img = (bg0[:, :, None, None] * (1 - t) + bg1[:, :, None, None] * t).astype(f32)

    for a, b, hw, col in strokes:
        _over(img, _segment_alpha(gx, gy, a, b, hw).astype(f32), col.astype(f32))
    for c, r, square, col in blobs:
        dx, dy = gx - c[:, 0, None, None], gy - c[:, 1, None, None]
        rr = r[:, None, None]
        d = np.where(square[:, None, None], np.maximum(np.abs(dx), np.abs(dy)), np.sqrt(dx * dx + dy * dy)) - rr
        _over(img, np.clip(0.5 - d, 0, 1).astype(f32), col.astype(f32))

    # the object, in its own frame: rotate by -theta about its centre, divide by its scale
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dx, dy = gx - cx[:, None, None], gy - cy[:, None, None]
    ox = ((cos * dx + sin * dy) / scale[:, None, None]).astype(f32)
    oy = ((-sin * dx + cos * dy) / scale[:, None, None]).astype(f32)
    alpha = np.empty((n, size, size), f32)
    for k, name in enumerate(CLASSES):
        sel = labels == k
        if sel.any():
            dist_px = SDF[name](ox[sel], oy[sel]) * scale[sel, None, None]
            alpha[sel] = np.clip(0.5 - dist_px, 0, 1)
    _over(img, alpha, obj.astype(f32))

    for a, b, hw, col in front:
        _over(img, _segment_alpha(gx, gy, a, b, hw).astype(f32), col.astype(f32))
    img += noise
    return (img.clip(0, 1) * 255).round().astype(np.uint8)


def generate(split: str, n: int | None = None, size: int = SIZE,
             nuisances: Nuisances = DEFAULT, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `split` ("train" or "test") images (n, 3, size, size) uint8 and labels (n,) int64.
    `seed`: the first number of every random stream (None: VERSION_SEED; an earlier version's
    seed with its nuisances gives that version's images, e.g. V2 and V2_SEED).

    Deterministic: chunk j of a split is drawn from RandomState([seed, split id, j]), so the
    first k images of a split do not depend on n. Classes are balanced within each chunk.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    n = (N_TRAIN if split == "train" else N_TEST) if n is None else n
    if n < 1:
        raise ValueError(f"n must be a positive number of images, got {n}")
    images = np.empty((n, 3, size, size), np.uint8)
    labels = np.empty(n, np.int64)
    for j, start in enumerate(range(0, n, CHUNK)):
        rs = np.random.RandomState([VERSION_SEED if seed is None else seed, SPLITS[split], j])
        m = min(CHUNK, n - start)
        # a partial last chunk is rendered whole and cut, so it draws the same stream as a full one
        lab = rs.permutation(np.arange(CHUNK) % len(CLASSES))
        images[start:start + m] = _render_chunk(lab, rs, size, nuisances)[:m]
        labels[start:start + m] = lab[:m]
    return images, labels


_CACHE: dict[str, tuple[np.ndarray, ...]] = {}


def shapes_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels), generated once per process.

    Returns copies, so a caller that writes into its arrays cannot change later loads.
    """
    if VERSION not in _CACHE:
        _CACHE[VERSION] = generate("train") + generate("test")
    return tuple(a.copy() for a in _CACHE[VERSION])


def sample_grid(path: str, per_class: int = 8, scale: int = 3, nuisances: Nuisances = DEFAULT) -> None:
    """Write a PNG of the first `per_class` training images of each class (one row per class)."""
    from PIL import Image
    images, labels = generate("train", 40 * per_class, nuisances=nuisances)
    rows = []
    for k in range(len(CLASSES)):
        pick = images[labels == k][:per_class]
        if len(pick) < per_class:
            raise RuntimeError(f"too few images of class {CLASSES[k]!r} for the grid")
        padded = np.pad(pick.transpose(0, 2, 3, 1), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255)
        rows.append(np.concatenate(list(padded), 1))
    grid = np.concatenate(rows, 0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m amdim.data.shapes",
                                description="write a PNG grid of sample images of the shapes dataset")
    p.add_argument("--out", default="docs/shapes_samples.png")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--easy", action="store_true", help="without the nuisances (centred, upright, white on black)")
    args = p.parse_args()
    sample_grid(args.out, args.per_class, nuisances=EASY if args.easy else DEFAULT)
    print(f"wrote {args.out} (rows: {', '.join(CLASSES)})")
