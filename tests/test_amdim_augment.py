"""The batched augmentation against the official pipelines written out independently: amdim-public's
reflect-padded translation (numpy's reflect padding here), torchvision's ColorJitter (probability,
a random order per image, HSV hue: Python's colorsys here), RandomResizedCrop's boxes, RandomGrayscale,
the shared flip, the evaluation views, and the per-rank slices of the global batch."""
import colorsys
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amdim.data import augment
from amdim.data.augment import POLICIES, Policy


def _images(n=4, h=20, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_views_shapes_range_and_determinism(name):
    policy, imgs = POLICIES[name], _images(4, 40, 40)
    a = augment.views(imgs, policy, 32, torch.Generator().manual_seed(1))
    b = augment.views(imgs, policy, 32, torch.Generator().manual_seed(1))
    c = augment.views(imgs, policy, 32, torch.Generator().manual_seed(2))
    assert a[0].shape == a[1].shape == (4, 3, 32, 32)
    assert 0 <= float(a[0].min()) and float(a[0].max()) <= 1
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if name != "none":
        assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    else:   # the plain images: the evaluation view
        assert torch.equal(a[0], augment.eval_view(augment.to_float(imgs), policy, 32)) and torch.equal(a[0], a[1])


def test_flip_is_shared_by_both_views():
    """Without crop, jitter or grayscale a view is the image or its mirror, and both views of an image
    agree; over 64 images both outcomes occur."""
    policy = Policy(crop="none", jitter=None, p_gray=0.0)
    imgs = _images(64, 16, 16)
    x = augment.to_float(imgs)
    v1, v2 = augment.views(imgs, policy, 16, torch.Generator().manual_seed(0))
    flipped = [torch.equal(v1[i], x[i].flip(-1)) for i in range(64)]
    same = [torch.equal(v1[i], x[i]) for i in range(64)]
    assert all(f != s for f, s in zip(flipped, same))
    assert 10 < sum(flipped) < 54
    assert torch.equal(v1, v2)


def _numpy_translate(img, dx, dy, pad=4):
    """amdim-public's RandomTranslateWithReflect: mirror images pasted around the image (the edge
    pixel not repeated, numpy's "reflect"), then the crop shifted by (dx, dy)."""
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    h, w = img.shape[1:]
    return padded[:, pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def test_translation_is_up_to_4_px_reflect_filled_with_probability_0_8():
    policy = Policy(jitter=None, p_gray=0.0, p_flip=0.0)          # only the translation
    n = 400
    imgs = _images(n, 32, 32, seed=3)
    (v,) = augment.views(imgs, policy, 32, torch.Generator().manual_seed(4), count=1)
    x = augment.to_float(imgs).numpy()
    shifts = []
    for i in range(n):
        found = [(dx, dy) for dx, dy in itertools.product(range(-6, 7), repeat=2)
                 if np.array_equal(_numpy_translate(x[i], dx, dy, 6), v[i].numpy())]
        assert len(found) == 1, f"view {i} is no reflect-padded translation of its image"
        shifts.append(found[0])
    shifts = np.array(shifts)
    assert np.abs(shifts).max() == 4 and {-4, 4} <= set(shifts[:, 0]) and {-4, 4} <= set(shifts[:, 1])
    identity = float((shifts == 0).all(1).mean())          # 0.2 untranslated + 0.8 / 81 drawn (0, 0)
    assert 0.13 < identity < 0.29, identity


def test_jitter_is_applied_with_probability_0_8_in_a_random_order():
    n = 4000
    j = augment.Jitter(n, POLICIES["amdim-cifar"], torch.Generator().manual_seed(0))
    assert 0.77 < float(j.on.float().mean()) < 0.83
    assert 0.23 < float(j.gray.float().mean()) < 0.27
    assert torch.equal(j.order.sort(1).values, torch.arange(4).expand(n, 4))    # a permutation each
    assert len({tuple(o) for o in j.order.tolist()}) == 24                     # every order occurs
    lo = torch.tensor([0.6, 0.6, 0.6, -0.2])
    assert bool((j.factors >= lo).all() and (j.factors <= torch.tensor([1.4, 1.4, 1.4, 0.2])).all())


def _plain_colour(img, op, f):
    """torchvision's adjust_* on one (3, H, W) float image, written out (hue through colorsys)."""
    gray = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    if op == 0:
        out = img * f
    elif op == 1:
        out = (img - gray.mean()) * f + gray.mean()
    elif op == 2:
        out = (img - gray) * f + gray
    else:
        out = np.empty_like(img)
        for r in range(img.shape[1]):
            for c in range(img.shape[2]):
                h, s, v = colorsys.rgb_to_hsv(*img[:, r, c])
                out[:, r, c] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
    return np.clip(out, 0, 1)


def test_jitter_applies_each_images_order():
    """Each image's four operations run in its own drawn order: the result equals the plain
    operations applied in that order, and (for these images) differs from the fixed order b, c, s, h."""
    n = 12
    policy = Policy(jitter=(0.4, 0.4, 0.4, 0.2), p_jitter=1.0, p_gray=0.0)
    j = augment.Jitter(n, policy, torch.Generator().manual_seed(5))
    x = augment.to_float(_images(n, 3, 3, seed=6)).double()
    got = j.apply(x).numpy()
    fixed_differs = 0
    for i in range(n):
        ref, fixed = x[i].numpy(), x[i].numpy()
        for k in range(4):
            op = int(j.order[i, k])
            ref = _plain_colour(ref, op, float(j.factors[i, op]))
            fixed = _plain_colour(fixed, k, float(j.factors[i, k]))
        np.testing.assert_allclose(got[i], ref, atol=1e-6)
        fixed_differs += not np.allclose(got[i], fixed, atol=1e-4)
    assert fixed_differs >= n // 2


def test_hue_shift_is_torchvisions_hsv_shift():
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[0, :, 0, 0] = 0.5                                        # a gray pixel: no hue to shift
    turns = torch.tensor([0.13, -0.2, 0.5, 0.0, 0.95], dtype=torch.float64)
    got = augment.shift_hue(x, turns)
    for b in range(5):
        for r in range(4):
            for c in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, r, c].tolist())
                want = colorsys.hsv_to_rgb((h + float(turns[b])) % 1.0, s, v)
                assert np.allclose(got[b, :, r, c].numpy(), want, atol=1e-9)
    assert torch.allclose(augment.hsv_to_rgb(augment.rgb_to_hsv(x)), x, atol=1e-12)


