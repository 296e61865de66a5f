"""Training-time augmentations: composable, seeded transforms applied to whole batches on the device.

Every transform works in two steps. ``draw(n, shape, generator)`` draws the random parameters of
``n`` images from an explicit CPU ``torch.Generator`` (so a seed gives the same draws on every device);
``apply(x, params)`` applies them to a (B, C, H, W) float batch in [0, 1] wherever it lives. Splitting
the two is what lets distributed training reproduce one process exactly: every rank draws the
parameters of the whole global batch and applies only its own slice (:func:`take`).

The augmentations the lecture names, each with its source:

=============  =================================================================================
``crop``       random crop of the model's input size (Krizhevsky et al. NIPS 2012, Sec. 4.1)
``center``     the central crop (the test view of AlexNet and VGG)
``flip``       horizontal reflection with probability p (Krizhevsky et al. 2012, Sec. 4.1)
``scale``      scale jittering: isotropic rescale so the smaller side is S ~ U{Smin..Smax},
               then a random crop (Simonyan & Zisserman ICLR 2015, Sec. 3.1, S in [256, 512])
``aspect``     a window of random area and aspect ratio, resized to the input size
               (Szegedy et al. CVPR 2015, Sec. 6: 8%..100% of the area, ratio 3/4..4/3)
``pca``        AlexNet's colour noise: add sum_i alpha_i lambda_i p_i, alpha_i ~ N(0, 0.1), with
               (lambda_i, p_i) the eigenpairs of the training set's RGB covariance (Sec. 4.1)
``cast``       colour casting: a random integer offset in [-m, m] / 255 per channel
               (Wu et al. "Deep Image" 2015, Sec. 3; the lecture's table: 68,920 ~ 41^3 changes)
``vignette``   darkens towards the corners: gain 1 - s (r / R)^2, R the half diagonal (Deep Image)
``lens``       radial lens distortion, source radius r (1 + k r^2) (r in half diagonals):
               k > 0 barrel, k < 0 pincushion, k = 0 identity (Deep Image)
``rotate``     rotation about the centre by an angle ~ U[-d, d] degrees (Deep Image)
``gray``       ITU-R 601-2 luma in every channel with probability p (Chatfield et al. BMVC 2014)
=============  =================================================================================

Resampling (scale, aspect, lens, rotate) is bilinear through ``grid_sample`` on the batch, without
antialiasing: load images at the smallest scale you jitter to (e.g. 256) so that jittering enlarges.
Pixels that a warp fetches from outside the image are black (zero). Photometric transforms do not
clip: like AlexNet's, a shifted value may leave [0, 1] (the network sees mean-subtracted values).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError

Params = dict[str, torch.Tensor]  # every tensor has the batch as its first dimension
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def take(params: Params, lo: int, hi: int) -> Params:
    """The parameters of images ``lo:hi`` of a drawn batch (a rank's slice of a global batch)."""
    return {k: v[lo:hi] for k, v in params.items()}


class Transform:
    """One augmentation. Subclasses set ``name`` and implement ``draw`` and ``apply``."""

    name = ""

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def draw(self, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> Params:
        return {}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(len(x), tuple(x.shape[1:]), generator))

    def args(self) -> list[float]:
        return []

    def spec(self) -> str:
        args = self.args()
        return self.name + ("=" + ":".join(f"{a:g}" for a in args) if args else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class Compose(Transform):
    """Transforms applied in order; ``draw`` walks the shapes through the chain."""

    name = "compose"

    def __init__(self, transforms: list[Transform]):
        self.transforms = list(transforms)

    def output_size(self, size):
        for t in self.transforms:
            size = t.output_size(size)
        return size

    def draw(self, n, shape, generator):
        params = {}
        c, h, w = shape
        for i, t in enumerate(self.transforms):
            params.update({f"{i}.{k}": v for k, v in t.draw(n, (c, h, w), generator).items()})
            h, w = t.output_size((h, w))
        return params

    def apply(self, x, params):
        for i, t in enumerate(self.transforms):
            x = t.apply(x, {k.split(".", 1)[1]: v for k, v in params.items() if k.split(".", 1)[0] == str(i)})
        return x

    def spec(self) -> str:
        return ",".join(t.spec() for t in self.transforms)

    def __len__(self) -> int:
        return len(self.transforms)


# --------------------------------------------------------------------------- helpers


def _uniform(n: int, lo: float, hi: float, generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def _coin(n: int, p: float, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) < p


def _randint(n: int, high: torch.Tensor | int, generator) -> torch.Tensor:
    """Integers uniform in [0, high) per image (``high`` may differ per image)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (u * torch.as_tensor(high, dtype=torch.float64)).floor().long()


def crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-image crops x[i, :, top_i:top_i+h, left_i:left_i+w], exact (no resampling)."""
    h, w = size
    top, left = top.to(x.device), left.to(x.device)
    if len(x) == 0 or bool((top == top[0]).all() and (left == left[0]).all()):
        if len(x) == 0:
            return x[..., :h, :w]
        t, l = int(top[0]), int(left[0])
        return x[..., t : t + h, l : l + w]
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, h)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (B, w)
    batch = torch.arange(len(x), device=x.device)[:, None, None]
    out = x[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, h, w, C): advanced indices first
    return out.permute(0, 3, 1, 2).contiguous()


def _sample(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinear samples of ``x`` at continuous pixel coordinates (u across, v down; pixel k spans [k, k+1]).

    ``u`` and ``v`` broadcast to (B, h', w') and live on ``x``'s device.
    """
    h, w = x.shape[-2:]
    u, v = torch.broadcast_tensors(2 * u / w - 1, 2 * v / h - 1)
    grid = torch.stack((u, v), dim=-1).to(x.dtype)  # (B, h', w', 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def resample_windows(x: torch.Tensor, top, left, height, width, size: tuple[int, int]) -> torch.Tensor:
    """Each image's window (top, left, height, width) in its pixel coordinates, resampled to ``size``.

    Output pixel i samples the source at top + (i + 0.5) * height / out_h: for a window of the whole
    image this is exactly ``F.interpolate(..., mode="bilinear", align_corners=False)``.
    """
    oh, ow = size
    i = torch.arange(oh, dtype=torch.float64) + 0.5
    j = torch.arange(ow, dtype=torch.float64) + 0.5
    v = top.double()[:, None] + i * (height.double()[:, None] / oh)  # (B, oh), exact in float64
    u = left.double()[:, None] + j * (width.double()[:, None] / ow)  # (B, ow)
    on = {"device": x.device, "dtype": x.dtype}
    return _sample(x, u.to(**on)[:, None, :], v.to(**on)[:, :, None], "border")


def _centred_coords(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pixel-centre offsets (dx (1, 1, w), dy (1, h, 1)) from the centre of ``x``'s images, on its device,
    and the half diagonal R."""
    h, w = x.shape[-2:]
    dy = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1) + (0.5 - h / 2)
    dx = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w) + (0.5 - w / 2)
    return dx, dy, math.hypot(h / 2, w / 2)


def _per_image(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) parameters as (B, 1, 1) on ``x``'s device and dtype."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)


def _check_fits(name: str, crop_size, size) -> None:
    if crop_size[0] > size[0] or crop_size[1] > size[1]:
        raise ConfigError(f"augmentation '{name}' cannot cut {crop_size[0]}x{crop_size[1]} from "
                          f"{size[0]}x{size[1]} images; load the images larger (--load-size)")


# --------------------------------------------------------------------------- geometric


class RandomCrop(Transform):
    """A crop of ``size`` at a uniformly random position (AlexNet: 224 x 224 from 256 x 256)."""

    name = "crop"

    def __init__(self, size: tuple[int, int]):
        self.size = tuple(size)

    def output_size(self, size):
        return self.size

    def draw(self, n, shape, generator):
        _check_fits(self.name, self.size, shape[1:])
        return {"top": _randint(n, shape[1] - self.size[0] + 1, generator),
                "left": _randint(n, shape[2] - self.size[1] + 1, generator)}

    def apply(self, x, p):
        return crop(x, p["top"], p["left"], self.size)


class CenterCrop(RandomCrop):
    """The central crop; offsets are floored, as Caffe's: ((H - h) // 2, (W - w) // 2)."""

    name = "center"

    def draw(self, n, shape, generator):
        _check_fits(self.name, self.size, shape[1:])
        return {"top": torch.full((n,), (shape[1] - self.size[0]) // 2),
                "left": torch.full((n,), (shape[2] - self.size[1]) // 2)}


class Flip(Transform):
    """Horizontal reflection of each image with probability ``p``."""

    name = "flip"

    def __init__(self, p: float = 0.5):
        self.p = p

    def args(self):
        return [self.p] if self.p != 0.5 else []

    def draw(self, n, shape, generator):
        return {"flip": _coin(n, self.p, generator)}

    def apply(self, x, p):
        return torch.where(p["flip"].to(x.device)[:, None, None, None], x.flip(-1), x)


class ScaleJitter(Transform):
    """VGG's scale jittering: rescale isotropically so the smaller side is S, S ~ U{smin..smax}, crop ``size``.

    The rescaled size is (round(H S / min(H, W)), round(W S / min(H, W))), i.e. the aspect ratio is kept
    up to rounding; the crop position is uniform in the rescaled image.
    """

    name = "scale"

    def __init__(self, smin: int, smax: int, size: tuple[int, int]):
        if not 1 <= smin <= smax:
            raise ConfigError(f"scale={smin}:{smax} needs 1 <= Smin <= Smax")
        self.smin, self.smax, self.size = int(smin), int(smax), tuple(size)
        if self.smin < min(self.size):
            raise ConfigError(f"scale={smin}:{smax}: Smin must be at least the crop side {min(self.size)}")

    def args(self):
        return [self.smin, self.smax]

    def output_size(self, size):
        return self.size

    def draw(self, n, shape, generator):
        _, h, w = shape
        s = self.smin + _randint(n, self.smax - self.smin + 1, generator)
        rh = (h * s.double() / min(h, w) + 0.5).floor().long()  # round half up
        rw = (w * s.double() / min(h, w) + 0.5).floor().long()
        return {"S": s, "height": rh, "width": rw,
                "top": _randint(n, rh - self.size[0] + 1, generator),
                "left": _randint(n, rw - self.size[1] + 1, generator)}

    def apply(self, x, p):
        h, w = x.shape[-2:]
        sy, sx = h / p["height"].double(), w / p["width"].double()  # source pixels per rescaled pixel
        return resample_windows(x, p["top"] * sy, p["left"] * sx, self.size[0] * sy, self.size[1] * sx, self.size)


class AspectCrop(Transform):
    """GoogLeNet's crop: a window of area fraction a ~ U[amin, amax] and aspect ratio r (log-uniform in
    [rmin, rmax], r = width / height), at a uniform position, resized to ``size``.

    Ten candidates per image; the first that fits is used, else the largest centred window whose ratio
    lies in [rmin, rmax] (torchvision's RandomResizedCrop does the same).
    """

    name = "aspect"
    TRIES = 10

    def __init__(self, size, amin=0.08, amax=1.0, rmin=3 / 4, rmax=4 / 3):
        if not (0 < amin <= amax <= 1 and 0 < rmin <= rmax):
            raise ConfigError(f"aspect={amin}:{amax}:{rmin}:{rmax} needs 0 < amin <= amax <= 1 and 0 < rmin <= rmax")
        self.size, self.amin, self.amax, self.rmin, self.rmax = tuple(size), amin, amax, rmin, rmax

    def args(self):
        return [self.amin, self.amax, self.rmin, self.rmax]

    def output_size(self, size):
        return self.size

    def draw(self, n, shape, generator):
        _, h, w = shape
        area = h * w * _uniform(n * self.TRIES, self.amin, self.amax, generator).view(n, self.TRIES)
        ratio = torch.exp(_uniform(n * self.TRIES, math.log(self.rmin), math.log(self.rmax), generator))
        ratio = ratio.view(n, self.TRIES)
        cw = (torch.sqrt(area * ratio) + 0.5).floor().long()
        ch = (torch.sqrt(area / ratio) + 0.5).floor().long()
        fits = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)  # (n, TRIES)
        first = fits.long().argmax(1)  # index of the first fitting candidate (0 when none fits)
        height, width = ch.gather(1, first[:, None])[:, 0], cw.gather(1, first[:, None])[:, 0]
        fh, fw = h, w  # fallback: the whole image, narrowed to the allowed ratios
        if w / h < self.rmin:
            fh = int(w / self.rmin + 0.5)
        elif w / h > self.rmax:
            fw = int(h * self.rmax + 0.5)
        none = ~fits.any(1)
        height, width = torch.where(none, fh, height), torch.where(none, fw, width)
        top, left = _randint(n, h - height + 1, generator), _randint(n, w - width + 1, generator)
        top = torch.where(none, (h - height) // 2, top)
        left = torch.where(none, (w - width) // 2, left)
        return {"top": top, "left": left, "height": height, "width": width}

    def apply(self, x, p):
        return resample_windows(x, p["top"], p["left"], p["height"], p["width"], self.size)


class Rotation(Transform):
    """Rotation about the image centre by an angle ~ U[-degrees, degrees]; positive turns counter-clockwise."""

    name = "rotate"

    def __init__(self, degrees: float = 10.0, p: float = 1.0):
        self.degrees, self.p = degrees, p

    def args(self):
        return [self.degrees] + ([self.p] if self.p != 1 else [])

    def draw(self, n, shape, generator):
        angle = _uniform(n, -self.degrees, self.degrees, generator)
        return {"angle": torch.where(_coin(n, self.p, generator), angle, 0.0)}

    def apply(self, x, p):
        h, w = x.shape[-2:]
        dx, dy, _ = _centred_coords(x)
        t = _per_image(torch.deg2rad(p["angle"].double()), x)
        # The output pixel at offset (dx, dy) shows the source pixel rotated back by the angle
        # (y points down, so a counter-clockwise turn on screen is clockwise in (x, y)).
        u = w / 2 + torch.cos(t) * dx - torch.sin(t) * dy
        v = h / 2 + torch.sin(t) * dx + torch.cos(t) * dy
        return _sample(x, u, v, "zeros")


class LensDistortion(Transform):
    """Radial distortion: the output pixel at radius r shows the source at r (1 + k r^2), r measured in
    half diagonals from the centre; k ~ U[-kmax, kmax]. k > 0 is barrel, k < 0 pincushion."""

    name = "lens"

    def __init__(self, kmax: float = 0.2, p: float = 1.0):
        self.kmax, self.p = kmax, p

    def args(self):
        return [self.kmax] + ([self.p] if self.p != 1 else [])

    def draw(self, n, shape, generator):
        k = _uniform(n, -self.kmax, self.kmax, generator)
        return {"k": torch.where(_coin(n, self.p, generator), k, 0.0)}

    def apply(self, x, p):
        h, w = x.shape[-2:]
        dx, dy, radius = _centred_coords(x)
        gain = 1 + _per_image(p["k"], x) * ((dx**2 + dy**2) / radius**2)  # (B, h, w)
        return _sample(x, w / 2 + dx * gain, h / 2 + dy * gain, "zeros")


# --------------------------------------------------------------------------- photometric


class PCANoise(Transform):
    """AlexNet's colour noise: every pixel of image n gets sum_i alpha_ni lambda_i p_i, alpha_ni ~ N(0, std).

    ``eigvals`` (3,) and ``eigvecs`` (3, 3), eigenvectors in columns, come from :func:`rgb_pca`.
    """

    name = "pca"

    def __init__(self, eigvals: torch.Tensor, eigvecs: torch.Tensor, std: float = 0.1):
        self.eigvals, self.eigvecs, self.std = eigvals.double(), eigvecs.double(), std

    def args(self):
        return [self.std] if self.std != 0.1 else []

    def draw(self, n, shape, generator):
        return {"alpha": self.std * torch.randn(n, len(self.eigvals), generator=generator, dtype=torch.float64)}

    def shift(self, alpha: torch.Tensor) -> torch.Tensor:
        """(B, 3) colour offsets: [p1 p2 p3] [alpha1 lambda1, alpha2 lambda2, alpha3 lambda3]^T."""
        return (alpha * self.eigvals) @ self.eigvecs.T

    def apply(self, x, p):
        if x.shape[1] != len(self.eigvals):
            raise ConfigError(f"'pca' colour noise needs {len(self.eigvals)}-channel images, got {x.shape[1]}; "
                              f"drop it for grayscale data")
        return x + self.shift(p["alpha"]).to(device=x.device, dtype=x.dtype)[:, :, None, None]


class ColorCast(Transform):
    """Deep Image's colour casting: each channel gets an integer offset ~ U{-m..m} (in 8-bit units)."""

    name = "cast"

    def __init__(self, max_offset: int = 20, p: float = 1.0):
        self.max_offset, self.p = int(max_offset), p

    def args(self):
        return [self.max_offset] + ([self.p] if self.p != 1 else [])

    def draw(self, n, shape, generator):
        c, m = shape[0], self.max_offset
        offset = torch.randint(-m, m + 1, (n, c), generator=generator)
        return {"offset": offset * _coin(n, self.p, generator)[:, None]}

    def apply(self, x, p):
        return x + (p["offset"].to(device=x.device, dtype=x.dtype) / 255)[:, :, None, None]


class Vignetting(Transform):
    """Gain 1 - s (r / R)^2 with s ~ U[smin, smax]: 1 at the centre, 1 - s at the image corners."""

    name = "vignette"

    def __init__(self, smin: float = 0.2, smax: float = 0.5, p: float = 1.0):
        if not 0 <= smin <= smax <= 1:
            raise ConfigError(f"vignette={smin}:{smax} needs 0 <= smin <= smax <= 1")
        self.smin, self.smax, self.p = smin, smax, p

    def args(self):
        return [self.smin, self.smax] + ([self.p] if self.p != 1 else [])

    def draw(self, n, shape, generator):
        s = _uniform(n, self.smin, self.smax, generator)
        return {"strength": torch.where(_coin(n, self.p, generator), s, 0.0)}

    def apply(self, x, p):
        dx, dy, radius = _centred_coords(x)
        gain = 1 - _per_image(p["strength"], x) * ((dx**2 + dy**2) / radius**2)  # (B, h, w)
        return x * gain[:, None]


class Grayscale(Transform):
    """601-2 luma copied into every channel, for each image with probability ``p``."""

    name = "gray"

    def __init__(self, p: float = 1.0):
        self.p = p

    def args(self):
        return [self.p] if self.p != 1 else []

    def draw(self, n, shape, generator):
        return {"gray": _coin(n, self.p, generator)}

    def apply(self, x, p):
        if x.shape[1] != 3:
            return x
        luma = (x * x.new_tensor(LUMA_WEIGHTS)[:, None, None]).sum(1, keepdim=True).expand_as(x)
        return torch.where(p["gray"].to(x.device)[:, None, None, None], luma, x)


# --------------------------------------------------------------------------- PCA of the training set


def rgb_pca(images) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the 3 x 3 covariance of RGB pixel values.

    ``images`` is a (N, 3, H, W) tensor or an iterable of such batches (summed in float64).
    """
    batches = [images] if torch.is_tensor(images) else images
    count, total, outer = 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    for batch in batches:
        if batch.shape[1] != 3:
            raise ConfigError(f"PCA colour noise needs RGB images; these have {batch.shape[1]} channel(s)")
        pixels = batch.double().transpose(0, 1).reshape(3, -1)  # (3, N*H*W)
        count += pixels.shape[1]
        total += pixels.sum(1)
        outer += pixels @ pixels.T
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    return eigvals.flip(0).clamp(min=0), eigvecs.flip(1)


# --------------------------------------------------------------------------- specs


def parse_augment(spec: str | None, size: tuple[int, int], *, pca: tuple | None = None) -> Compose:
    """A :class:`Compose` from a spec such as ``"scale=256:512,flip,pca=0.1"``; ``size`` is the model input.

    Items are separated by commas, arguments by colons; see the module docstring for the names.
    ``pca`` is (eigvals, eigvecs), needed for ``pca``.
    """
    transforms: list[Transform] = []
    for item in (spec or "").replace(" ", "").split(","):
        if not item or item == "none":
            continue
        name, _, arg_text = item.partition("=")
        try:
            args = [float(a) for a in arg_text.split(":")] if arg_text else []
        except ValueError:
            raise ConfigError(f"augmentation '{item}': arguments must be numbers separated by ':'") from None
        builder, nargs = _BUILDERS.get(name, (None, 0))
        if builder is None:
            raise ConfigError(f"unknown augmentation '{name}'; choose from {', '.join(_BUILDERS)}")
        if len(args) > nargs:
            raise ConfigError(f"augmentation '{item}' takes at most {nargs} argument(s)")
        if name == "pca" and pca is None:
            raise ConfigError("augmentation 'pca' needs the training set's RGB eigenvectors (rgb_pca)")
        transforms.append(builder(args, tuple(size), pca))
    return Compose(transforms)


def _ints(args):
    if any(a != int(a) for a in args):
        raise ConfigError(f"expected whole numbers, got {':'.join(f'{a:g}' for a in args)}")
    return [int(a) for a in args]


_BUILDERS = {
    "crop": (lambda a, size, _: RandomCrop(size), 0),
    "center": (lambda a, size, _: CenterCrop(size), 0),
    "flip": (lambda a, size, _: Flip(*a), 1),
    "scale": (lambda a, size, _: ScaleJitter(*_ints(a or [256, 512]), size), 2),
    "aspect": (lambda a, size, _: AspectCrop(size, *a), 4),
    "pca": (lambda a, size, pca: PCANoise(pca[0], pca[1], *a), 1),
    "cast": (lambda a, size, _: ColorCast(*_ints(a[:1]), *a[1:]), 2),
    "vignette": (lambda a, size, _: Vignetting(*a), 3),
    "lens": (lambda a, size, _: LensDistortion(*a), 2),
    "rotate": (lambda a, size, _: Rotation(*a), 2),
    "gray": (lambda a, size, _: Grayscale(*a), 1),
}
AUGMENTATION_NAMES = tuple(_BUILDERS)
