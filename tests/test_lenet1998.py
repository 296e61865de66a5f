"""LeNet-5 as LeCun et al. (Proc. IEEE 1998) build it: parameter and connection counts, Table I, the
trainable subsampling, the fixed RBF output and the paper's loss, each against a naive twin."""

import pytest
import torch
import torch.nn.functional as F

from cnnkit.analysis import summary
from cnnkit.errors import ConfigError
from cnnkit.models import create
from cnnkit.models.lenet1998 import (
    DIGIT_BITMAPS,
    EuclideanRBF,
    ScaledTanh,
    SparseConv2d,
    Subsampling,
    paper_loss,
    rbf_codes,
    table_i_mask,
)
from cnnkit.train.runner import TrainConfig, fit


def meta_net():
    with torch.device("meta"):
        return create("lenet5_1998")


def test_trainable_parameters_are_the_papers_60000():
    net = meta_net()
    assert sum(p.numel() for p in net.parameters()) == 60_000
    per_layer = {}
    for name, p in net.named_parameters():
        layer = name.split(".")[1]
        per_layer[layer] = per_layer.get(layer, 0) + p.numel()
    # Sec. II-B: C1 156, S2 12, C3 1,516, S4 32, C5 48,120, F6 10,164; the RBF has none
    assert per_layer == {"c1": 156, "s2": 12, "c3": 1_516, "s4": 32, "c5": 48_120, "f6": 10_164}
    assert "classifier.output.codes" in net.state_dict()  # a saved buffer, not a parameter


def test_connections_are_the_papers():
    """The paper's connection counts are multiply-adds plus one bias connection per unit."""
    s = summary(meta_net(), (1, 32, 32))
    printed = {"c1": 122_304, "s2": 5_880, "c3": 151_600, "s4": 2_000, "c5": 48_120, "f6": 10_164}
    assert {name: s.row(name).macs + s.row(name).neurons for name in printed} == printed
    assert s.row("output").macs == 84 * 10


def test_c3_mask_is_table_i():
    # The paper's text: the first six C3 maps read 3 contiguous S2 maps, the next six 4 contiguous,
    # the next three 4 discontinuous, the last one all six (indices mod 6).
    rule = [{i, i + 1, i + 2} for i in range(6)] + [{i, i + 1, i + 2, i + 3} for i in range(6)]
    rule = [{k % 6 for k in s} for s in rule] + [{0, 1, 3, 4}, {1, 2, 4, 5}, {0, 2, 3, 5}, set(range(6))]
    expected = torch.tensor([[i in rule[j] for i in range(6)] for j in range(16)])
    assert torch.equal(table_i_mask(), expected)
    # Table I as printed, one row per S2 map: the columns (C3 maps) marked X
    printed_rows = [[0, 4, 5, 6, 9, 10, 11, 12, 14, 15], [0, 1, 5, 6, 7, 10, 11, 12, 13, 15],
                    [0, 1, 2, 6, 7, 8, 11, 13, 14, 15], [1, 2, 3, 6, 7, 8, 9, 12, 14, 15],
                    [2, 3, 4, 7, 8, 9, 10, 12, 13, 15], [3, 4, 5, 8, 9, 10, 11, 13, 14, 15]]
    assert [table_i_mask()[:, i].nonzero().flatten().tolist() for i in range(6)] == printed_rows
    # the layer in the net: non-zero kernels exactly where the table has an X
    c3 = create("lenet5_1998").features.c3
    assert torch.equal(c3.dense_weight().detach().abs().sum((2, 3)) > 0, expected)
    assert c3.weight.shape == (60, 5, 5) and int(expected.sum()) == 60


def test_sparse_conv_is_a_sum_of_single_map_convolutions():
    torch.manual_seed(0)
    c3 = SparseConv2d(table_i_mask(), 5).double()
    x = torch.randn(2, 6, 14, 14, dtype=torch.float64)
    y = c3(x)
    k = 0
    for j in range(16):  # naive twin: map j = its bias + one 1-channel convolution per connected map
        want = c3.bias[j].expand(2, 1, 10, 10).clone()
        for i in table_i_mask()[j].nonzero().flatten().tolist():
            want = want + F.conv2d(x[:, i : i + 1], c3.weight[k][None, None])
            k += 1
        torch.testing.assert_close(y[:, j : j + 1], want)
    y.sum().backward()
    assert c3.weight.grad.abs().min() > 0  # every connected kernel learns


def test_subsampling_is_window_sum_times_coefficient_plus_bias():
    torch.manual_seed(0)
    s2 = Subsampling(6).double()
    x = torch.randn(2, 6, 28, 28, dtype=torch.float64)
    y = s2(x)
    assert y.shape == (2, 6, 14, 14)
    for c in range(6):
        for r in (0, 7, 13):
            for col in (0, 5, 13):
                window = x[:, c, 2 * r : 2 * r + 2, 2 * col : 2 * col + 2].sum((1, 2))
                torch.testing.assert_close(y[:, c, r, col], window * s2.weight[c] + s2.bias[c])


