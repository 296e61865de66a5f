"""Test-time protocols: the published crop geometry, dense multi-scale evaluation against a sliding-window
twin, model averaging, and the accuracy gain of 10-crop and multi-scale over one central crop."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cnnkit.cli import main
from cnnkit.data.augment import parse_augment
from cnnkit.errors import ConfigError
from cnnkit.models.base import ClassifierNet
from cnnkit.train.engine import train_one_epoch
from cnnkit.train.runner import TrainConfig, fit
from cnnkit.train.tta import (
    Predictor,
    average_posteriors,
    evaluate_predictors,
    smaller_side_size,
    ten_crop,
    ten_crop_offsets,
)


def test_ten_crop_offsets_are_the_corners_then_the_centre():
    assert ten_crop_offsets((256, 256), (224, 224)) == [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    assert ten_crop_offsets((256, 341), (227, 227)) == [(0, 0), (0, 114), (29, 0), (29, 114), (14, 57)]
    with pytest.raises(ConfigError, match="--load-size"):
        ten_crop_offsets((200, 200), (224, 224))


def test_ten_crop_views_are_the_crops_then_their_mirrors():
    x = torch.rand(2, 3, 9, 11)
    views = ten_crop(x, (6, 7))
    assert views.shape == (2, 10, 3, 6, 7)
    for k, (t, l) in enumerate([(0, 0), (0, 4), (3, 0), (3, 4), (1, 2)]):
        assert torch.equal(views[:, k], x[:, :, t : t + 6, l : l + 7])
        assert torch.equal(views[:, 5 + k], x[:, :, t : t + 6, l : l + 7].flip(-1))


def test_smaller_side_size():
    assert smaller_side_size((256, 341), 384) == (384, 512)  # 341 * 1.5 = 511.5, rounded half up
    assert smaller_side_size((300, 200), 256) == (384, 256)


def small_net(size=16, classes=10, channels=1, padding=1):
    """conv-pool-conv-pool then two FC layers reading the last map: fully convolutional by FC -> conv."""
    features = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2))
    m = size // 4 if padding else ((size - 2) // 2 - 2) // 2
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * m * m, 64), nn.ReLU(), nn.Linear(64, classes))
    return ClassifierNet(features, classifier, (channels, size, size))


def test_multiscale_is_the_softmax_of_the_window_average_and_center_of_the_native_size():
    torch.manual_seed(0)
    net, mean = small_net(padding=0), torch.rand(1, 16, 16) * 0.1  # no padding: windows see what the FCN sees
    x = torch.rand(3, 1, 24, 28)
    dense = Predictor(net, mean, (16, 16), mode="multiscale", scales=[24], flip=False)(x)
    # slow twin: the patch classifier on every window at the network's total stride (4), scores averaged
    mean_full = F.interpolate(mean[None], size=(24, 28), mode="bilinear", align_corners=False, antialias=True)[0]
    offsets = [(t, l) for t in range(0, 9, 4) for l in range(0, 13, 4)]  # a 3 x 4 map of class scores
    scores = torch.stack([net((x - mean_full)[:, :, t : t + 16, l : l + 16]) for t, l in offsets]).mean(0)
    torch.testing.assert_close(dense, F.softmax(scores, 1), atol=1e-6, rtol=0)
    # at the native size, with flips off, multi-scale is the central crop
    y = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(Predictor(net, mean, (16, 16), mode="multiscale", scales=[16], flip=False)(y),
                               Predictor(net, mean, (16, 16), mode="center")(y), atol=1e-6, rtol=0)


def test_model_averaging_averages_posteriors():
    torch.manual_seed(0)
    a, b = Predictor(small_net(), None, (16, 16)), Predictor(small_net(), None, (16, 16))
    x = torch.rand(4, 1, 20, 20)
    torch.testing.assert_close(average_posteriors([a, b], x), (a(x) + b(x)) / 2)
    with pytest.raises(ConfigError, match="--scales"):
        Predictor(small_net(), None, (16, 16), mode="multiscale")
    with pytest.raises(ConfigError, match="smaller than"):
        Predictor(small_net(), None, (16, 16), mode="multiscale", scales=[12])


# ---------------------------------------------------------------------- accuracy on a small trained model

DIGIT, CANVAS, INPUT = 12, 28, 16


def digits_on_canvas(images, generator, centred):
    """Each 12 x 12 digit pasted on a black 28 x 28 canvas: centred (training) or anywhere (held out)."""
    n = len(images)
    out = torch.zeros(n, 1, CANVAS, CANVAS)
    pos = torch.randint(0, CANVAS - DIGIT + 1, (n, 2), generator=generator)
    if centred:
        pos[:] = (CANVAS - DIGIT) // 2
    for i, (t, l) in enumerate(pos.tolist()):
        out[i, :, t : t + DIGIT, l : l + DIGIT] = images[i]
    return out


SEEDS = (0, 1, 2)


def train_small_net(seed: int):
    """A small net trained (cnnkit's engine, random 16 x 16 crops and flips) on digits centred on their
    canvas, like objects in photos; held-out digits sit anywhere, so a central crop often cuts them."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=(DIGIT, DIGIT), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    train, held = order[:1400], order[1400:]
    x_train, x_held = digits_on_canvas(x[train], g, True), digits_on_canvas(x[held], g, False)
    net = small_net()
    mean = torch.full((1, INPUT, INPUT), float(x_train.mean()))  # per-channel mean
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    augment = parse_augment("crop,flip", (INPUT, INPUT))
    for epoch in range(25):
        loader = DataLoader(TensorDataset(x_train, y[train]), batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(1000 * seed + epoch))
        train_one_epoch(net, loader, optimizer, device=torch.device("cpu"), num_classes=10, mean=mean,
                        augment=augment, generator=torch.Generator().manual_seed(1000 * seed + 100 + epoch))
    return net, mean, DataLoader(TensorDataset(x_held, y[held]), batch_size=128)


def held_out_accuracy(trained, mode, scales=()):
    net, mean, loader = trained
    return evaluate_predictors([Predictor(net, mean, (INPUT, INPUT), mode=mode, scales=scales)], loader, 10)[0]["acc1"]


@pytest.mark.slow
def test_ten_crop_and_multiscale_beat_one_central_crop():
    # One training run is a noisy sample: its float path (CPU kind, thread count) moves a single run's
    # gains between +0.02 and +0.22 (measured over seeds 0-5 on two machines: centre 0.46-0.55, 10-crop
    # +0.02..+0.22, multi-scale +0.05..+0.22). The mean gain of 3 independently seeded nets is asserted,
    # with the margin of 0.06 (half the mean gain measured).
    gains = {"10crop": [], "multiscale": []}
    for seed in SEEDS:
        trained = train_small_net(seed)
        center = held_out_accuracy(trained, "center")
        ten = held_out_accuracy(trained, "10crop")
        multi = held_out_accuracy(trained, "multiscale", (CANVAS - 4, CANVAS, CANVAS + 4))
        print(f"seed {seed} held-out top-1: center {center:.4f}, 10-crop {ten:.4f}, multi-scale {multi:.4f}")
        assert center > 0.4  # the model did learn
        gains["10crop"].append(ten - center)
        gains["multiscale"].append(multi - center)
    assert sum(gains["10crop"]) / len(SEEDS) > 0.06, gains
    assert sum(gains["multiscale"]) / len(SEEDS) > 0.06, gains


# ---------------------------------------------------------------------- the eval command


@pytest.mark.slow
def test_cli_eval_protocols_and_model_averaging(tmp_path, capsys):
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        fit(TrainConfig(out=str(out), epochs=1, seed=seed, load_size=(36, 36), augment="crop,flip"))
        runs.append(out / "last.safetensors")
    capsys.readouterr()  # the runs' progress lines (a console handler from an earlier main() may show them)
    results = {}
    for name, extra in [("center", []), ("10crop", ["--tta", "10crop"]),
                        ("multiscale", ["--tta", "multiscale", "--scales", "36", "40"]),
                        ("average", ["--tta", "10crop", "--average", runs[1]])]:
        code = main([str(a) for a in ["eval", runs[0], "--json", *extra]])
        out, err = capsys.readouterr()
        assert code == 0, err
        results[name] = json.loads(out)
    assert results["center"]["protocol"] == "center" and results["center"]["load_size"] == [36, 36]
    assert results["multiscale"]["scales"] == [36, 40]
    assert results["average"]["averaged_with"] == [str(runs[1])]
    for r in results.values():
        assert r["images"] == 359 and r["acc1"] > 0.3 and r["err1"] == pytest.approx(1 - r["acc1"])
    code = main(["eval", str(runs[0]), "--tta", "multiscale"])
    assert code == 2 and "--scales" in capsys.readouterr().err
