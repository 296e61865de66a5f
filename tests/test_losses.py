"""Losses, auxiliary heads, L2-normalised features and metrics, each against a naive twin."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cnnkit.errors import ConfigError
from cnnkit.train.engine import evaluate, train_one_epoch
from cnnkit.train.losses import (
    l2_normalize_head_input,
    make_loss,
    ranking_hinge_loss,
    softmax_cross_entropy,
    total_loss,
)
from cnnkit.train.metrics import ClassificationMeter, average_precisions, mean_average_precision, topk_error


def naive_ranking_hinge(scores, positive, margin=1.0):
    per_class = []
    for c in range(scores.shape[1]):
        pos = [i for i in range(len(scores)) if positive[i][c]]
        neg = [j for j in range(len(scores)) if not positive[j][c]]
        if not pos or not neg:
            continue
        terms = [max(0.0, margin - float(scores[i, c]) + float(scores[j, c])) for i in pos for j in neg]
        per_class.append(sum(terms) / len(terms))
    return sum(per_class) / len(per_class)


def test_ranking_hinge_matches_the_pairwise_definition_single_and_multi_label():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(9, 5, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, 1, 2, 3, 0, 1, 2, 2])  # class 4 has no positive: it does not count
    onehot = F.one_hot(target, 5).bool().tolist()
    assert ranking_hinge_loss(scores, target).item() == pytest.approx(naive_ranking_hinge(scores, onehot), abs=1e-12)
    multi = torch.rand(9, 5, generator=g) < 0.4
    assert ranking_hinge_loss(scores, multi.long()).item() == pytest.approx(
        naive_ranking_hinge(scores, multi.tolist()), abs=1e-12)


def test_ranking_hinge_gradient_and_margin():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.autograd.gradcheck(lambda s: ranking_hinge_loss(s, target), (scores,))
    # positives ahead of every negative by more than the margin: no loss
    separated = F.one_hot(target, 4).double() * 3.0
    assert ranking_hinge_loss(separated, target).item() == 0.0
    assert ranking_hinge_loss(torch.zeros(2, 3), torch.tensor([[1, 1, 1], [1, 1, 1]])).item() == 0.0


def test_softmax_cross_entropy_single_and_multi_label():
    g = torch.Generator().manual_seed(2)
    scores, target = torch.randn(5, 4, generator=g), torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(softmax_cross_entropy(scores, target), F.cross_entropy(scores, target))
    multi = torch.tensor([[1, 0, 1, 0]] * 5)
    expected = -(0.5 * F.log_softmax(scores, 1)[:, [0, 2]].sum(1)).mean()
    torch.testing.assert_close(softmax_cross_entropy(scores, multi), expected)
    with pytest.raises(ConfigError, match="ranking-hinge"):
        make_loss("hinge")


class AuxNet(nn.Module):
    """GoogLeNet's interface in miniature: (main, aux1, aux2) in training mode, main alone in eval mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.main, self.aux1, self.aux2 = nn.Linear(8, 3), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        return (self.main(h), self.aux1(h), self.aux2(h)) if self.training else self.main(h)


def test_auxiliary_losses_are_weighted_by_0_3():
    torch.manual_seed(0)
    net, x, y = AuxNet(), torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 1])
    main, loss = total_loss(F.cross_entropy, net(x), y)
    m, a1, a2 = net(x)
    torch.testing.assert_close(loss, F.cross_entropy(m, y) + 0.3 * (F.cross_entropy(a1, y) + F.cross_entropy(a2, y)))
    assert torch.equal(main, m)


def test_engine_trains_a_model_with_auxiliary_heads():
    torch.manual_seed(0)
    net = AuxNet()
    data = DataLoader(TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))), batch_size=8)
    before = net.aux1.weight.clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    train, confusion = train_one_epoch(net, data, opt, device=torch.device("cpu"), num_classes=3)
    assert not torch.equal(before, net.aux1.weight)  # the auxiliary heads learn
    assert int(confusion.sum()) == 32 and 0 <= train["acc1"] <= 1
    val, _ = evaluate(net, data, device=torch.device("cpu"), num_classes=3)  # eval mode: main head only
    assert val["loss"] > 0


def test_l2_normalised_features_feed_the_last_layer():
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    seen = []
    l2_normalize_head_input(l2_normalize_head_input(net))  # idempotent
    net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))  # runs after the normalisation
    x = torch.randn(4, 5)
    out = net(x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0].norm(dim=1), torch.ones(4))
    h = net[1](net[0](x))
    torch.testing.assert_close(out, F.linear(h / h.norm(dim=1, keepdim=True), net[2].weight, net[2].bias))


# ----------------------------------------------------------------------------------- metrics


def naive_average_precision(scores, positive):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if positive[i]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def test_mean_average_precision_matches_the_definition():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 4))
    targets = (rng.random((40, 4)) < 0.3).astype(int)
    targets[:, 3] = 0  # a class without positives is left out of the mean
    aps = average_precisions(scores, targets)
    for k in range(3):
        assert aps[k] == pytest.approx(naive_average_precision(scores[:, k], targets[:, k]), abs=1e-12)
    assert np.isnan(aps[3])
    assert mean_average_precision(scores, targets) == pytest.approx(np.mean(aps[:3]))


def test_topk_error_and_meter():
    meter = ClassificationMeter(3)
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    meter.update(logits, torch.tensor([0, 2, 2, 1]), loss=1.0)
    result = meter.all_reduce(torch.device("cpu")).result()  # one process: a no-op
    assert result["acc1"] == 0.5 and meter.confusion.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert topk_error(result)["err1"] == 0.5 and topk_error(result)["err5"] == 0.0
