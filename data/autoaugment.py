"""CIFAR-10 AutoAugment, Cutout and random rotation on uint8 image batches, on the batch's device.

Why this module exists
----------------------
The reference (DKL `--aug autoaug`, see docs/reference.md#two-views) builds its second view with
crop + flip + `CIFAR10Policy()` from DeepVoltaire/AutoAugment: per image, in PIL, in 12 DataLoader
workers. Here the uint8 training set lives on the training device (data/loader.py), so the policy
is re-implemented on N×3×H×W uint8 tensors: every random number comes from the caller's CPU
torch.Generator (so CPU and GPU runs draw the same numbers, and a generator state resumes a run),
and every op runs vectorised over the samples that use it — at most 14 op calls per policy stage,
no per-image Python loop. `cutout` is the uoguelph-mlrg Cutout the reference's `--aug cutout` uses;
`random_rotate` is torchvision's `RandomRotation(15)` as used in the DM-Improves-AT CIFAR-100 "base"
augmentation (docs/reference.md#generated-data).

Sources
-------
* Policy table and magnitude conventions: DeepVoltaire/AutoAugment `autoaugment.py`
  (`CIFAR10Policy`, `SubPolicy`), which transcribes the CIFAR-10 policy of Cubuk et al.,
  "AutoAugment: Learning Augmentation Policies from Data", CVPR 2019 (arXiv:1805.09501, appendix
  table of the policy found on reduced CIFAR-10). The 25 (op1, p1, mag1, op2, p2, mag2) rows of
  `CIFAR10_POLICY` are that list; torchvision's `AutoAugmentPolicy.CIFAR10` has the same 25 rows
  (checked in tests/test_autoaugment.py).
* Op semantics: Pillow (checked against the installed Pillow 13.0 in tests/test_autoaugment.py):
  `Image.transform(AFFINE)` (generic bicubic path, the 16.16 fixed-point nearest path used by
  `rotate`, the scale path used for translations), `ImageEnhance.{Color,Contrast,Brightness,
  Sharpness}` (= `Image.blend` in float32 with truncation, `convert("L")` with the L24 fixed-point
  weights, SMOOTH 3×3 kernel that leaves the 1-pixel border unfiltered), `ImageOps.{posterize,
  solarize,invert,autocontrast,equalize}` (per channel for RGB).

DeepVoltaire conventions kept: one of the 25 sub-policies uniformly per image; op k applied iff
`U(0,1) < p_k`; magnitude index 0..9 into `linspace` tables (shear 0..0.3, translate 0..150/331 of
the image width (x) / height (y), rotate 0..30°, colour/contrast/sharpness/brightness factor
1 ± (0..0.9), posterize round(linspace(8, 4)) bits, solarize threshold linspace(256, 0)); a random
sign per application for shear, translate and the four enhance factors, but NONE for rotate (always
counter-clockwise, as in DeepVoltaire); fill colour (128, 128, 128) for shear/translate/rotate;
shear_x maps output (x, y) to input (x + m·y, y) with the origin at the top-left pixel corner (PIL's
affine convention, not centred), translate_x by c maps output x to input x + c (c > 0 moves the
content left).

Known differences from the PIL reference
----------------------------------------
Measured by tests/test_autoaugment.py on smooth random "CIFAR-like" images and upsampled digits:
every op is bit-identical to Pillow 13.0 on the CPU — photometric ops, shear (bicubic), translate
(nearest), rotate (nearest, fixed point) — within the magnitudes the policy uses. Remaining,
deliberate or unavoidable differences:
1. Random stream: numbers come from a torch.Generator in a fixed per-batch order (sub-policy index,
   two uniforms, two signs per image), not from Python's `random` per image, so the same seed does
   not give the same images as the reference; the distribution is the same.
2. Floating point: shear is evaluated in float64 with Pillow's operation order and blends in float32
   with Pillow's order (one rounding per multiply and per add, as separate torch ops, so no fused
   multiply-add); rotation uses Pillow's coefficients (cos/sin rounded to 15 decimals, computed with
   Python's math per image) and its 16.16 fixed point. Hence bit-identical on the CPU. The CUDA
   path runs the same elementwise IEEE operations (one torch op per arithmetic step, so nothing is
   fused; divisions are tensor/tensor, because CUDA turns a division by a Python scalar into a
   multiplication by its reciprocal); a CPU/GPU equality test is included but skips without a GPU.
   If a GPU ever disagreed, it could only be by one grey level, at a pixel whose value lies within
   rounding error of a truncation boundary.
3. Rotation by multiples of 90°: Pillow takes a transpose shortcut; here the fixed-point path is
   used for every angle, which gives the same pixels on these square images (tested).
4. Pillow version: this module follows Pillow 13.0 (installed here: RGB->L with the L24 fixed-point
   weights, SMOOTH rounded half up, equalize step = (N - h[last]) // 255, blend in float32). The
   reference's Pillow version is not pinned; other Pillow releases have changed such rounding
   details, so against an older Pillow the enhance ops may differ by ±1 grey level on some pixels
   (not measured).
5. Scope: RGB uint8 batches (N×3×H×W, any H and W, shared by the batch); rotation about the
   centre without `expand`. The reference's RGBA-rotate-and-composite trick is reproduced as
   "outside pixels become the fill", which is what it amounts to with nearest resampling.
6. Cutout / RandomRotation: same distributions as the uoguelph-mlrg Cutout (numpy draws) and
   torchvision's RandomRotation (float32 angle draw; here float64), from the torch generator.

Why not torchvision's `AutoAugment(AutoAugmentPolicy.CIFAR10)`
-------------------------------------------------------------
It has the same 25 sub-policies and the same op names, but not the same ops as the DeepVoltaire code
the reference ran: (a) shear is resampled with nearest neighbour (its `interpolation` default), not
bicubic (its matrix, built from the shear angle atan(m), is the same up to rounding); (b)
translations are truncated to whole pixels (int(14.5) = 14 at magnitude 9, where PIL's nearest
sampling shifts by 15); (c) rotation gets a random sign (DeepVoltaire always rotates
counter-clockwise); (d) solarize thresholds are linspace(255, 0) instead of linspace(256, 0)
(differs at magnitudes 2 and 3, which the policy uses: pixels 199 and 170 are inverted by
torchvision, kept by DeepVoltaire); (e) the fill is 0 (black)
unless `fill` is set. On PIL images its photometric ops call the same Pillow functions, so they
agree (solarize thresholds aside). On uint8 *tensors* (the GPU path one would use) its brightness,
posterize, invert, autocontrast and equalize give Pillow's pixels exactly (measured on 64 smooth
random images), but colour, contrast and sharpness differ by ±1 grey level on 5-58 % of the pixels
(float greyscale 0.2989/0.587/0.114 truncated instead of the rounded L24 grey, unrounded contrast
mean, blends computed as r·a + (1-r)·b instead of Pillow's b + r·(a-b)). It also processes one image
per call, so a batch needs a Python loop over images.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .augment import upload

FILL = 128  # DeepVoltaire's fillcolor (128, 128, 128)

# ---------------------------------------------------------------------------------------------
# Policy table: (op1, p1, magnitude index 1, op2, p2, magnitude index 2), DeepVoltaire order.

CIFAR10_POLICY: tuple[tuple[str, float, int, str, float, int], ...] = (
    ("invert", 0.1, 7, "contrast", 0.2, 6),
    ("rotate", 0.7, 2, "translate_x", 0.3, 9),
    ("sharpness", 0.8, 1, "sharpness", 0.9, 3),
    ("shear_y", 0.5, 8, "translate_y", 0.7, 9),
    ("autocontrast", 0.5, 8, "equalize", 0.9, 2),
    ("shear_y", 0.2, 7, "posterize", 0.3, 7),
    ("color", 0.4, 3, "brightness", 0.6, 7),
    ("sharpness", 0.3, 9, "brightness", 0.7, 9),
    ("equalize", 0.6, 5, "equalize", 0.5, 1),
    ("contrast", 0.6, 7, "sharpness", 0.6, 5),
    ("color", 0.7, 7, "translate_x", 0.5, 8),
    ("equalize", 0.3, 7, "autocontrast", 0.4, 8),
    ("translate_y", 0.4, 3, "sharpness", 0.2, 6),
    ("brightness", 0.9, 6, "color", 0.2, 8),
    ("solarize", 0.5, 2, "invert", 0.0, 3),
    ("equalize", 0.2, 0, "autocontrast", 0.6, 0),
    ("equalize", 0.2, 8, "equalize", 0.6, 4),
    ("color", 0.9, 9, "equalize", 0.6, 6),
    ("autocontrast", 0.8, 4, "solarize", 0.2, 8),
    ("brightness", 0.1, 3, "color", 0.7, 0),
    ("solarize", 0.4, 5, "autocontrast", 0.9, 3),
    ("translate_y", 0.9, 9, "translate_y", 0.7, 9),
    ("autocontrast", 0.9, 2, "solarize", 0.8, 3),
    ("equalize", 0.8, 8, "invert", 0.1, 3),
    ("translate_y", 0.7, 9, "autocontrast", 0.9, 1),
)

# Magnitude tables, computed with numpy.linspace exactly as DeepVoltaire does (same float64 values).
_ENHANCE = np.linspace(0.0, 0.9, 10)
MAGNITUDES: dict[str, np.ndarray] = {
    "shear_x": np.linspace(0, 0.3, 10),
    "shear_y": np.linspace(0, 0.3, 10),
    "translate_x": np.linspace(0, 150 / 331, 10),  # fraction of the image width
    "translate_y": np.linspace(0, 150 / 331, 10),  # fraction of the image height
    "rotate": np.linspace(0, 30, 10),  # degrees, counter-clockwise, no random sign
    "color": _ENHANCE,
    "posterize": np.round(np.linspace(8, 4, 10), 0).astype(np.int64),  # bits kept
    "solarize": np.linspace(256, 0, 10),  # pixels >= threshold are inverted
    "contrast": _ENHANCE,
    "sharpness": _ENHANCE,
    "brightness": _ENHANCE,
    "autocontrast": np.zeros(10),
    "equalize": np.zeros(10),
    "invert": np.zeros(10),
}
SIGNED = frozenset({"shear_x", "shear_y", "translate_x", "translate_y", "color", "contrast",
                    "sharpness", "brightness"})

# ---------------------------------------------------------------------------------------------
# helpers


def _check(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise TypeError(f"expected uint8 N×C×H×W images, got {x.dtype} {tuple(x.shape)}")


def _per_sample(v: float | torch.Tensor, n: int, dtype: torch.dtype = torch.float64
                ) -> torch.Tensor:
    """A scalar or length-n parameter as a length-n CPU tensor (parameters are tiny)."""
    t = torch.as_tensor(v, dtype=dtype).cpu()
    if t.dim() == 0:
        return t.expand(n).clone()
    if t.shape != (n,):
        raise ValueError(f"expected a scalar or {n} per-sample values, got shape {tuple(t.shape)}")
    return t


def _view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (n,) tensor on x's device, shaped n×1×1×1 for broadcasting."""
    return upload(t, x.device).view(-1, 1, 1, 1)


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[k, c, i, j] = x[k, c, rows[k, i, j], cols[k, i, j]] (indices already in range)."""
    n, c, h, w = x.shape
    flat = (rows * w + cols).view(n, 1, -1).expand(n, c, -1)
    return x.reshape(n, c, h * w).gather(2, flat).view(n, c, *rows.shape[1:])


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output pixel coordinates (column x, row y) as 1×H×W int64 tensors."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device),
                            indexing="ij")
    return xs[None], ys[None]


def _affine_nearest(x: torch.Tensor, coeffs: torch.Tensor, fill: int) -> torch.Tensor:
    """PIL's nearest affine path for a[1] == a[3] == 0 (ImagingScaleAffine), per sample.

    coeffs: n×6 float64 (a, b, c, d, e, f), output (x, y) reads input (a·(x+½)+c, e·(y+½)+f),
    floored; outside the image -> fill.
    """
    px, py = _grid(x)
    a = upload(coeffs, x.device)
    sx = (a[:, 2] + a[:, 0] * 0.5)[:, None, None] + px * a[:, 0][:, None, None]
    sy = (a[:, 5] + a[:, 4] * 0.5)[:, None, None] + py * a[:, 4][:, None, None]
    return _sample_nearest(x, sx.floor().long(), sy.floor().long(), fill)


def _sample_nearest(x: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor, fill: int
                    ) -> torch.Tensor:
    h, w = x.shape[-2:]
    ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = _gather(x, iy.clamp(0, h - 1), ix.clamp(0, w - 1))
    return torch.where(ok[:, None], out, torch.full_like(out[:1, :1, :1, :1], fill))


def _affine_fixed(x: torch.Tensor, coeffs: list[tuple[float, ...]], fill: int) -> torch.Tensor:
    """PIL's nearest affine path with rotation/shear terms: 16.16 fixed point (affine_fixed).

    coeffs: one (a, b, c, d, e, f) per sample as Python floats (so FIX() rounds exactly as Pillow).
    """
    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    fixed = [(fix(a), fix(b), fix(c + a * 0.5 + b * 0.5),
              fix(d), fix(e), fix(f + d * 0.5 + e * 0.5)) for a, b, c, d, e, f in coeffs]
    k = upload(torch.tensor(fixed, dtype=torch.int64), x.device)[:, :, None, None]
    px, py = _grid(x)
    xx = k[:, 2] + px * k[:, 0] + py * k[:, 1]
    yy = k[:, 5] + px * k[:, 3] + py * k[:, 4]
    return _sample_nearest(x, xx >> 16, yy >> 16, fill)


def _cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor,
           d: torch.Tensor) -> torch.Tensor:
    """Pillow's BICUBIC macro (Keys kernel a = -1), same float64 operation order."""
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


