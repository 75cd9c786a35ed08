"""Tests for data/autoaugment.py (CIFAR-10 AutoAugment, Cutout, random rotation on uint8 tensors)
and the two-view TrainLoader.

Every op is compared with the Pillow function the reference (DeepVoltaire CIFAR10Policy) calls, on
smooth random "CIFAR-like" images, upsampled sklearn digits and a few edge-case images. Measured
agreement with the installed Pillow: EXACT (every pixel) for all 14 ops, the 90°-multiple rotations
and torchvision's RandomRotation-on-PIL; the tests assert exact equality.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import data
from data import autoaugment as A
from data.augment import random_crop_flip

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FILL3 = (128, 128, 128)


def smooth_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """CIFAR-like uint8 images: random 6×6 colour fields upsampled bicubically, plus mild noise
    (values reach 0 and 255 through the overshoot, so clipping paths are exercised too)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g) * 1.2 - 0.1
    up = F.interpolate(low, size=size, mode="bicubic", align_corners=False)
    up = up + 0.04 * torch.randn(n, 3, size, size, generator=g)
    return (up.clamp(0, 1) * 255).round().to(torch.uint8)


def edge_images() -> torch.Tensor:
    """Constant, two-level, few-level and one-odd-pixel images (degenerate histograms)."""
    x = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    x[0] = 77  # constant
    x[1, :, :16] = 200  # two levels
    x[2] = (torch.arange(32 * 32).view(32, 32) % 3 * 40 + 100).to(torch.uint8)  # three levels
    x[3] = 255
    x[3, :, 5, 7] = 0  # one odd pixel: equalize's step is large, its LUT overflows 255
    x[4, 0], x[4, 1], x[4, 2] = 10, 128, 250  # a flat colour
    x[5] = torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(9))
    return x


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    digits, _ = data.DATASETS["digits"]("test", "data", False)  # grey, mostly 0 with strokes
    return torch.cat([smooth_images(40), digits[:16], edge_images()])


