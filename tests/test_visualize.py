"""Pictures: receptive fields (analytic vs gradient twin), filter grids, dense maps, and the PNGs themselves."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnkit.analysis.visualize import (
    contrast_normalise,
    default_map_layer,
    dense_scores,
    filter_grid,
    grid_columns,
    input_gradient,
    receptive_field,
    render_all,
    tile_images,
)
from cnnkit.cli import main
from cnnkit.errors import ConfigError, UnsupportedLayerError
from cnnkit.models import create
from cnnkit.train.checkpoint import Checkpoint, save_checkpoint


def linearised(model: nn.Module) -> nn.Module:
    """The slow twin's network: every weight 1, no bias, ReLU -> identity, max -> average pooling.

    Every path from input to unit then carries a positive weight, so the unit's input gradient is
    nonzero exactly on its receptive field.
    """
    model = copy.deepcopy(model).double()
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() > 1 else p.zero_()
    return model


def gradient_box(model, layer, unit, size=32):
    grad = input_gradient(linearised(model), torch.rand(1, size, size, dtype=torch.float64), layer, unit)
    rows, cols = torch.nonzero(grad != 0, as_tuple=True)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


@pytest.mark.parametrize("options", [{}, {"stride": 2}, {"padding": 2}, {"kernel_size": 3, "channels": [4, 4, 4]}])
def test_receptive_field_equals_the_support_of_the_input_gradient(options):
    model = create("small_cnn", **options)
    for layer in [n for n, _ in model.features.named_children()]:
        c, h, w = model.features[: list(dict(model.features.named_children())).index(layer) + 1](
            torch.zeros(1, 1, 32, 32)).shape[1:]
        for y, x in {(0, 0), (h - 1, w - 1), (h // 2, w // 3)}:
            top, bottom, left, right = receptive_field(model, layer, (y, y), (x, x))
            clipped = (max(top, 0), min(bottom, 31), max(left, 0), min(right, 31))
            assert gradient_box(model, layer, (c - 1, y, x)) == clipped, (layer, y, x)


def test_receptive_field_known_sizes():
    net = create("small_cnn")  # conv5 - pool2 - conv5 - pool2: 5, 6, 14, 16
    sizes = {layer: receptive_field(net, layer, (0, 0), (0, 0)) for layer in ("conv1", "pool1", "conv2", "pool2")}
    assert {k: (b - t + 1, r - l + 1) for k, (t, b, l, r) in sizes.items()} == \
        {"conv1": (5, 5), "pool1": (6, 6), "conv2": (14, 14), "pool2": (16, 16)}
    assert receptive_field(net, "pool2", (1, 1), (2, 2)) == (4, 19, 8, 23)  # total stride 4
    lenet = create("lenet5")
    t, b, _, _ = receptive_field(lenet, "c5", (0, 0), (0, 0))
    assert b - t + 1 == 32  # LeNet-5's C5 sees the whole 32 x 32 input
    with pytest.raises(UnsupportedLayerError, match="'fc3' comes after the fully connected part"):
        receptive_field(net, "fc3", (0, 0), (0, 0))
    with pytest.raises(ConfigError, match="no layer named 'conv7'"):
        receptive_field(net, "conv7", (0, 0), (0, 0))


def test_gradient_of_a_trained_like_net_stays_inside_the_field():
    torch.manual_seed(0)
    net = create("small_cnn")
    image = torch.rand(1, 32, 32)
    grad = input_gradient(net, image, "conv2", (3, 5, 4))
    top, bottom, left, right = receptive_field(net, "conv2", (5, 5), (4, 4))
    outside = grad.clone()
    outside[top:bottom + 1, left:right + 1] = 0
    assert grad.abs().sum() > 0 and outside.abs().sum() == 0
    with pytest.raises(ConfigError, match="outside layer 'conv2'"):
        input_gradient(net, image, "conv2", (0, 10, 0))


def test_filter_grid_layout_normalisation_and_colour():
    w = torch.randn(96, 3, 11, 11)
    w[0] = 0
    w[0, 0] = torch.linspace(-1, 1, 121).reshape(11, 11)  # a pure red ramp
    grid = filter_grid(w, scale=1)
    assert grid.shape == (1 + 8 * 12, 1 + 12 * 12, 3)  # 12 x 8 tiles of 11 px with 1 px gaps, as AlexNet's figure
    tile0 = grid[1:12, 1:12]
    assert tile0[..., 0].min() == 0 and tile0[..., 0].max() == 255  # the red channel spans the range
    assert (tile0[..., 1:] == 128).all()  # green and blue sit at the filter's zero, mid-grey
    for i in range(96):  # every filter is stretched to the full range on its own
        r, c = divmod(i, 12)
        tile = grid[1 + r * 12:12 + r * 12, 1 + c * 12:12 + c * 12]
        assert tile.min() == 0 and tile.max() == 255
    assert filter_grid(torch.randn(16, 1, 5, 5)).shape == (225, 225, 3)  # 4 x 4 tiles of 5 + 1 px, 9x: (1 + 24) * 9
    assert torch.equal(contrast_normalise(torch.ones(2, 3)), torch.full((2, 3), 0.5))
    assert [grid_columns(n) for n in (16, 32, 96)] == [4, 8, 12]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_dense_scores_equal_the_classifier_on_each_tile(dtype, atol):
    torch.manual_seed(0)
    net = create("small_cnn").to(dtype).eval()
    tiles = torch.rand(6, 1, 32, 32, dtype=dtype)
    mean = torch.rand(1, 32, 32, dtype=dtype) * 0.1
    scores = dense_scores(net, tile_images(tiles, 2, 3), mean=mean, mean_mode="tile")  # (10, 9, 17)
    assert scores.shape == (10, 9, 17) and scores.dtype == dtype  # (64-32)/4+1, (96-32)/4+1
    with torch.no_grad():
        expected = net(tiles - mean).softmax(1)
    got = scores[:, ::8, ::8].permute(1, 2, 0).reshape(6, 10)  # the windows that are exactly one tile
    assert torch.allclose(got, expected, atol=atol, rtol=0)
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(ConfigError, match="smaller than the network's input"):
        dense_scores(net, torch.rand(1, 20, 40))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An (untrained) small_cnn checkpoint for digits: the pictures do not need a trained net."""
    torch.manual_seed(0)
    net = create("small_cnn", num_classes=10, in_chans=1)
    path = tmp_path_factory.mktemp("vis") / "net.safetensors"
    save_checkpoint(path, Checkpoint(model_name="small_cnn", model_options=net.model_options,
                                     model_state=net.state_dict(), classes=[str(i) for i in range(10)],
                                     mean_image=torch.full((1, 32, 32), 0.3),
                                     meta={"config": {"data": "digits", "val_fraction": 0.2, "seed": 0},
                                           "input_size": [32, 32], "channels": 1}))
    return path


