"""cnnkit.analysis.summary against slow, obvious twins, and the `cnnkit models` / `cnnkit summary` CLI."""

import csv
import io
import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnkit.analysis import summary
from cnnkit.cli import main
from cnnkit.errors import ConfigError
from cnnkit.models import create, list_models


def meta(name: str, **opts) -> nn.Module:
    with torch.device("meta"):
        return create(name, **opts)


# ---- receptive field and total stride: the twin is autograd's support of one output unit -------


def support(net: nn.Module, size: tuple[int, int, int], unit: tuple[int, int]) -> tuple[tuple, tuple]:
    """Extent (h, w) and top-left corner of the input pixels that reach output ``unit``."""
    x = torch.rand(1, *size, dtype=torch.float64, requires_grad=True)
    y = net(x)
    y = y.reshape(1, -1, 1, 1) if y.dim() == 2 else y
    y[0, :, unit[0], unit[1]].sum().backward()
    mask = x.grad[0].abs().sum(0) > 0  # (H, W)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return (int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)), (int(rows[0]), int(cols[0]))


def positive(net: nn.Module) -> nn.Module:
    """Positive weights and inputs keep every ReLU open, so no path to the output is cut."""
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.abs() + 0.01)
    return net


def chain(pool=nn.AvgPool2d):
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(3, 3, 5, 2, 2), pool(3, 2),
        nn.Conv2d(3, 3, 3, padding=2, dilation=2), pool(2, 2),
        nn.Conv2d(3, 2, (3, 5), stride=(1, 2)),
    )