def _affine_bicubic(x: torch.Tensor, coeffs: torch.Tensor, fill: int) -> torch.Tensor:
    """PIL's generic affine transform with BICUBIC resampling (ImagingGenericTransform), per sample.

    Source point s = (a·(x+½) + b·(y+½) + c, d·(x+½) + e·(y+½) + f); s outside [0, W)×[0, H) ->
    fill; otherwise a 4×4 cubic (a = -1) on edge-clamped neighbours of s - ½, clipped to 0..255 and
    truncated, as Pillow does.
    """
    n, ch, h, w = x.shape
    px, py = _grid(x)
    a = upload(coeffs, x.device)[:, :, None, None]
    xin, yin = px.double() + 0.5, py.double() + 0.5
    sx = a[:, 0] * xin + a[:, 1] * yin + a[:, 2]
    sy = a[:, 3] * xin + a[:, 4] * yin + a[:, 5]
    ok = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    sx, sy = sx - 0.5, sy - 0.5
    fx, fy = sx.floor(), sy.floor()
    dx, dy = (sx - fx)[:, None], (sy - fy)[:, None]
    x0, y0 = fx.long() - 1, fy.long() - 1
    cols = [(x0 + i).clamp(0, w - 1) for i in range(4)]
    rows = []
    for j in range(4):
        r = (y0 + j).clamp(0, h - 1)
        taps = [_gather(x, r, c).double() for c in cols]
        rows.append(_cubic(*taps, dx))
    v = _cubic(*rows, dy)
    out = v.clamp(0, 255).to(torch.uint8)  # truncation, like Pillow's (UINT8)v
    return torch.where(ok[:, None], out, torch.full_like(out[:1, :1, :1, :1], fill))