def assert_picture(path, min_width, min_height):
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert image.shape[1] >= min_width and image.shape[0] >= min_height, image.shape
    assert image.std() > 20, f"{path} looks blank (pixel std {image.std():.1f})"


def test_render_all_writes_four_pictures(checkpoint, tmp_path):
    results = render_all(checkpoint, tmp_path, device="cpu")
    assert set(results) == {"filters", "maps", "rf", "dense"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.png", "filters.png", "maps.png", "rf.png"]
    assert_picture(tmp_path / "filters.png", 225, 225)  # 16 filters 5x5 at 9x: 4 x 4 grid
    assert_picture(tmp_path / "maps.png", 600, 300)
    assert_picture(tmp_path / "rf.png", 600, 300)
    assert_picture(tmp_path / "dense.png", 400, 400)
    assert results["maps"]["layer"] == "conv2" and results["maps"]["maps"] == 32
    assert results["rf"]["size"] == [14, 14]
    t, b, l, r = results["rf"]["box"]
    rows_min, cols_min, rows_max, cols_max = results["rf"]["gradient_support"]
    assert t <= rows_min <= rows_max <= b and l <= cols_min <= cols_max <= r
    assert results["dense"]["score_map"] == [17, 17] and results["dense"]["stride"] == [4, 4]


def test_default_map_layer_picks_a_layer_with_real_maps():
    assert default_map_layer(create("small_cnn")) == "conv2"
    assert default_map_layer(create("lenet5")) == "c3"  # c5's maps are 1 x 1


def test_cli_visualize_and_its_errors(checkpoint, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70)) * 255).astype(np.uint8)).save(image)
    code = main(["visualize", str(checkpoint), "--out", str(tmp_path / "v"), "--what", "rf,dense", "--layer",
                 "pool1", "--unit", "2,3,4", "--image", str(image), "--dense-image", str(image)])
    out = capsys.readouterr().out
    assert code == 0 and "unit (2, 3, 4) of pool1: receptive field 6x6 at rows 6..11, columns 8..13" in out
    assert "score map 5x10, stride 4" in out  # (50-32)/4+1, (70-32)/4+1
    assert_picture(tmp_path / "v" / "rf.png", 600, 300)
    for argv, fragment in [
        (["visualize", checkpoint, "--layer", "conv9"], "no layer named 'conv9'"),
        (["visualize", checkpoint, "--what", "filters,colours"], "unknown picture 'colours'"),
        (["visualize", checkpoint, "--what", "rf", "--layer", "fc3"], "fully connected"),
        (["visualize", checkpoint, "--what", "rf", "--unit", "99,0,0"], "outside layer"),
        (["visualize", tmp_path / "none.safetensors"], "does not exist"),
    ]:
        code = main([str(a) for a in argv] + ["--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not list((tmp_path / "bad").glob("*.tmp"))
