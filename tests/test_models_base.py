import pytest
import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.layers import LocalResponseNorm
from cnnkit.models import create, extract_features, list_models, register_model


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_lenet5_parameter_count_is_exact():
    with torch.device("meta"):
        assert n_params(create("lenet5")) == 61_706


def test_lenet5_forward_fully_convolutional_and_reset():
    torch.manual_seed(0)
    net = create("lenet5").eval()
    x = torch.randn(3, 1, 32, 32)
    y = net(x)
    assert y.shape == (3, 10)
    fc = net.to_fully_convolutional().eval()
    assert torch.allclose(fc(x).flatten(1), y, atol=1e-6)
    big = fc(torch.randn(1, 1, 64, 48))
    assert big.shape == (1, 10, 9, 5)  # (64-32)/4+1, (48-32)/4+1: total stride 4
    net.reset_classifier(3)
    assert net(x).shape == (3, 3) and net.num_classes == 3


def test_registry_errors():
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        create("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_model("lenet5", paper="", input_size=(1, 1, 1))(lambda: None)
    assert "lenet5" in list_models("lenet*")


def test_extract_features_by_short_name():
    net = create("lenet5").eval()
    out = extract_features(net, torch.randn(2, 1, 32, 32), ["f6", "c5"])
    assert out["f6"].shape == (2, 84) and out["c5"].shape == (2, 120, 1, 1)
    with pytest.raises(ConfigError, match="no layer named 'fc9'"):
        extract_features(net, torch.randn(1, 1, 32, 32), ["fc9"])


@pytest.mark.parametrize("convention,scale", [("paper", 1.0), ("caffe", 1 / 5)])
def test_lrn_matches_direct_formula(convention, scale):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 4, 3, dtype=torch.float64)
    n, alpha, beta, k = 5, 1e-1, 0.75, 2.0
    y = LocalResponseNorm(n, alpha, beta, k, convention=convention)(x)
    C = x.shape[1]
    ref = torch.empty_like(x)
    for c in range(C):
        lo, hi = max(0, c - n // 2), min(C - 1, c + n // 2)
        s = (x[:, lo:hi + 1] ** 2).sum(1)
        ref[:, c] = x[:, c] / (k + alpha * scale * s) ** beta
    assert torch.allclose(y, ref, atol=1e-12)


def test_fully_convolutional_in_float64():
    net = create("lenet5").double().eval()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    assert torch.allclose(net.to_fully_convolutional()(x).flatten(1), net(x), atol=1e-12)


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    from safetensors.torch import save_file

    from cnnkit.utils import atomic_path, write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "x")
    with atomic_path(tmp_path / "w.safetensors") as tmp:  # safetensors writes its files 0600
        save_file({"w": torch.zeros(2)}, str(tmp))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_lrn_runs_in_bfloat16_on_cpu():
    x = torch.randn(2, 8, 5, 5)
    lrn = LocalResponseNorm()
    y = lrn(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), lrn(x), atol=2e-2, rtol=2e-2)
