"""Augmentations: each one's defining property, checked against a slow, obvious twin where there is one."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit.data.augment import (
    AspectCrop,
    CenterCrop,
    ColorCast,
    Compose,
    Flip,
    Grayscale,
    LensDistortion,
    PCANoise,
    RandomCrop,
    Rotation,
    ScaleJitter,
    Vignetting,
    parse_augment,
    rgb_pca,
    take,
)
from cnnkit.errors import ConfigError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=6, c=3, h=20, w=28, seed=0):
    return torch.rand(n, c, h, w, generator=gen(seed))


def ramp(n, h, w, dtype=torch.float64):
    """Channel 0 holds each pixel centre's x coordinate, channel 1 its y: bilinear sampling of it returns
    the sampled position itself, so a warp's output *is* its coordinate map."""
    u = (torch.arange(w, dtype=dtype) + 0.5).expand(h, w)
    v = (torch.arange(h, dtype=dtype)[:, None] + 0.5).expand(h, w)
    return torch.stack([u, v])[None].expand(n, -1, -1, -1).contiguous()


# ----------------------------------------------------------------------------------- geometric


def test_flip_is_an_involution_and_flips_exactly_the_drawn_images():
    x, flip = images(), Flip(0.5)
    p = flip.draw(len(x), x.shape[1:], gen())
    assert 0 < int(p["flip"].sum()) < len(x)
    once = flip.apply(x, p)
    assert torch.equal(flip.apply(once, p), x)
    for i in range(len(x)):
        assert torch.equal(once[i], x[i].flip(-1) if p["flip"][i] else x[i])


def test_random_crop_comes_from_the_claimed_window_and_covers_every_position():
    x, crop = images(n=5, h=12, w=15), RandomCrop((8, 9))
    p = crop.draw(len(x), x.shape[1:], gen())
    out = crop.apply(x, p)
    for i in range(len(x)):  # the slow twin: one slice per image
        t, l = int(p["top"][i]), int(p["left"][i])
        assert torch.equal(out[i], x[i, :, t : t + 8, l : l + 9])
    many = crop.draw(4000, x.shape[1:], gen(1))
    assert set(many["top"].tolist()) == set(range(5)) and set(many["left"].tolist()) == set(range(7))


def test_center_crop_offsets_are_floored():
    x = images(n=2, h=11, w=14)
    out = CenterCrop((8, 9))(x, gen())
    assert torch.equal(out, x[:, :, 1:9, 2:11])  # (11 - 8) // 2 = 1, (14 - 9) // 2 = 2


def test_scale_jitter_keeps_the_aspect_ratio_and_matches_resize_then_crop():
    x, jitter = images(n=8, h=20, w=30), ScaleJitter(24, 40, (16, 16))
    p = jitter.draw(len(x), x.shape[1:], gen())
    out = jitter.apply(x, p)
    assert out.shape == (8, 3, 16, 16)
    for i in range(len(x)):
        s, rh, rw = int(p["S"][i]), int(p["height"][i]), int(p["width"][i])
        assert 24 <= s <= 40 and rh == s  # the smaller side (height) becomes S
        assert rw == math.floor(30 * s / 20 + 0.5)  # the other keeps the ratio, rounded
        assert abs(rw / rh - 30 / 20) <= 0.5 / rh + 1e-12  # within half a pixel of the exact ratio
        # slow twin: isotropic bilinear resize of the whole image, then the crop
        big = F.interpolate(x[i : i + 1], size=(rh, rw), mode="bilinear", align_corners=False)
        t, l = int(p["top"][i]), int(p["left"][i])
        torch.testing.assert_close(out[i], big[0, :, t : t + 16, l : l + 16], atol=2e-5, rtol=0)
    s_values = set(jitter.draw(3000, x.shape[1:], gen(1))["S"].tolist())
    assert s_values == set(range(24, 41))