def test_grayscale_makes_three_equal_channels():
    (v,) = augment.views(_images(3, 8, 8), Policy(p_gray=1.0), 8, torch.Generator().manual_seed(0), count=1)
    assert torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 1], v[:, 2])


def test_resized_crop_boxes_follow_torchvision():
    """Boxes inside the image with the drawn area fraction and aspect ratio (up to the rounding of
    their sides); when no try fits, the largest central box with the ratio clamped into range."""
    policy = POLICIES["amdim-stl"]
    n, h, w = 3000, 96, 96
    top, left, ch, cw = augment.resized_crop_boxes(n, h, w, policy, torch.Generator().manual_seed(0)).unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + ch <= h) & (left + cw <= w)).all())
    area = ch * cw / (h * w)
    assert float(area.min()) > 0.3 * 0.95 and float(area.max()) <= 1.0
    ratio = cw / ch
    assert float(ratio.min()) > 0.7 * 0.97 and float(ratio.max()) < 1.4 * 1.03
    assert float(((ch == h) & (cw == w)).float().mean()) < 0.02      # a full crop is rare, not a clamp
    wide = Policy(crop="resized", scale=(0.95, 1.0), ratio=(3.0, 4.0))
    boxes = augment.resized_crop_boxes(50, 96, 96, wide, torch.Generator().manual_seed(1))
    assert torch.equal(boxes, torch.tensor([[32.0, 0.0, 32.0, 96.0]]).expand(50, 4))   # 96 / 3 = 32 rows