def test_squashing_function():
    f = ScaledTanh()
    x = torch.tensor([-1.0, 0.0, 1.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(f(x), 1.7159 * torch.tanh(2 / 3 * x))
    assert abs(f(torch.tensor(1.0)).item() - 1.0) < 1e-3  # f(1) = 1: the targets +-1 sit in the linear range


def test_rbf_codes_are_fixed_digit_bitmaps():
    codes = rbf_codes(10)
    assert codes.shape == (10, 84) and set(codes.unique().tolist()) == {-1.0, 1.0}
    for d, rows in DIGIT_BITMAPS.items():
        assert len(rows) == 12 and all(len(r) == 7 for r in rows)  # 7 wide, 12 high
        assert codes[d].view(12, 7).eq(1).tolist() == [[c == "#" for c in r] for r in rows]
    hamming = (codes[:, None] != codes[None]).sum(2) + 84 * torch.eye(10, dtype=torch.long)
    assert hamming.min() >= 10  # every pair of digits differs in at least 10 of 84 pixels
    extra = rbf_codes(13)
    assert torch.equal(extra[:10], codes) and torch.equal(extra, rbf_codes(13))  # seeded
    net = create("lenet5_1998")
    assert not any(p is net.classifier.output.codes for p in net.parameters())
    before = net.classifier.output.codes.clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(4, 1, 32, 32)).logsumexp(1).sum().backward()
    opt.step()
    assert torch.equal(net.classifier.output.codes, before)


def test_rbf_scores_are_negated_squared_distances():
    torch.manual_seed(0)
    rbf = EuclideanRBF(84, 10).double()
    x = torch.randn(3, 84, dtype=torch.float64)
    want = torch.tensor([[sum((x[b, j] - rbf.codes[i, j]) ** 2 for j in range(84)) for i in range(10)]
                         for b in range(3)], dtype=torch.float64)
    torch.testing.assert_close(rbf.distances(x), want)
    torch.testing.assert_close(rbf(x), -want)
    maps = x[:, :, None, None].expand(3, 84, 2, 2)  # fully convolutional: one score per position
    torch.testing.assert_close(rbf(maps), (-want)[:, :, None, None].expand(3, 10, 2, 2))


def test_paper_loss_is_equation_9():
    torch.manual_seed(0)
    y = torch.rand(5, 10, dtype=torch.float64) * 50  # RBF distances
    target = torch.tensor([0, 3, 9, 2, 2])
    j = 3.0
    want = torch.stack([y[p, target[p]] + torch.log(torch.exp(torch.tensor(-j)) + torch.exp(-y[p]).sum())
                        for p in range(5)]).mean()
    torch.testing.assert_close(paper_loss(-y, target, j), want)
    # without the competitive constant (j -> infinity) it is plain cross-entropy on the scores -y
    torch.testing.assert_close(paper_loss(-y, target, 1e4), F.cross_entropy(-y, target))


def test_initialisation_is_uniform_in_2_4_over_fan_in():
    torch.manual_seed(0)
    net = create("lenet5_1998")
    f, c = net.features, net.classifier
    for tensor, fan_in in [(f.c1.weight, 25), (f.c1.bias, 25), (f.s2.weight, 4), (f.s4.bias, 4),
                           (f.c5.weight, 400), (c.f6.weight, 120), (c.f6.bias, 120)]:
        bound = 2.4 / fan_in
        assert tensor.abs().max() <= bound and tensor.abs().max() > 0.75 * bound
    c3, mask = f.c3, table_i_mask()
    for j in range(16):
        bound = 2.4 / (25 * int(mask[j].sum()))  # 75, 100 or 150 inputs per C3 unit
        kernels = c3.weight[c3.out_idx == j]
        assert kernels.abs().max() <= bound and kernels.abs().max() > 0.75 * bound
        assert c3.bias[j].abs() <= bound


def test_head_reset_and_more_classes_than_digits():
    net = create("lenet5_1998", num_classes=12)
    assert net.num_classes == 12 and net(torch.randn(2, 1, 32, 32)).shape == (2, 12)
    net.reset_classifier(4)
    assert net.num_classes == 4 and torch.equal(net.classifier.output.codes, rbf_codes(4))
    with pytest.raises(ConfigError, match="at least 1"):
        net.reset_classifier(0)


@pytest.mark.slow
def test_trains_on_digits_with_cross_entropy_on_the_negated_distances(tmp_path):
    summary_ = fit(TrainConfig(model="lenet5_1998", data="digits", epochs=3, batch_size=64, lr=0.01,
                               out=str(tmp_path / "run")))
    assert summary_["final"]["val_acc1"] > 0.8  # 0.916 measured (seed 0); chance is 0.1