def test_aspect_crop_windows_have_the_claimed_area_and_ratio():
    x, crop = images(n=6, h=40, w=40), AspectCrop((16, 16), 0.2, 0.6, 0.75, 4 / 3)
    p = crop.draw(500, x.shape[1:], gen())
    top, left, h, w = p["top"], p["left"], p["height"], p["width"]
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 40).all()
    area, ratio = (h * w).double() / 1600, w.double() / h.double()
    # rounding each side to whole pixels moves area and ratio a little
    assert area.min() > 0.2 * 0.9 and area.max() < 0.6 * 1.1
    assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 * 1.1
    q = take(crop.draw(len(x), x.shape[1:], gen(3)), 0, len(x))
    out = crop.apply(x, q)
    for i in range(len(x)):  # slow twin: the window cut out, then resized
        t, l, hh, ww = (int(q[k][i]) for k in ("top", "left", "height", "width"))
        ref = F.interpolate(x[i : i + 1, :, t : t + hh, l : l + ww], size=(16, 16), mode="bilinear",
                            align_corners=False)
        torch.testing.assert_close(out[i], ref[0], atol=2e-5, rtol=0)


def test_aspect_crop_falls_back_to_the_whole_image_when_nothing_fits():
    crop = AspectCrop((8, 8), 0.9, 1.0, 3.0, 4.0)  # wide windows of nearly the whole area never fit
    p = crop.draw(4, (3, 20, 20), gen())
    # the largest centred window with ratio >= 3: full width, height 20 / 3 rounded
    assert p["width"].tolist() == [20] * 4 and p["height"].tolist() == [7] * 4 and p["top"].tolist() == [6] * 4


def test_rotation_by_zero_is_the_identity_and_by_90_is_rot90():
    x = images(n=3, h=9, w=9)
    torch.testing.assert_close(Rotation(30).apply(x, {"angle": torch.zeros(3)}), x, atol=1e-6, rtol=0)
    turned = Rotation(90).apply(x, {"angle": torch.full((3,), 90.0)})
    torch.testing.assert_close(turned, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)  # counter-clockwise


def test_rotation_samples_the_rotated_coordinates():
    n, h, w = 2, 15, 21
    angles = torch.tensor([12.0, -30.0])
    out = Rotation(30).apply(ramp(n, h, w), {"angle": angles})
    dx, dy = ramp(1, h, w)[0, 0] - w / 2, ramp(1, h, w)[0, 1] - h / 2
    for i, a in enumerate(angles.double()):
        t = torch.deg2rad(a)
        u, v = w / 2 + torch.cos(t) * dx - torch.sin(t) * dy, h / 2 + torch.sin(t) * dx + torch.cos(t) * dy
        inside = (u > 0.5) & (u < w - 0.5) & (v > 0.5) & (v < h - 0.5)
        torch.testing.assert_close(out[i, 0][inside], u[inside], atol=1e-9, rtol=0)
        torch.testing.assert_close(out[i, 1][inside], v[inside], atol=1e-9, rtol=0)
        assert (out[i][:, ~((u > -0.5) & (u < w + 0.5) & (v > -0.5) & (v < h + 0.5))] == 0).all()  # black outside


def test_lens_distortion_with_k_zero_is_the_identity():
    x = images()
    torch.testing.assert_close(LensDistortion(0.3).apply(x, {"k": torch.zeros(len(x))}), x, atol=1e-6, rtol=0)


def test_lens_distortion_follows_the_radial_model_barrel_and_pincushion():
    n, h, w = 2, 17, 23
    k = torch.tensor([0.25, -0.25])  # barrel, pincushion
    out = LensDistortion(0.3).apply(ramp(n, h, w), {"k": k})
    base = ramp(1, h, w)[0]
    dx, dy = base[0] - w / 2, base[1] - h / 2
    r2 = (dx**2 + dy**2) / ((h / 2) ** 2 + (w / 2) ** 2)
    for i in range(n):
        u, v = w / 2 + dx * (1 + k[i] * r2), h / 2 + dy * (1 + k[i] * r2)
        inside = (u > 0.5) & (u < w - 0.5) & (v > 0.5) & (v < h - 0.5)
        torch.testing.assert_close(out[i, 0][inside], u[inside].double(), atol=1e-9, rtol=0)
    # barrel pulls the content towards the centre (a centred square shrinks), pincushion pushes it out
    square = torch.zeros(2, 1, 41, 41)
    square[..., 10:31, 10:31] = 1
    warped = LensDistortion(0.3).apply(square, {"k": k})
    assert warped[0].sum() < square[0].sum() - 20 and warped[1].sum() > square[1].sum() + 20