def to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).numpy(), "RGB")


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def pil_map(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply fn(pil_image, k) to every image k of x, back to a uint8 tensor."""
    return torch.stack([from_pil(fn(to_pil(x[k]), k)) for k in range(len(x))])


def rotate_with_fill(img: Image.Image, degrees: float) -> Image.Image:
    """The reference's rotate: RGBA rotate (nearest), composited onto (128,128,128,128)."""
    rot = img.convert("RGBA").rotate(degrees)
    grey = Image.new("RGBA", rot.size, (128,) * 4)
    return Image.composite(rot, grey, rot).convert(img.mode)


def factors(n: int, seed: int = 1) -> torch.Tensor:
    """Enhance factors covering the policy's range 1 ± 0.9 (both blend branches of Pillow)."""
    g = torch.Generator().manual_seed(seed)
    f = 1 + (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 0.9
    f[:4] = torch.tensor([0.1, 1.0, 1.9, 0.0], dtype=torch.float64)
    return f


# ---------------------------------------------------------------------------------------------
# policy table


def test_policy_table_and_magnitudes():
    assert len(A.CIFAR10_POLICY) == 25
    for op1, p1, m1, op2, p2, m2 in A.CIFAR10_POLICY:
        assert op1 in A.OPS and op2 in A.OPS and 0 <= p1 <= 1 and 0 <= p2 <= 1
        assert 0 <= m1 <= 9 and 0 <= m2 <= 9
    # the same 25 rows as torchvision's transcription of the paper's CIFAR-10 policy
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    names = {"ShearX": "shear_x", "ShearY": "shear_y", "TranslateX": "translate_x",
             "TranslateY": "translate_y", "AutoContrast": "autocontrast"}
    tv = AutoAugment(AutoAugmentPolicy.CIFAR10).policies
    assert len(tv) == 25
    for ours, theirs in zip(A.CIFAR10_POLICY, tv, strict=True):
        for k, (name, p, mag) in enumerate(theirs):
            assert ours[3 * k] == names.get(name, name.lower()) and ours[3 * k + 1] == p
            assert mag is None or ours[3 * k + 2] == mag
    m = A.MAGNITUDES
    assert m["posterize"].tolist() == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert m["solarize"][0] == 256 and m["solarize"][9] == 0
    assert m["translate_x"][9] == 150 / 331 and m["shear_y"][9] == 0.3
    assert m["rotate"][2] == 30 * 2 / 9
    assert m["contrast"][9] == 0.9 and m["color"][0] == 0


# ---------------------------------------------------------------------------------------------
# ops against Pillow


PHOTOMETRIC = {
    "color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
    "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness,
}


@pytest.mark.parametrize("name", sorted(PHOTOMETRIC))
def test_enhance_ops_equal_pillow_exactly(images, name):
    f = factors(len(images))
    ours = getattr(A, name)(images, f)
    want = pil_map(images, lambda im, k: PHOTOMETRIC[name](im).enhance(float(f[k])))
    assert ours.dtype == torch.uint8 and ours.shape == images.shape
    assert torch.equal(ours, want)
    assert torch.equal(getattr(A, name)(images, 1.0), images)  # factor 1 = identity


def test_imageops_equal_pillow_exactly(images):
    for bits in range(1, 9):
        assert torch.equal(A.posterize(images, bits),
                           pil_map(images, lambda im, k: ImageOps.posterize(im, bits)))
    for t in [*A.MAGNITUDES["solarize"].tolist(), 128, 127.5]:
        assert torch.equal(A.solarize(images, t),
                           pil_map(images, lambda im, k: ImageOps.solarize(im, t)))
    assert torch.equal(A.invert(images), pil_map(images, lambda im, k: ImageOps.invert(im)))
    assert torch.equal(A.autocontrast(images),
                       pil_map(images, lambda im, k: ImageOps.autocontrast(im)))
    assert torch.equal(A.equalize(images), pil_map(images, lambda im, k: ImageOps.equalize(im)))
    # per-sample arguments and identities
    bits = torch.arange(len(images)) % 8 + 1
    assert torch.equal(A.posterize(images, bits),
                       pil_map(images, lambda im, k: ImageOps.posterize(im, int(bits[k]))))
    assert torch.equal(A.posterize(images, 8), images)
    assert torch.equal(A.solarize(images, 256.0), images)
    with pytest.raises(ValueError, match="bits"):
        A.posterize(images, 0)


def test_geometric_ops_equal_pillow_exactly(images):
    n = len(images)
    g = torch.Generator().manual_seed(4)
    shear = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 0.3
    shift = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 150 / 331 * 32
    deg = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 30
    deg[:6] = torch.tensor([0.0, 90.0, 180.0, 270.0, -90.0, 30 * 2 / 9])
    cases = [
        (A.shear_x(images, shear), lambda im, k: im.transform(
            im.size, Image.AFFINE, (1, float(shear[k]), 0, 0, 1, 0), Image.BICUBIC,
            fillcolor=FILL3)),
        (A.shear_y(images, shear), lambda im, k: im.transform(
            im.size, Image.AFFINE, (1, 0, 0, float(shear[k]), 1, 0), Image.BICUBIC,
            fillcolor=FILL3)),
        (A.translate_x(images, shift), lambda im, k: im.transform(
            im.size, Image.AFFINE, (1, 0, float(shift[k]), 0, 1, 0), fillcolor=FILL3)),
        (A.translate_y(images, shift), lambda im, k: im.transform(
            im.size, Image.AFFINE, (1, 0, 0, 0, 1, float(shift[k])), fillcolor=FILL3)),
        (A.rotate(images, deg), lambda im, k: rotate_with_fill(im, float(deg[k]))),
    ]
    for ours, fn in cases:
        assert ours.dtype == torch.uint8 and ours.shape == images.shape
        assert torch.equal(ours, pil_map(images, fn))
    # the policy's own magnitudes (max shear/translation) and both signs
    for sgn in (-1, 1):
        m = float(A.MAGNITUDES["shear_x"][9]) * sgn
        assert torch.equal(A.shear_x(images, m), pil_map(images, lambda im, k: im.transform(
            im.size, Image.AFFINE, (1, m, 0, 0, 1, 0), Image.BICUBIC, fillcolor=FILL3)))
        c = float(A.MAGNITUDES["translate_y"][9]) * 32 * sgn
        assert torch.equal(A.translate_y(images, c), pil_map(images, lambda im, k: im.transform(
            im.size, Image.AFFINE, (1, 0, 0, 0, 1, c), fillcolor=FILL3)))
    # magnitude 0 = identity; 90° steps on a square image are exact permutations
    for op in (A.shear_x, A.shear_y, A.translate_x, A.translate_y, A.rotate):
        assert torch.equal(op(images, 0.0), images)
    assert torch.equal(A.rotate(images, 90.0), images.rot90(1, (2, 3)))
    # translation by 14.5 px = 15 whole pixels with PIL's nearest sampling, grey fill
    t = A.translate_x(images, 150 / 331 * 32)
    assert torch.equal(t[..., :17], images[..., 15:]) and (t[..., 17:] == 128).all()


def test_random_rotate_matches_torchvision_random_rotation_on_pil(images):
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(3)
    out = A.random_rotate(images, g, degrees=15.0)
    angles = (torch.rand(len(images), generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64) * 2 - 1) * 15
    assert angles.abs().max() <= 15 and angles.min() < -10 and angles.max() > 10
    want = pil_map(images, lambda im, k: TF.rotate(im, float(angles[k]), fill=0))  # RandomRotation
    assert torch.equal(out, want)
    assert out.shape == images.shape and out.dtype == torch.uint8
    # corners are filled with 0 on white images when the angle is not tiny
    white = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    rot = A.random_rotate(white, torch.Generator().manual_seed(0))
    corner = rot[:, :, 0, 0] == 0
    assert corner.float().mean() > 0.7 and (rot[:, :, 16, 16] == 255).all()
    assert not torch.equal(rot, A.random_rotate(white, torch.Generator().manual_seed(1)))
    assert torch.equal(rot, A.random_rotate(white, torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------------
# the policy


def _recording_ops(monkeypatch):
    """Replace every op by a marker: pixel (0, 0, col=op index) gets the application order (1, 2),
    pixel (1, 0, 0) counts applications; calls are recorded as (name, args)."""
    calls = []

    def make(i, name):
        def op(x, *args, **kwargs):
            calls.append((name, args[0].clone() if args else None, kwargs))
            y = x.clone()
            y[:, 1, 0, 0] += 1
            y[:, 0, 0, i] = y[:, 1, 0, 0]
            return y
        return op

    for i, name in enumerate(A._OP_NAMES):
        monkeypatch.setitem(A.OPS, name, make(i, name))
    return calls


def test_policy_applies_each_sub_policy_with_its_probabilities(monkeypatch):
    n = 4000
    which, u, sign = A.cifar10_policy_params(n, torch.Generator().manual_seed(0))
    calls = _recording_ops(monkeypatch)
    x = torch.zeros(n, 3, 2, 16, dtype=torch.uint8)
    out = A.apply_cifar10_policy(x, which, u, sign)
    names = A._OP_NAMES
    for k in range(n):
        op1, p1, _, op2, p2, _ = A.CIFAR10_POLICY[int(which[k])]
        a1, a2 = bool(u[k, 0] < p1), bool(u[k, 1] < p2)
        assert int(out[k, 1, 0, 0]) == a1 + a2
        if op1 != op2:
            assert int(out[k, 0, 0, names.index(op1)]) == (1 if a1 else 0)
            assert int(out[k, 0, 0, names.index(op2)]) == ((1 + a1) if a2 else 0)
        assert int((out[k, 0, 0] > 0).sum()) == len({o for o, a in ((op1, a1), (op2, a2)) if a})
    # arguments: table magnitude, random sign where DeepVoltaire draws one, none for rotate
    seen = {}
    for name, arg, kwargs in calls:
        seen.setdefault(name, []).append(arg)
        assert ("fill" in kwargs) == (name in ("shear_x", "shear_y", "translate_x", "translate_y",
                                               "rotate"))
    assert set(seen) == {row[0] for row in A.CIFAR10_POLICY} | {row[3] for row in A.CIFAR10_POLICY}
    assert torch.cat(seen["rotate"]).unique().tolist() == [30 * 2 / 9]  # always counter-clockwise
    # translate_x scales by the width (16 here), translate_y by the height (2)
    tx = torch.cat(seen["translate_x"]).abs().unique()
    assert torch.allclose(tx, torch.tensor([150 / 331 * 16 * 8 / 9, 150 / 331 * 16],
                                           dtype=torch.float64))
    ty = torch.cat(seen["translate_y"]).abs().unique()
    assert torch.allclose(ty, torch.tensor([150 / 331 * 2 * 3 / 9, 150 / 331 * 2],
                                           dtype=torch.float64))
    for name in ("translate_y", "shear_y", "color", "brightness", "sharpness", "contrast"):
        v = torch.cat(seen[name])
        centred = v if name in ("translate_y", "shear_y") else v - 1
        assert (centred > 0).any() and (centred < 0).any()  # both signs occur
    assert set(torch.cat(seen["posterize"]).tolist()) == {5}  # index 7 -> 5 bits
    assert set(seen["equalize"]) == set(seen["invert"]) == {None}
    # statistics: sub-policies uniform, op j applied with probability p_j
    which, u, _ = A.cifar10_policy_params(50000, torch.Generator().manual_seed(1))
    counts = torch.bincount(which, minlength=25)
    assert len(counts) == 25 and counts.min() > 1800 and counts.max() < 2200  # mean 2000, sd 44
    for s, row in enumerate(A.CIFAR10_POLICY):
        for j in range(2):
            p = row[3 * j + 1]
            rate = (u[which == s, j] < p).double().mean().item()
            sd = max((p * (1 - p) / counts[s].item()) ** 0.5, 1e-9)
            assert abs(rate - p) < 5 * sd + 1e-12, (s, j, rate, p)


def test_policy_output_reproducible_and_random():
    x = smooth_images(256, seed=5)
    a = A.cifar10_policy(x, torch.Generator().manual_seed(0))
    b = A.cifar10_policy(x, torch.Generator().manual_seed(0))
    c = A.cifar10_policy(x, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != x).flatten(1).any(1).float().mean().item()
    # P(image untouched) = mean over sub-policies of (1-p1)(1-p2) ~ 0.21 (+ no-op applications)
    assert 0.6 < changed < 0.9
    g = torch.Generator().manual_seed(0)
    params = A.cifar10_policy_params(len(x), g)
    assert torch.equal(a, A.apply_cifar10_policy(x, *params))
    with pytest.raises(TypeError, match="uint8"):
        A.cifar10_policy(x.float(), g)


def test_policy_matches_pillow_reference_per_image():
    """Each image equals the DeepVoltaire sub-policy applied in PIL with the same draws."""
    x = smooth_images(200, seed=2)
    which, u, sign = A.cifar10_policy_params(len(x), torch.Generator().manual_seed(7))
    ours = A.apply_cifar10_policy(x, which, u, sign)

    def pil_op(im, name, mag, s):
        if name == "shear_x":
            return im.transform(im.size, Image.AFFINE, (1, mag * s, 0, 0, 1, 0), Image.BICUBIC,
                                fillcolor=FILL3)
        if name == "shear_y":
            return im.transform(im.size, Image.AFFINE, (1, 0, 0, mag * s, 1, 0), Image.BICUBIC,
                                fillcolor=FILL3)
        if name == "translate_x":
            return im.transform(im.size, Image.AFFINE, (1, 0, mag * im.size[0] * s, 0, 1, 0),
                                fillcolor=FILL3)
        if name == "translate_y":
            return im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, mag * im.size[1] * s),
                                fillcolor=FILL3)
        if name == "rotate":
            return rotate_with_fill(im, mag)
        if name in PHOTOMETRIC:
            return PHOTOMETRIC[name](im).enhance(1 + mag * s)
        if name == "posterize":
            return ImageOps.posterize(im, int(mag))
        if name == "solarize":
            return ImageOps.solarize(im, mag)
        return getattr(ImageOps, name)(im)

    def reference(im, k):
        row = A.CIFAR10_POLICY[int(which[k])]
        for j in range(2):
            name, p, idx = row[3 * j:3 * j + 3]
            if u[k, j] < p:
                im = pil_op(im, name, A.MAGNITUDES[name][idx].item(), int(sign[k, j]))
        return im

    assert torch.equal(ours, pil_map(x, reference))


# ---------------------------------------------------------------------------------------------
# Cutout


def test_cutout_zeroes_one_clipped_square():
    n = 400
    x = torch.full((n, 3, 32, 32), 200, dtype=torch.uint8)
    out = data.cutout(x, torch.Generator().manual_seed(0), length=16)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, data.cutout(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, data.cutout(x, torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(0)
    cy, cx = torch.randint(0, 32, (n,), generator=g), torch.randint(0, 32, (n,), generator=g)
    hole = out[:, 0] == 0
    assert torch.equal(hole, (out == 0).all(1)) and ((out == 0) | (out == 200)).all()
    sides = []
    for k in range(n):
        rows, cols = hole[k].any(1).nonzero().flatten(), hole[k].any(0).nonzero().flatten()
        y0, y1 = max(int(cy[k]) - 8, 0), min(int(cy[k]) + 8, 32)
        x0, x1 = max(int(cx[k]) - 8, 0), min(int(cx[k]) + 8, 32)
        assert rows.tolist() == list(range(y0, y1)) and cols.tolist() == list(range(x0, x1))
        assert int(hole[k].sum()) == len(rows) * len(cols)  # a full rectangle
        sides.append((len(rows), len(cols)))
    sides = torch.tensor(sides)
    assert sides.max() == 16 and sides.min() >= 8  # the centre is inside: at least half a side
    assert (sides == 16).all(1).any() and (sides < 16).any()  # clipped at borders sometimes
    small = data.cutout(x[:50], torch.Generator().manual_seed(0), length=4)
    assert ((small == 0).all(1).flatten(1).sum(1) <= 16).all()


# ---------------------------------------------------------------------------------------------
# TrainLoader with a second view


def _constant_set(n):
    """Image k is filled with k + 1 (never 0, so zero pixels reveal padding and holes)."""
    x = (torch.arange(n) + 1).to(torch.uint8)[:, None, None, None].expand(n, 3, 32, 32)
    return x.contiguous(), torch.arange(n)


@pytest.mark.parametrize("augment,second", [("crop_flip", "autoaugment"), ("crop_flip", "cutout"),
                                            ("crop_flip_rotate", "autoaugment"),
                                            ("none", "cutout"), ("crop_flip_rotate", None)])
def test_two_view_loader_batches_are_the_documented_draws(augment, second):
    x = smooth_images(37, seed=3)
    y = torch.arange(37) % 10
    loader = data.TrainLoader(x, y, 16, generator=torch.Generator().manual_seed(0),
                              augment=augment, second_view=second)
    assert loader.views == (1 if second is None else 2) and len(loader) == 3
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    # augmentation draws: a generator of their own, seeded from (run seed, epoch 1, rank 0)
    g = torch.Generator().manual_seed(data.derived_seed(0, 1, 0))
    for b, (xb, yb) in enumerate(loader):
        idx = perm[16 * b:16 * (b + 1)]
        basic = x[idx]
        if augment != "none":
            basic = random_crop_flip(basic, g)
        if augment == "crop_flip_rotate":
            basic = data.random_rotate(basic, g, 15.0)
        want = basic
        if second == "autoaugment":
            want = torch.cat([basic, data.cifar10_policy(random_crop_flip(x[idx], g), g)])
        elif second == "cutout":
            want = torch.cat([basic, data.cutout(random_crop_flip(x[idx], g), g, 16)])
        assert xb.dtype == torch.float32 and xb.shape == (len(want), 3, 32, 32)
        assert torch.equal(xb, data.to_float(want))
        assert torch.equal(yb, y[idx].repeat(loader.views))


def test_two_view_loader_pairs_views_of_the_same_images():
    x, y = _constant_set(50)
    for second in ("cutout", "autoaugment"):
        loader = data.TrainLoader(x, y, 16, generator=torch.Generator().manual_seed(1),
                                  augment="none", second_view=second)
        sizes = []
        for xb, yb in loader:
            b = len(xb) // 2
            sizes.append(b)
            assert torch.equal(yb[:b], yb[b:])
            assert torch.equal((xb[:b] * 255).round(), (yb[:b] + 1).float()[:, None, None, None]
                               .expand(-1, 3, 32, 32))  # basic view = the raw images
            if second == "cutout":  # outside padding and the hole, the views agree
                v2 = (xb[b:] * 255).round()
                keep = v2 != 0
                assert torch.equal(v2[keep], (xb[:b] * 255).round()[keep])
                assert (~keep).flatten(1).any(1).all()  # every image lost some pixels
        assert sizes == [16, 16, 16, 2]
    # the first batch's basic half is exactly what a single-view loader gives
    xs = smooth_images(40, seed=4)
    two = next(iter(data.TrainLoader(xs, torch.arange(40), 8, second_view="autoaugment",
                                     generator=torch.Generator().manual_seed(2))))
    one = next(iter(data.TrainLoader(xs, torch.arange(40), 8,
                                     generator=torch.Generator().manual_seed(2))))
    assert torch.equal(two[0][:8], one[0]) and torch.equal(two[1][:8], one[1])


def test_two_view_loader_resume_is_exact():
    x = smooth_images(30, seed=6)
    y = torch.randint(0, 10, (30,))
    run = data.TrainLoader(x, y, 8, generator=torch.Generator().manual_seed(0),
                           augment="crop_flip_rotate", second_view="autoaugment")
    list(run)
    state = pickle.loads(pickle.dumps(run.state_dict()))
    epoch2 = list(run)
    resumed = data.TrainLoader(x, y, 8, generator=torch.Generator().manual_seed(123),
                               augment="crop_flip_rotate", second_view="autoaugment")
    resumed.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(epoch2, resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_option_errors():
    x, y = _constant_set(4)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"valid: None, autoaugment, cutout"):
        data.TrainLoader(x, y, 2, generator=g, second_view="autoaug")
    with pytest.raises(ValueError, match=r"valid: crop_flip, crop_flip_rotate, none"):
        data.TrainLoader(x, y, 2, generator=g, augment="rotate")
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        A.cutout(x, _CudaGenerator())
    assert data.AUGMENTATIONS == ("crop_flip", "crop_flip_rotate", "none")
    assert data.SECOND_VIEWS == ("autoaugment", "cutout")


class _CudaGenerator:
    """Stands in for a CUDA generator (only .device is looked at before refusing it)."""
    device = torch.device("cuda")


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.cuda
@CUDA
def test_augmentations_same_on_cpu_and_gpu():
    x = torch.cat([smooth_images(256, seed=8), edge_images()])
    for fn in (A.cifar10_policy, A.cutout, A.random_rotate):
        a = fn(x, torch.Generator().manual_seed(3))
        b = fn(x.cuda(), torch.Generator().manual_seed(3))
        assert b.is_cuda and torch.equal(a, b.cpu()), fn.__name__
    n = len(x)
    g = torch.Generator().manual_seed(0)
    shear = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 0.3
    f = factors(n)
    for op, arg in ((A.shear_x, shear), (A.shear_y, shear), (A.color, f), (A.contrast, f),
                    (A.sharpness, f), (A.brightness, f)):
        assert torch.equal(op(x, arg), op(x.cuda(), arg).cpu()), op.__name__
    for op in (A.equalize, A.autocontrast):
        assert torch.equal(op(x), op(x.cuda()).cpu()), op.__name__