class Branches(nn.Module):
    """Inception-like: 1x1 | 3x3 -> 5x5, concatenated, then a strided 3x3."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.b = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 5, padding=2))
        self.out = nn.Conv2d(4, 2, 3, stride=2)

    def forward(self, x):
        return self.out(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))  # (B, 4, H, W) -> (B, 2, H', W')


class Buffer(Branches):
    """The same branches written into a preallocated tensor instead of torch.cat."""

    def forward(self, x):
        out = x.new_zeros(x.shape[0], 4, *x.shape[2:])  # (B, 4, H, W)
        out[:, :2] = self.a(x)
        out[:, 2:] = self.b(x)
        return self.out(torch.relu(out))


@pytest.mark.parametrize("make", [chain, Branches, Buffer], ids=["chain", "branches", "buffer"])
def test_receptive_field_and_stride_match_autograd_support(make):
    torch.manual_seed(0)
    net = positive(make()).eval()
    size = (2, 96, 96)
    last = summary(net, size).rows[-1]
    out = net(torch.zeros(1, *size, dtype=torch.float64))
    i, j = out.shape[2] // 2, out.shape[3] // 2  # an interior unit: its window is not clipped
    extent, corner = support(net, size, (i, j))
    _, right = support(net, size, (i, j + 1))
    _, below = support(net, size, (i + 1, j))
    assert last.receptive_field == extent
    assert last.total_stride == (below[0] - corner[0], right[1] - corner[1])


def test_max_pooling_has_the_geometry_of_average_pooling():
    assert summary(chain(nn.MaxPool2d), (2, 64, 64)).rows[-1].receptive_field == \
        summary(chain(nn.AvgPool2d), (2, 64, 64)).rows[-1].receptive_field == (47, 63)


def test_fc_layer_sees_the_whole_map_it_reads():
    torch.manual_seed(0)
    net = positive(create("lenet5")).eval()
    s = summary(net, (1, 32, 32))
    assert [s.row(n).receptive_field[0] for n in ("c1", "s2", "c3", "s4", "c5", "f6", "output")] == \
        [5, 6, 14, 16, 32, 32, 32]
    assert s.row("output").total_stride == (4, 4)
    assert support(net, (1, 32, 32), (0, 0))[0] == (32, 32)
    # AlexNet's fc6 reads 6x6 maps of stride 32: 195 + 5 * 32
    assert summary(meta("alexnet"), (3, 227, 227)).row("fc6").receptive_field == (355, 355)


# ---- MACs: the twin is PyTorch's own FlopCounterMode ----------------------------------------------


@pytest.mark.parametrize("name", ["alexnet", "googlenet", "nin", "vgg_c", "overfeat_accurate", "lenet5"])
def test_macs_agree_with_torch_flop_counter(name):
    net = meta(name)
    s = summary(net, net.input_size)
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, *net.input_size, device="meta"))
    assert s.flops == counter.get_total_flops() == 2 * s.macs


def test_rows_neurons_params_and_totals():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4, bias=False),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    s = summary(net, (3, 8, 8))
    conv1, _, conv2, _, fc = s.rows
    assert conv1.output_shape == (8, 6, 6) and conv1.neurons == 288 and conv1.params == 8 * 27 + 8
    assert conv1.macs == 288 * 27 and conv1.weights == 8 * 27
    assert conv2.macs == 8 * 4 * 4 * 2 * 9 and conv2.params == conv2.weights == 8 * 2 * 9
    assert fc.macs == 128 * 5 and fc.receptive_field == (8, 8) and conv1.kernel == "3x3/1"
    assert s.total_params == sum(p.numel() for p in net.parameters())
    assert s.macs == sum(r.macs for r in s.rows) and s.flops == 2 * s.macs
    assert s.neurons == 288 + 128 + 5  # layers with weights only


def test_collapse_repeated_modules_and_unknown_layers(caplog):
    class Scale(nn.Module):  # a weighted layer the summary has no rule for
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.w

    class Counted(Scale):
        def count_macs(self, x, y):
            return y[0].numel()

    shared = nn.Conv2d(2, 2, 3, padding=1)
    net = nn.Sequential(shared, Scale(), shared, Counted())
    with caplog.at_level(logging.WARNING):
        s = summary(net, (2, 5, 5))
    assert s.names() == ["0", "1", "0#2", "3"]
    assert s.total_params == 2 * 2 * 9 + 2 + 1 + 1  # the shared conv counted once
    assert s.rows[1].macs == 0 and "no MAC rule for Scale" in caplog.text
    assert s.rows[3].macs == 50
    assert s.rows[2].receptive_field == (5, 5)

    grouped = summary(meta("googlenet"), (3, 224, 224), collapse=["features.inception_3a"])
    row = grouped.row("inception_3a")
    assert row.params == 163_328 + 368 and row.output_shape == (256, 28, 28)
    assert not any(r.name.startswith("features.inception_3a.") for r in grouped.rows)
    assert any(r.name.startswith("features.inception_3b.") for r in grouped.rows)
    with pytest.raises(ConfigError, match="cannot collapse"):
        summary(meta("googlenet"), (3, 224, 224), collapse=["features.nope"])


def test_model_state_is_restored_and_errors_are_one_line():
    net = create("lenet5").double().train()
    s = summary(net, (1, 32, 32))
    assert net.training and s.rows[0].output_shape == (6, 28, 28)
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ConfigError, match="does not run on an input of size"):
        summary(net, (1, 8, 8))
    with pytest.raises(ConfigError, match="input size must be positive"):
        summary(net, (1, 0, 32))


def test_table_csv_and_json():
    s = summary(meta("alexnet"), (3, 227, 227))
    compact, full = s.to_table(), s.to_table(compact=False)
    assert "relu1" not in compact and "relu1" in full and "conv1" in compact
    assert "MACs 724,406,816" in compact and "FLOPs (2 x MACs) 1.449 G" in compact
    rows = list(csv.DictReader(io.StringIO(s.to_csv())))
    assert len(rows) == len(s.rows) and sum(int(r["macs"]) for r in rows) == 724_406_816
    assert rows[0]["receptive_field"] == "11x11" and rows[0]["output_shape"] == "96x55x55"
    doc = json.loads(s.to_json())
    assert doc["totals"] == {"params": 60_965_224, "macs": 724_406_816, "flops": 1_448_813_632,
                             "neurons": 659_272}
    assert doc["rows"][0]["flops"] == 2 * doc["rows"][0]["macs"]


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert f"\n{name} " in out
    assert "Krizhevsky et al. 2012" in out and "60,965,224" in out and "ceil" in out
    assert main(["models", "vgg_*", "--format", "json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == list_models("vgg_*")
    assert main(["models", "cnn_*", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["name"] for r in rows] == list_models("cnn_*") and rows[0]["params"] == "60834536"
    assert main(["models", "resnet*"]) == 2
    assert capsys.readouterr().err.startswith("error: no model matches 'resnet*'")


def test_cli_summary_googlenet_shows_table1_and_marks_disagreements(capsys):
    assert main(["summary", "googlenet"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for row in ("conv1", "inception_4c", "inception_5a"):
        assert "!" in lines[row], row
    for row in ("conv2", "inception_3a", "inception_4b", "fc"):
        assert "!" not in lines[row], row
    assert "2.7" in lines["conv1"] and "9.19" in lines["conv1"] and "1,072" in lines["inception_5a"]
    assert "1.583 G" in out


def test_cli_summary_alexnet_shows_lecture_neurons(capsys):
    assert main(["summary", "alexnet"]) == 0
    out = capsys.readouterr().out
    conv1 = next(line for line in out.splitlines() if line.startswith("conv1 "))
    assert "253,440" in conv1 and "290,400" in conv1 and "!" in conv1
    conv2 = next(line for line in out.splitlines() if line.startswith("conv2 "))
    assert conv2.count("186,624") == 3 and "!" not in conv2


def test_cli_summary_options_and_files(tmp_path, capsys):
    out = tmp_path / "vgg.json"
    assert main(["summary", "vgg_d", "--format", "json", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["totals"]["macs"] == 15_470_264_320
    assert main(["summary", "alexnet", "-o", "groups=1", "--format", "csv"]) == 0
    assert "62378344" not in capsys.readouterr().out  # rows only; the total is in JSON
    assert main(["summary", "alexnet", "-o", "groups=1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["params"] == 62_378_344
    assert main(["summary", "googlenet", "--input", "3x288x288", "--fully-convolutional"]) == 0
    text = capsys.readouterr().out  # 288 = 224 + 2 * 32: a 3 x 3 map of scores
    assert "1000x3x3" in text and "params K" not in text  # no paper columns off-size
    assert main(["summary", "googlenet", "--input", "3x256x256"]) == 2
    assert "add --fully-convolutional" in capsys.readouterr().err
    assert main(["summary", "nin", "--input", "320", "--num-classes", "10", "--all-layers"]) == 0
    assert "10x4x4" in capsys.readouterr().out  # 320 gives 10 x 10 maps before the 6x6/1 average


@pytest.mark.parametrize("argv,message", [
    (["summary", "alexnett"], "unknown model 'alexnett'"),
    (["summary", "alexnet", "--input", "3xbig"], "--input '3xbig' is not a size"),
    (["summary", "alexnet", "--input", "3x64x64"], "does not run on an input of size (3, 64, 64)"),
    (["summary", "alexnet", "-o", "groups"], "--option 'groups' must be KEY=VALUE"),
    (["summary", "alexnet", "-o", "colour=red"], "bad option for model 'alexnet'"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    target = tmp_path / "out.txt"
    assert main([*argv, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not target.exists()