# ----------------------------------------------------------------------------------- photometric


def test_pca_noise_moves_colours_along_the_eigenvectors_with_the_alexnet_coefficients():
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen(5), dtype=torch.float64))
    eigvals = torch.tensor([0.2, 0.02, 0.0], dtype=torch.float64)  # p3 carries no variance
    noise = PCANoise(eigvals, q, std=0.1)
    x = images(n=4).double()
    p = noise.draw(len(x), x.shape[1:], gen())
    diff = noise.apply(x, p) - x  # (B, 3, H, W)
    per_image = diff[:, :, 0, 0]
    assert torch.allclose(diff, per_image[:, :, None, None].expand_as(diff), atol=1e-12)  # same for every pixel
    coeffs = per_image @ q  # coordinates in the eigenvector basis
    torch.testing.assert_close(coeffs, p["alpha"] * eigvals, atol=1e-12, rtol=0)
    assert coeffs[:, 2].abs().max() < 1e-12  # nothing along the zero-variance direction
    assert p["alpha"].std() > 0.02  # alpha ~ N(0, 0.1)


def test_rgb_pca_matches_numpy_covariance():
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 5000)) * np.array([[0.3], [0.1], [0.02]])
    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    rgb = (q @ pixels + 0.5).reshape(3, 50, 100)  # known principal directions
    batches = [torch.from_numpy(rgb[None, :, :25]).float(), torch.from_numpy(rgb[None, :, 25:]).float()]
    eigvals, eigvecs = rgb_pca(iter(batches))
    ref_vals, ref_vecs = np.linalg.eigh(np.cov(rgb.reshape(3, -1), bias=True))
    np.testing.assert_allclose(eigvals.numpy(), ref_vals[::-1], rtol=1e-4)
    for i in range(3):  # eigenvectors up to sign
        assert abs(abs(float(eigvecs[:, i] @ torch.from_numpy(ref_vecs[:, 2 - i]))) - 1) < 1e-4
    with pytest.raises(ConfigError, match="RGB"):
        rgb_pca(torch.rand(2, 1, 4, 4))


def test_color_cast_adds_one_integer_offset_per_channel():
    x, cast = images(n=200, h=4, w=5), ColorCast(20)
    p = cast.draw(len(x), x.shape[1:], gen())
    diff = (cast.apply(x, p) - x) * 255
    per = diff[:, :, 0, 0]
    assert torch.allclose(diff, per[:, :, None, None].expand_as(diff), atol=1e-3)
    assert torch.allclose(per, per.round(), atol=1e-3) and per.abs().max() <= 20 + 1e-3
    assert set(p["offset"].flatten().tolist()) == set(range(-20, 21))
    off = ColorCast(20, p=0.0)
    assert torch.equal(off.apply(x, off.draw(len(x), x.shape[1:], gen())), x)


def test_vignetting_leaves_the_centre_and_darkens_the_corners():
    x = torch.ones(3, 3, 21, 31)
    vig = Vignetting(0.3, 0.6)
    p = vig.draw(3, x.shape[1:], gen())
    out = vig.apply(x, p)
    assert torch.equal(out[:, :, 10, 15], x[:, :, 10, 15])  # the centre pixel (odd sizes) is untouched
    for i, s in enumerate(p["strength"].tolist()):
        corners = out[i, :, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners < 1 - 0.9 * s).all()  # gain 1 - s (r / R)^2 with r close to R
        assert (out[i, 0, 10, 15:].diff() < 0).all()  # monotone towards the edge
    assert 0.3 <= p["strength"].min() and p["strength"].max() <= 0.6


