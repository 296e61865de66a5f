"""Patch nets: exact parameter counts, the papers' windows, dense == patch by patch, and a user's own net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.analysis import summary
from cnnkit.cli import main
from cnnkit.dense import densify, patch_by_patch
from cnnkit.errors import CnnkitError, ConfigError, UnsupportedLayerError
from cnnkit.models import PATCH_NETS, create, create_patch_net, model_info


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# weights + biases, by hand: conv k x k, c -> n: c*n*k*k + n; FC f -> n: f*n + n
PARAMS = [
    # 1*4*4+4 + 4*8*4+8 + 8*2*4+2
    ("toy", {}, 20 + 136 + 66),
    # 1*32*49+32 + 32*64*36+64 + 64*128*25+128
    ("descriptor", {}, 1_600 + 73_792 + 204_928),
    # 3*16*9+16 + 16*16*9+16 + 16*32*9+32 + 32*32*9+32 + (32*4*4)*64+64 + 64*2+2; 28 -> 24 -> 12 -> 8 -> 4
    ("segment", {}, 448 + 2_320 + 4_640 + 9_248 + 32_832 + 130),
    # width 2, patch 18: 3*2*9+2 + 2*2*9+2 + 2*4*9+4 + 4*4*9+4 + (4*1*1)*8+8 + 8*2+2; 18 -> 14 -> 7 -> 3 -> 1
    ("segment", {"width": 2, "patch": 18}, 56 + 38 + 76 + 148 + 40 + 18),
    # 1*48*16+48 + 48*48*25+48 + 48*48*16+48 + (48*5*5)*200+200 + 200*2+2
    ("ciresan_n1", {}, 816 + 57_648 + 36_912 + 240_200 + 402),
    ("ciresan_n2", {}, 816 + 57_648 + 36_912 + 240_200 + 402),
    ("ciresan_n3", {}, 816 + 57_648 + 36_912 + 240_200 + 402),
    # 1*48*16+48 + 48*48*25+48 + 2 x (48*48*16+48) + (48*3*3)*200+200 + 200*2+2
    ("ciresan_n4", {}, 816 + 57_648 + 2 * 36_912 + 86_600 + 402),
    # 3*64*9+64 + 64*64*9+64 + 64*128*9+128 + 128*128*9+128 + (128*3*3)*512+512 + 512*512+512 + 512*2+2
    ("liskowski", {}, 1_792 + 36_928 + 73_856 + 147_584 + 590_336 + 262_656 + 1_026),
    # width 0.25: widths 16, 32, 128
    ("liskowski", {"width": 0.25}, 448 + 2_320 + 4_640 + 9_248 + 36_992 + 16_512 + 258),
]


@pytest.mark.parametrize("name,opts,expected", PARAMS, ids=[f"{n}{o or ''}" for n, o, _ in PARAMS])
def test_parameter_counts_by_hand(name, opts, expected):
    with torch.device("meta"):
        model, _ = create_patch_net(name, **opts)
    assert n_params(model) == expected
    if not opts:
        assert model_info(name).reference_params == expected


def test_ciresan_windows_and_maps():
    """N1-N3 read 65 x 65 windows and end in 48 maps of 5 x 5; N4 reads 95 x 95 and ends in 3 x 3, and
    its FC 200 sees exactly the whole window (receptive field 95)."""
    assert [create_patch_net(f"ciresan_n{i}")[1] for i in (1, 2, 3, 4)] == [(65, 65)] * 3 + [(95, 95)]
    for i in (1, 2, 3):
        model = create(f"ciresan_n{i}")
        assert model.fc4.in_features == 48 * 5 * 5 and model.fc5.out_features == 2
        assert [m.kernel_size for m in model if isinstance(m, nn.Conv2d)] == [(4, 4), (5, 5), (4, 4)]
    n4 = create("ciresan_n4")
    assert [m.kernel_size for m in n4 if isinstance(m, nn.Conv2d)] == [(4, 4), (5, 5), (4, 4), (4, 4)]
    assert {m.out_channels for m in n4 if isinstance(m, nn.Conv2d)} == {48}
    assert n4.fc5.in_features == 48 * 3 * 3 and n4.fc5.out_features == 200
    s = summary(n4, (1, 95, 95))
    assert s.row("pool4").output_shape == (48, 3, 3) and s.row("fc5").receptive_field == (95, 95)


def test_liskowski_layers():
    model, patch = create_patch_net("liskowski")
    assert patch == (27, 27) and model.input_size == (3, 27, 27)
    assert [m.out_channels for m in model if isinstance(m, nn.Conv2d)] == [64, 64, 128, 128]
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [512, 512, 2]
    assert [m.p for m in model if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert model.fc5.in_features == 128 * 3 * 3  # 27 -> 25 -> 23 -> 11 -> 9 -> 7 -> 3
    with pytest.raises(ConfigError, match="width"):
        create("liskowski", width=0)


# big nets with smaller options, so that the float64 runs stay quick
SMALL = {"descriptor": {"num_classes": 8}, "liskowski": {"width": 0.25}, "segment": {"width": 4}}


@pytest.mark.parametrize("name", PATCH_NETS)
def test_dense_equals_patch_by_patch(name):
    torch.manual_seed(0)
    model, patch = create_patch_net(name, **SMALL.get(name, {}))
    assert patch == model.patch_size and model.input_size == (model.input_size[0], *patch)
    model = model.double().eval()
    x = torch.randn(1, model.input_size[0], 3, 2, dtype=torch.float64)  # N4: 121 M MACs per patch
    # dilated: "auto" would also time the other layout (the float64 N4 dense pass alone takes seconds)
    dense = densify(model, patch, border="replicate", mode="dilated")(x)
    torch.testing.assert_close(dense, patch_by_patch(model, x, patch, border="replicate"), rtol=1e-10, atol=1e-10)
    # and the patch net itself trains: every parameter gets a gradient
    y = model(torch.randn(3, *model.input_size, dtype=torch.float64))
    (y * torch.randn_like(y)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


USER_NETS = '''
from torch import nn


def build(num_classes=2, width=3):
    """8 -> 6 -> 3 -> 1; takes no in_chans (one channel)."""
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(width, num_classes, 3),
                         nn.Flatten()), 8


def square(in_chans=1, **options):
    return build(**options)[0], (8, 8)


def padded():
    model = nn.Sequential()
    model.add_module("pad_conv", nn.Conv2d(1, 2, 3, padding=1))
    model.add_module("conv", nn.Conv2d(2, 2, 5))
    model.add_module("flatten", nn.Flatten())
    return model, 5


def no_patch():
    return nn.Conv2d(1, 1, 3)


def zero_patch():
    return nn.Conv2d(1, 1, 3), 0
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_patch_nets.py").write_text(USER_NETS)
    (tmp_path / "broken_patch_nets.py").write_text("def build(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_patch_nets"


def test_user_net_from_module_and_function(user_module):
    model, patch = create_patch_net(f"{user_module}:build", num_classes=3, in_chans=1, width=4)
    assert patch == (8, 8) and model.patch_size == (8, 8)
    assert model[0].out_channels == 4 and model[3].out_channels == 3
    assert model.model_name == "my_patch_nets:build" and model.model_options == {"num_classes": 3, "width": 4}
    model = model.double().eval()
    x = torch.randn(1, 1, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(densify(model, patch)(x), patch_by_patch(model, x, patch), rtol=1e-10, atol=1e-10)
    model, patch = create_patch_net(f"{user_module}:square", in_chans=1)
    assert patch == (8, 8) and model.model_options == {"in_chans": 1}  # **options takes everything


@pytest.mark.parametrize("spec,opts,message", [
    ("my_patch_nets", {}, "unknown patch net 'my_patch_nets'"),
    ("my_patch_nets:", {}, "is not package.module:function"),
    ("my-nets:build", {}, "is not package.module:function"),
    ("my_patch_nets:build:x", {}, "is not package.module:function"),
    ("no_such_module_here:build", {}, "cannot import 'no_such_module_here'"),
    ("broken_patch_nets:build", {}, "cannot import 'broken_patch_nets' (SyntaxError"),
    ("my_patch_nets:missing", {}, "has no function 'missing'"),
    ("my_patch_nets:no_patch", {}, "returned Conv2d"),
    ("my_patch_nets:zero_patch", {}, "patch size 0"),
    ("my_patch_nets:build", {"colour": 1}, "takes no option 'colour'"),
    ("lenet5", {}, "'lenet5' is not a patch net"),
])
def test_user_net_errors_are_one_line(user_module, spec, opts, message):
    with pytest.raises(CnnkitError) as info:
        create_patch_net(spec, **opts)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_zero_padding_in_a_user_net_is_refused_by_name(user_module):
    model, patch = create_patch_net(f"{user_module}:padded")
    with pytest.raises(UnsupportedLayerError, match="layer 'pad_conv': zero padding inside the patch net"):
        densify(model, patch)


def test_cli_lists_and_summarises_patch_nets(capsys):
    assert main(["models", "ciresan_*"]) == 0
    out = capsys.readouterr().out
    assert "ciresan_n4" in out and "1x95x95" in out and "219,290" in out
    assert main(["summary", "ciresan_n4"]) == 0
    assert "pool4" in capsys.readouterr().out
