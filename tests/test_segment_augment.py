"""Joint image/mask augmentation (one draw moves image, target and valid alike) and preprocessing."""

from __future__ import annotations

import pytest
import torch

from cnnkit.errors import ConfigError
from cnnkit.segmentation.augment import (
    DEFAULT_AUGMENT,
    AugmentDraw,
    JointAugment,
    dihedral,
    dihedral_inverse,
    elastic_field,
    preprocess,
)
from cnnkit.segmentation.data import IGNORE_INDEX


def _labelled(h: int = 24, w: int = 30, seed: int = 0):
    """An image whose channel 0 holds the mask's classes (0 where unlabelled), a target, a valid region."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 4, (h, w), generator=g)
    target[:3] = IGNORE_INDEX
    valid = torch.ones(h, w, dtype=torch.bool)
    valid[:, -4:] = False
    image = torch.stack([target.clamp(min=0).float(), torch.rand(h, w, generator=g)])
    return image, target, valid


def test_dihedral_group_has_eight_distinct_elements_with_inverses():
    x = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    outs = [dihedral(x, k) for k in range(8)]
    assert len({(tuple(o.shape), tuple(o.flatten().tolist())) for o in outs}) == 8
    assert [tuple(o.shape) for o in outs] == [(5, 7), (7, 5)] * 4
    for k in range(8):
        assert torch.equal(dihedral_inverse(dihedral(x, k), k), x)
    assert torch.equal(dihedral(x, 4), x.flip(-1)) and torch.equal(dihedral(x, 1), x.rot90(1))
    # acts on the last two axes only: channels and batch stay where they are
    batch = torch.rand(2, 3, 5, 7)
    assert torch.equal(dihedral(batch, 6)[1, 2], dihedral(batch[1, 2], 6))


@pytest.mark.parametrize("spec", ["dihedral", "elastic=6:2", "dihedral,elastic=10:3"])
def test_one_draw_moves_image_target_and_valid_alike(spec):
    image, target, valid = _labelled()
    image = torch.cat([image, valid[None].float()])  # channel 2 holds the valid region
    aug = JointAugment.from_spec(spec, image_mode="nearest")
    moved = 0
    for seed in range(4):
        params = aug.draw(torch.Generator().manual_seed(seed), tuple(target.shape))
        out_image, out_target, out_valid = aug.apply(image, target, valid, params)
        assert out_target.dtype == torch.int64 and out_valid.dtype == torch.bool
        assert out_image.shape[1:] == out_target.shape == out_valid.shape
        labelled = out_target != IGNORE_INDEX
        # wherever the new target is a class, the image's copy of the old mask came from the same pixel
        assert torch.equal(out_image[0][labelled], out_target[labelled].float())
        assert (out_image[2][out_valid] == 1).all() and not out_valid[out_image[2] == 0].any()
        moved += out_target.shape != target.shape or not torch.equal(out_target, target)
    assert moved >= 3


def test_elastic_pixels_from_outside_are_ignored_and_invalid():
    image, target, valid = _labelled()
    target[:] = 1
    valid[:] = True
    h, w = target.shape
    aug = JointAugment.from_spec("elastic=1:1")
    shift = torch.zeros(2, h, w)
    shift[1] = 3.0  # every pixel takes the one 3 to its right: the last 3 columns come from outside
    out_image, out_target, out_valid = aug.apply(image, target, valid, AugmentDraw(field=shift))
    assert (out_target[:, -3:] == IGNORE_INDEX).all() and (out_target[:, :-3] == 1).all()
    assert not out_valid[:, -3:].any() and out_valid[:, :-3].all()
    assert torch.allclose(out_image[:, :, :-3], image[:, :, 3:], atol=1e-5)


def test_elastic_with_alpha_zero_is_the_identity():
    image, target, valid = _labelled()
    aug = JointAugment.from_spec("elastic=0:4")
    out = aug(image, target, valid, torch.Generator().manual_seed(0))
    assert torch.allclose(out[0], image, atol=1e-5)
    assert torch.equal(out[1], target) and torch.equal(out[2], valid)


def test_elastic_field_is_smooth_and_scaled_by_alpha():
    field = elastic_field((64, 64), 10.0, 4.0, torch.Generator().manual_seed(0))
    same = elastic_field((64, 64), 1.0, 4.0, torch.Generator().manual_seed(0))
    assert field.shape == (2, 64, 64) and torch.allclose(field, 10 * same)
    rough = elastic_field((64, 64), 10.0, 0.5, torch.Generator().manual_seed(0))
    # smoothing with a larger sigma leaves neighbours more alike (relative to the size of the field)
    def roughness(f):
        return (f[:, 1:] - f[:, :-1]).abs().mean() / f.abs().mean()
    assert roughness(field) < roughness(rough) / 3


def test_same_seed_same_result_and_the_global_rng_is_untouched():
    image, target, valid = _labelled()
    image = image / 4  # in [0, 1]
    aug = JointAugment.from_spec("dihedral,elastic=8:3,intensity=0.2")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = aug(image, target, valid, torch.Generator().manual_seed(7))
    b = aug(image, target, valid, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(torch.get_rng_state(), before)
    draws = {JointAugment.from_spec("dihedral").draw(torch.Generator().manual_seed(s), (4, 4)).k for s in range(40)}
    assert draws == set(range(8))


def test_intensity_changes_the_image_only():
    image, target, valid = _labelled()
    image = image / 4  # in [0, 1]
    aug = JointAugment.from_spec("intensity=0.3")
    g = torch.Generator().manual_seed(1)
    params = aug.draw(g, tuple(target.shape))
    out_image, out_target, out_valid = aug.apply(image, target, valid, params)
    assert torch.equal(out_target, target) and torch.equal(out_valid, valid)
    assert not torch.allclose(out_image, image) and 0 <= out_image.min() and out_image.max() <= 1
    assert params.k is None and params.field is None
    assert 0.3 > abs(params.brightness) and abs(params.contrast - 1) < 0.3


def test_spec_round_trips_and_names_the_valid_ones():
    aug = JointAugment.from_spec(" dihedral , elastic=34:4,intensity=0.1")
    assert aug.spec() == "dihedral,elastic=34:4,intensity=0.1"
    assert JointAugment.from_spec(aug.spec()) == aug
    assert JointAugment.from_spec("elastic").elastic == (34.0, 4.0)
    assert JointAugment.from_spec(DEFAULT_AUGMENT).spec() == DEFAULT_AUGMENT
    identity = JointAugment.from_spec("")
    assert identity.spec() == "none" and JointAugment.from_spec("none") == identity
    image, target, valid = _labelled()
    out = identity(image, target, None, torch.Generator())
    assert torch.equal(out[0], image) and torch.equal(out[1], target) and out[2].all()
    with pytest.raises(ConfigError, match="unknown augmentation 'rotate'.*flip, dihedral, elastic, intensity"):
        JointAugment.from_spec("dihedral,rotate")
    assert JointAugment.from_spec("flip").symmetries() == [0, 4]
    assert JointAugment.from_spec("flip,dihedral").symmetries() == list(range(8))
    assert JointAugment.from_spec("intensity").symmetries() == [0]
    flips = {JointAugment.from_spec("flip").draw(torch.Generator().manual_seed(s), (4, 4)).k for s in range(20)}
    assert flips == {0, 4}
    for bad in ("elastic=3", "elastic=-1:2", "intensity=2", "dihedral=1", "intensity=x"):
        with pytest.raises(ConfigError, match="bad value in --augment"):
            JointAugment.from_spec(bad)
    with pytest.raises(ConfigError, match="twice"):
        JointAugment.from_spec("dihedral,dihedral")


def test_preprocess_standardises_inside_the_valid_region():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 20, 16, generator=g) * torch.tensor([0.2, 0.5, 1.0])[:, None, None] + 0.1
    valid = torch.zeros(20, 16, dtype=torch.bool)
    valid[4:16, 3:13] = True
    image[:, ~valid] = 0.0  # a black surround, as outside a fundus camera's field of view
    out = preprocess(image, valid)
    inside = out[:, valid]
    assert torch.allclose(inside.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(inside.std(1, correction=0), torch.ones(3), atol=1e-4)
    whole = preprocess(image).flatten(1)
    assert torch.allclose(whole.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.equal(preprocess(image, valid, normalize="none"), image)
    with pytest.raises(ConfigError, match="unknown normalisation 'dataset'"):
        preprocess(image, normalize="dataset")
    with pytest.raises(ConfigError, match="unknown contrast enhancement 'hist'"):
        preprocess(image, contrast="hist")


def test_clahe_is_in_range_deterministic_and_raises_low_contrast():
    g = torch.Generator().manual_seed(0)
    image = 0.4 + 0.1 * torch.rand(3, 40, 48, generator=g)  # dim, low contrast
    out = preprocess(image, normalize="none", contrast="clahe")
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, preprocess(image, normalize="none", contrast="clahe"))
    assert out.std() > 2 * image.std()
    small = preprocess(torch.rand(1, 5, 7, generator=g), normalize="none", contrast="clahe")  # fewer tiles
    assert small.shape == (1, 5, 7) and 0 <= small.min() and small.max() <= 1
    both = preprocess(image, normalize="image", contrast="clahe")
    assert torch.allclose(both.flatten(1).mean(1), torch.zeros(3), atol=1e-5)


def test_intensity_refuses_a_standardised_image():
    image, target, valid = _labelled()
    with pytest.raises(ValueError, match="augment, then preprocess"):
        JointAugment.from_spec("intensity=0.1")(preprocess(image / 4), target, valid, torch.Generator())