def _l24(x: torch.Tensor) -> torch.Tensor:
    """Pillow's convert("L"): (R·19595 + G·38470 + B·7471 + 0x8000) >> 16, as n×1×H×W int32."""
    xi = x.int()
    return (xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 0x8000) >> 16


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, factor): float32 deg + f·(x - deg), clipped, truncated."""
    alpha = _view(factor.float(), x)
    diff = (x.int() - degenerate.int()).float()
    out = degenerate.float() + alpha * diff  # two separate float32 roundings, like Pillow's C
    return out.clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# geometric ops (fill = 128 as in the reference policy)


def shear_x(x: torch.Tensor, shear: float | torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL transform(AFFINE, (1, m, 0, 0, 1, 0), BICUBIC): output (x, y) reads (x + m·y, y)."""
    _check(x)
    m = _per_sample(shear, len(x))
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine_bicubic(x, torch.stack([one, m, zero, zero, one, zero], 1), fill)


def shear_y(x: torch.Tensor, shear: float | torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL transform(AFFINE, (1, 0, 0, m, 1, 0), BICUBIC): output (x, y) reads (x, y + m·x)."""
    _check(x)
    m = _per_sample(shear, len(x))
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine_bicubic(x, torch.stack([one, zero, zero, m, one, zero], 1), fill)


def translate_x(x: torch.Tensor, pixels: float | torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL transform(AFFINE, (1, 0, c, 0, 1, 0)), nearest: output x reads input floor(x+½+c)."""
    _check(x)
    c = _per_sample(pixels, len(x))
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    return _affine_nearest(x, torch.stack([one, zero, c, zero, one, zero], 1), fill)


def translate_y(x: torch.Tensor, pixels: float | torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL transform(AFFINE, (1, 0, 0, 0, 1, c)), nearest: output y reads input floor(y+½+c)."""
    _check(x)
    c = _per_sample(pixels, len(x))
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    return _affine_nearest(x, torch.stack([one, zero, zero, zero, one, c], 1), fill)


def _rotation_coeffs(angle: float, w: int, h: int) -> tuple[float, ...]:
    """Pillow's Image.rotate inverse matrix about the image centre (expand=False)."""
    rad = -math.radians(angle % 360.0)
    a, b = round(math.cos(rad), 15), round(math.sin(rad), 15)
    d, e = round(-math.sin(rad), 15), round(math.cos(rad), 15)
    cx, cy = w / 2, h / 2
    c = a * -cx + b * -cy + 0.0 + cx
    f = d * -cx + e * -cy + 0.0 + cy
    return a, b, c, d, e, f


def rotate(x: torch.Tensor, degrees: float | torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """PIL rotate(degrees) (counter-clockwise, nearest, about the centre), outside -> fill.

    The reference rotates an RGBA copy and composites it on grey; with nearest resampling that is
    exactly "pixels from outside the source become `fill`".
    """
    _check(x)
    h, w = x.shape[-2:]
    angles = _per_sample(degrees, len(x)).tolist()
    return _affine_fixed(x, [_rotation_coeffs(t, w, h) for t in angles], fill)


# ---------------------------------------------------------------------------------------------
# photometric ops


def color(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color(img).enhance(factor): blend of the L24 grey image and the image."""
    _check(x)
    return _blend(_l24(x), x, _per_sample(factor, len(x)))


def contrast(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend of the image's rounded mean L24 grey level and the image."""
    _check(x)
    grey = _l24(x)
    total = grey.flatten(1).sum(1).double()
    # tensor / tensor: CUDA divides by a Python scalar as a multiplication by its reciprocal
    mean = total / torch.full_like(total, grey[0].numel())
    level = (mean + 0.5).floor().int().view(-1, 1, 1, 1)
    return _blend(level, x, _per_sample(factor, len(x)))


def brightness(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend of black and the image (factor·x, truncated, clipped)."""
    _check(x)
    return _blend(torch.zeros_like(x[:1, :1, :1, :1]), x, _per_sample(factor, len(x)))


def sharpness(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend of ImageFilter.SMOOTH(img) and the image.

    SMOOTH = [[1,1,1],[1,5,1],[1,1,1]]/13, rounded half up (exactly: (2S + 13) // 26 for the
    integer kernel sum S, as S/13 is never within Pillow's float32 error of a .5 tie); the 1-pixel
    border is not filtered (it stays the image), as in Pillow.
    """
    _check(x)
    xi = x.int()
    h, w = x.shape[-2:]
    s = 4 * xi[..., 1:h - 1, 1:w - 1]  # centre weight 5 = 4 + the 1 in the 3×3 sum below
    for di in range(3):
        for dj in range(3):
            s = s + xi[..., di:di + h - 2, dj:dj + w - 2]
    smooth = xi.clone()
    smooth[..., 1:h - 1, 1:w - 1] = torch.div(2 * s + 13, 26, rounding_mode="floor")
    return _blend(smooth, x, _per_sample(factor, len(x)))


def posterize(x: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize: keep the top `bits` (1..8) bits of every channel."""
    _check(x)
    b = _per_sample(bits, len(x), torch.int64)
    if (b < 1).any() or (b > 8).any():
        raise ValueError("posterize bits must be in 1..8")
    mask = (255 - (2 ** (8 - b) - 1)).to(torch.uint8)
    return x & _view(mask, x)


def solarize(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize: pixels >= threshold become 255 - pixel."""
    _check(x)
    t = _view(_per_sample(threshold, len(x)), x)
    return torch.where(x.double() >= t, 255 - x, x)


def invert(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.invert: 255 - x."""
    _check(x)
    return 255 - x


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0), per channel: v -> int(v·s - lo·s), s = 255 / (hi - lo)."""
    _check(x)
    flat = x.flatten(2)
    lo = flat.amin(2, keepdim=True).double()[..., None]
    hi = flat.amax(2, keepdim=True).double()[..., None]
    span = (hi - lo).clamp(min=1)
    # a true division (255.0 / tensor would be computed as 255.0 * (1 / tensor): off by an ulp)
    scale = torch.full_like(span, 255.0) / span
    offset = -lo * scale
    out = (x.double() * scale + offset).clamp(0, 255).to(torch.uint8)  # int() truncation
    return torch.where(hi > lo, out, x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize, per channel: Pillow's histogram LUT (step = (N - h[last]) // 255)."""
    _check(x)
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    m = n * c
    hist = torch.bincount((flat + 256 * torch.arange(m, device=x.device)[:, None]).flatten(),
                          minlength=256 * m).view(m, 256)
    last = hist.gather(1, flat.amax(1, keepdim=True))  # count of the highest value present
    step = (h * w - last) // 255  # m×1
    below = hist.cumsum(1) - hist  # pixels strictly below each value
    lut = torch.div(step // 2 + below, step.clamp(min=1), rounding_mode="floor").clamp(max=255)
    out = lut.gather(1, flat).to(torch.uint8).view(n, c, h, w)
    return torch.where((step > 0).view(n, c, 1, 1), out, x)


# ---------------------------------------------------------------------------------------------
# the policy

OPS: dict[str, Callable[..., torch.Tensor]] = {
    "shear_x": shear_x, "shear_y": shear_y, "translate_x": translate_x,
    "translate_y": translate_y, "rotate": rotate, "color": color, "posterize": posterize,
    "solarize": solarize, "contrast": contrast, "sharpness": sharpness, "brightness": brightness,
    "autocontrast": autocontrast, "equalize": equalize, "invert": invert,
}
_OP_NAMES = tuple(OPS)
# per stage k: op id, probability and table magnitude of each sub-policy (CPU tensors)
_STAGES = [(torch.tensor([_OP_NAMES.index(row[3 * k]) for row in CIFAR10_POLICY]),
            torch.tensor([row[3 * k + 1] for row in CIFAR10_POLICY], dtype=torch.float64),
            torch.tensor([float(MAGNITUDES[row[3 * k]][row[3 * k + 2]]) for row in CIFAR10_POLICY],
                         dtype=torch.float64))
           for k in range(2)]


def cifar10_policy_params(n: int, generator: torch.Generator
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image draws on the CPU: sub-policy (n,), uniforms (n, 2), signs ±1 (n, 2).

    Always the same number of draws for a given n, whatever gets applied.
    """
    if generator.device.type != "cpu":
        raise ValueError(f"augmentation needs a CPU torch.Generator, got one on {generator.device}")
    which = torch.randint(0, len(CIFAR10_POLICY), (n,), generator=generator)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    sign = torch.randint(0, 2, (n, 2), generator=generator) * 2 - 1
    return which, u, sign


def _op_argument(name: str, magnitude: torch.Tensor, sign: torch.Tensor, h: int, w: int
                 ) -> torch.Tensor | None:
    """DeepVoltaire's table magnitude -> the op's argument (per sample)."""
    if name in ("autocontrast", "equalize", "invert"):
        return None
    if name in ("color", "contrast", "sharpness", "brightness"):
        return 1 + magnitude * sign
    if name in ("shear_x", "shear_y"):
        return magnitude * sign
    if name == "translate_x":
        return magnitude * w * sign
    if name == "translate_y":
        return magnitude * h * sign
    if name == "posterize":
        return magnitude.long()
    return magnitude  # rotate (degrees, no sign), solarize (threshold)


def apply_cifar10_policy(x: torch.Tensor, which: torch.Tensor, u: torch.Tensor,
                         sign: torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """Apply sub-policy which[k] to image k, its op j iff u[k, j] < p_j (see cifar10_policy)."""
    _check(x)
    h, w = x.shape[-2:]
    out = x.clone()
    for k, (op_ids, probs, mags) in enumerate(_STAGES):
        op = op_ids[which]
        applied = u[:, k] < probs[which]
        for i, name in enumerate(_OP_NAMES):
            sel = (applied & (op == i)).nonzero().flatten()  # CPU: no device sync
            if len(sel) == 0:
                continue
            arg = _op_argument(name, mags[which[sel]], sign[sel, k].double(), h, w)
            idx = upload(sel, x.device)
            args = () if arg is None else (arg,)
            kwargs = {"fill": fill} if name in ("shear_x", "shear_y", "translate_x",
                                                  "translate_y", "rotate") else {}
            out[idx] = OPS[name](out[idx], *args, **kwargs)
    return out


def cifar10_policy(x: torch.Tensor, generator: torch.Generator, fill: int = FILL) -> torch.Tensor:
    """DeepVoltaire `CIFAR10Policy()` per image of a uint8 N×3×H×W batch, on x's device.

    One of the 25 sub-policies uniformly per image; each of its two ops applied with its own
    probability, in order. Random numbers from `generator` (CPU) only.
    """
    _check(x)
    return apply_cifar10_policy(x, *cifar10_policy_params(len(x), generator), fill=fill)


# ---------------------------------------------------------------------------------------------
# Cutout and random rotation


def cutout(x: torch.Tensor, generator: torch.Generator, length: int = 16) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017; the reference's `--aug cutout`): one square hole per image.

    Centre (cy, cx) uniform over the pixels; rows [cy - length//2, cy + length//2) and the same
    columns, clipped at the borders, are zeroed (so the hole is at most length×length).
    """
    _check(x)
    if generator.device.type != "cpu":
        raise ValueError(f"augmentation needs a CPU torch.Generator, got one on {generator.device}")
    n, _, h, w = x.shape
    cy = upload(torch.randint(0, h, (n,), generator=generator), x.device)[:, None]
    cx = upload(torch.randint(0, w, (n,), generator=generator), x.device)[:, None]
    r, c = torch.arange(h, device=x.device)[None], torch.arange(w, device=x.device)[None]
    in_rows = (r >= cy - length // 2) & (r < cy + length // 2)  # n×H
    in_cols = (c >= cx - length // 2) & (c < cx + length // 2)  # n×W
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(hole, 0)


def random_rotate(x: torch.Tensor, generator: torch.Generator, degrees: float = 15.0,
                  fill: int = 0) -> torch.Tensor:
    """torchvision RandomRotation(degrees) on PIL images: angle ~ U(-degrees, degrees) per image,
    nearest, about the centre, no expand, corners filled with `fill` (0 like torchvision's default).
    """
    _check(x)
    if generator.device.type != "cpu":
        raise ValueError(f"augmentation needs a CPU torch.Generator, got one on {generator.device}")
    angles = (torch.rand(len(x), generator=generator, dtype=torch.float64) * 2 - 1) * degrees
    return rotate(x, angles, fill=fill)


__all__ = [
    "CIFAR10_POLICY", "FILL", "MAGNITUDES", "OPS", "apply_cifar10_policy", "autocontrast",
    "brightness", "cifar10_policy", "cifar10_policy_params", "color", "contrast", "cutout",
    "equalize", "invert", "posterize", "random_rotate", "rotate", "sharpness", "shear_x",
    "shear_y", "solarize", "translate_x", "translate_y",
]