def test_crop_resize_samples_the_box():
    x = augment.to_float(_images(2, 16, 16, seed=2))
    whole = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    no_flip = torch.zeros(2, dtype=torch.bool)
    assert torch.allclose(augment.crop_resize(x, whole, no_flip, 16, "bilinear"), x, atol=1e-5)
    quarter = torch.tensor([[8.0, 0.0, 8.0, 8.0]] * 2)                  # bottom-left 8 x 8
    assert torch.allclose(augment.crop_resize(x, quarter, no_flip, 8, "bicubic"), x[:, :, 8:, :8], atol=1e-5)
    flip = torch.ones(2, dtype=torch.bool)
    assert torch.allclose(augment.crop_resize(x, quarter, flip, 8, "bilinear"), x[:, :, 8:, :8].flip(-1), atol=1e-5)


def test_eval_view_resizes_the_shorter_side_and_crops_the_centre():
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    got = augment.eval_view(x, POLICIES["amdim-stl"], 64)          # Resize(70), CenterCrop(64)
    want = F.interpolate(x, size=(70, 70), mode="bilinear", align_corners=False, antialias=True)[..., 3:67, 3:67]
    assert torch.allclose(got, want)
    wide = torch.rand(1, 3, 40, 80)
    assert augment.eval_view(wide, POLICIES["none"], 32).shape == (1, 3, 32, 32)
    assert torch.equal(augment.eval_view(x[..., :32, :32], POLICIES["amdim-cifar"], 32), x[..., :32, :32])


@pytest.mark.parametrize("name", ["amdim-cifar", "amdim-stl"])
def test_rank_slices_equal_the_global_batch(name):
    """K ranks each augmenting their rows draw exactly what one process draws for the batch."""
    imgs = _images(6, 40, 40)
    whole = augment.views(imgs, POLICIES[name], 32, torch.Generator().manual_seed(3))
    for rank in range(2):
        part = augment.views(imgs[rank * 3:(rank + 1) * 3], POLICIES[name], 32, torch.Generator().manual_seed(3),
                             rank, 2)
        for v_whole, v_part in zip(whole, part):
            assert torch.allclose(v_whole[rank * 3:(rank + 1) * 3], v_part, atol=1e-6)


def test_to_float_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        augment.to_float(torch.zeros(1, 3, 4, 4))


def test_images_of_their_own_sizes():
    """A folder's images keep their sizes: resized crops are drawn inside each image from its own
    height and width, translations and plain views start from each one's evaluation view; a rank's
    rows still draw what one process draws for the global batch."""
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 60), (50, 50), (70, 35), (33, 90)]
    imgs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    for name in ("amdim-imagenet", "amdim-cifar", "none"):
        whole = augment.views(imgs, POLICIES[name], 32, torch.Generator().manual_seed(1))
        assert whole[0].shape == (4, 3, 32, 32)
        for rank in range(2):
            part = augment.views(imgs[2 * rank:2 * rank + 2], POLICIES[name], 32,
                                 torch.Generator().manual_seed(1), rank, 2)
            assert torch.allclose(part[0], whole[0][2 * rank:2 * rank + 2], atol=1e-6), name
    plain = augment.eval_view(augment.as_float(imgs, "cpu"), POLICIES["amdim-imagenet"], 32)
    for i, im in enumerate(imgs):
        assert torch.equal(plain[i:i + 1], augment.eval_view(augment.to_float(im[None]), POLICIES["amdim-imagenet"], 32))
    h = torch.tensor([s[0] for s in sizes] * 250, dtype=torch.float32)
    w = torch.tensor([s[1] for s in sizes] * 250, dtype=torch.float32)
    top, left, ch, cw = augment.resized_crop_boxes(1000, h, w, POLICIES["amdim-imagenet"],
                                                   torch.Generator().manual_seed(2)).unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + ch <= h) & (left + cw <= w) & (ch >= 1) & (cw >= 1)).all())
    assert float((ch * cw / (h * w)).min()) > 0.25