def test_grayscale_puts_the_luma_in_every_channel():
    x = images(n=8)
    gray = Grayscale(p=0.5)
    p = gray.draw(len(x), x.shape[1:], gen())
    out = gray.apply(x, p)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for i in range(len(x)):
        expected = luma[i].expand(3, -1, -1) if p["gray"][i] else x[i]
        torch.testing.assert_close(out[i], expected)


# ----------------------------------------------------------------------------------- composition


SPEC = "scale=24:32,aspect=0.3:1:0.75:1.3333,flip,cast=20,vignette=0.1:0.4,lens=0.2,rotate=10,gray=0.3,pca"


def pipeline():
    pca = rgb_pca(images(n=4))
    return parse_augment(SPEC, (16, 16), pca=pca)


def test_seeded_runs_repeat_and_other_seeds_differ():
    x, aug = images(), pipeline()
    assert torch.equal(aug(x, gen(7)), aug(x, gen(7)))
    assert not torch.allclose(aug(x, gen(7)), aug(x, gen(8)))


def test_slices_of_a_global_batch_equal_the_global_result():
    # what distributed training relies on: draw for the whole batch, apply per rank slice
    x, aug = images(n=7), pipeline()
    params = aug.draw(len(x), tuple(x.shape[1:]), gen(3))
    whole = aug.apply(x, params)
    parts = torch.cat([aug.apply(x[lo:hi], take(params, lo, hi)) for lo, hi in ((0, 3), (3, 7))])
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=0)


def test_float64_input_gives_the_float32_result():
    x, aug = images(), pipeline()
    params = aug.draw(len(x), tuple(x.shape[1:]), gen(2))
    out64 = aug.apply(x.double(), params)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), aug.apply(x, params), atol=1e-5, rtol=0)


def test_spec_round_trip_and_output_size():
    aug = pipeline()
    assert isinstance(aug, Compose) and len(aug) == 9
    assert aug.spec() == ("scale=24:32,aspect=0.3:1:0.75:1.3333,flip,cast=20,vignette=0.1:0.4,lens=0.2,"
                          "rotate=10,gray=0.3,pca")
    assert parse_augment(aug.spec(), (16, 16), pca=rgb_pca(images(n=2))).spec() == aug.spec()
    assert aug.output_size((20, 28)) == (16, 16) and len(parse_augment("", (8, 8))) == 0


@pytest.mark.parametrize("spec, fragment", [
    ("warp", "unknown augmentation 'warp'"),
    ("flip=a", "numbers"),
    ("flip=0.5:1", "at most 1"),
    ("scale=300:200", "Smin <= Smax"),
    ("scale=8:12", "at least the crop side"),
    ("pca", "eigenvectors"),
    ("cast=2.5", "whole numbers"),
])
def test_bad_specs_name_the_problem(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_augment(spec, (16, 16))


def test_a_crop_larger_than_the_image_is_refused():
    with pytest.raises(ConfigError, match="--load-size"):
        RandomCrop((32, 32))(images(h=20, w=20), gen())
    with pytest.raises(ConfigError, match="3-channel"):
        PCANoise(torch.ones(3), torch.eye(3)).apply(torch.rand(2, 1, 4, 4), {"alpha": torch.zeros(2, 3)})


def test_cli_augment_writes_a_labelled_grid(tmp_path, capsys):
    from PIL import Image

    from cnnkit.cli import main

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    out = tmp_path / "grid.png"
    code = main(["augment", str(tmp_path / "photo.png"), "--show", str(out), "--samples", "3",
                 "--load-size", "40", "--crop-size", "32", "--augment", "crop,flip", "lens=0.3"])
    assert code == 0 and "2 rows x 3 samples" in capsys.readouterr().out
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.width > 300
    code = main(["augment", str(tmp_path / "missing.png"), "--show", str(tmp_path / "no.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "missing.png" in err and not (tmp_path / "no.png").exists()
