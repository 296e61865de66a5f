"""Transfer study (Yosinski et al. 2014): class splits, copy/freeze/re-initialise, the study and its resume."""

import csv
import json

import pytest
import torch
from torch import nn

from cnnkit.analysis import transfer
from cnnkit.analysis.transfer import (
    KINDS,
    TransferConfig,
    class_subset,
    run_transfer,
    split_classes,
    train_network,
    transplant,
    weighted_layers,
)
from cnnkit.cli import main
from cnnkit.data import ArrayDataset
from cnnkit.errors import ConfigError
from cnnkit.models import ClassifierNet, create
from cnnkit.train.checkpoint import load_checkpoint

TINY = {"channels": [4, 8], "fc_width": 16}
CLASSES = [str(i) for i in range(10)]

# --------------------------------------------------------------------------- class splits


def test_random_split_is_a_seeded_partition():
    a, b = split_classes(CLASSES, seed=3)
    assert len(a) == len(b) == 5 and sorted(a + b) == list(range(10))
    assert split_classes(CLASSES, seed=3) == (a, b)
    assert split_classes(CLASSES, seed=4) != (a, b)


def test_given_lists_names_or_indices_and_complement():
    names = ["cat", "dog", "car", "bus", "ant"]
    assert split_classes(names, ["cat", "1"], ["car", "bus"]) == ([0, 1], [2, 3])  # "ant" is in neither
    assert split_classes(names, ["car"]) == ([2], [0, 1, 3, 4])
    assert split_classes(names, None, ["dog", "ant"]) == ([0, 2, 3], [1, 4])


@pytest.mark.parametrize("a, b, message", [
    (["0", "1", "2"], ["2", "3"], "overlap in class"),
    ([], ["1"], "--split-a is empty"),
    (["0"], ["11"], "does not have"),
    (["0", "0"], ["1"], "twice"),
    (CLASSES, None, "leaving none"),
])
def test_bad_class_lists_are_one_line_errors(a, b, message):
    with pytest.raises(ConfigError, match=message) as info:
        split_classes(CLASSES, a, b)
    assert "\n" not in str(info.value)


def test_class_subset_relabels_in_the_given_order():
    images = torch.rand(12, 1, 4, 4)
    labels = torch.arange(12) % 4
    ds = ArrayDataset(images, labels, ["a", "b", "c", "d"])
    sub = class_subset(ds, [3, 1])
    assert sub.classes == ["d", "b"] and len(sub) == 6
    assert sub.labels.tolist() == [1, 0, 1, 0, 1, 0]  # items 1 (b), 3 (d), 5 (b), ...
    assert torch.equal(sub[1][0], images[3])


# --------------------------------------------------------------------------- copy, freeze, re-initialise


def test_weighted_layers_of_small_cnn_and_of_a_net_with_batchnorm():
    assert weighted_layers(create("small_cnn")) == [["features.conv1"], ["features.conv2"], ["classifier.fc3"],
                                                   ["classifier.fc4"]]
    assert len(weighted_layers(create("small_cnn", fc_width=[8, 8]))) == 5
    assert weighted_layers(_bn_net())[0] == ["features.conv1", "features.bn1"]


def _bn_net(num_classes=3):
    features = nn.Sequential()
    features.add_module("conv1", nn.Conv2d(1, 4, 3))
    features.add_module("bn1", nn.BatchNorm2d(4))
    features.add_module("relu1", nn.ReLU())
    features.add_module("pool1", nn.MaxPool2d(2))
    features.add_module("conv2", nn.Conv2d(4, 6, 3))
    features.add_module("relu2", nn.ReLU())
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, num_classes))
    return ClassifierNet(features, classifier, (1, 14, 14))


def _state(model, prefixes):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(tuple(p + "." for p in prefixes))}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tiny_task(num_classes=3, n=48, size=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.rand(n, 1, size, size, generator=g), torch.arange(n) % num_classes
    images[torch.arange(n), 0, labels * 4, :] = 1.0  # a learnable cue: a bright row per class
    return ArrayDataset(images, labels, [str(i) for i in range(num_classes)])


def _small_net():
    return create("small_cnn", num_classes=3, **TINY)


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "fine-tuned"])
@pytest.mark.parametrize("make", [_small_net, _bn_net], ids=["small_cnn", "batchnorm"])
def test_transplant_copies_freezes_and_reinitialises(make, freeze):
    torch.manual_seed(0)
    base, target = make(), make()
    size = base.input_size[1]
    data = _tiny_task(size=size)
    groups = weighted_layers(target)
    n = 2
    copied = [m for g in groups[:n] for m in g]
    above = [m for g in groups[n:] for m in g]
    fresh_above = _state(target, above)
    names = transplant(target, base, n, freeze=freeze)
    assert names == copied
    assert _equal(_state(target, copied), _state(base, copied))  # copied layers equal the base network's
    assert _equal(_state(target, above), fresh_above)  # the layers above keep their fresh initialisation
    assert not any(torch.equal(_state(target, above)[k], _state(base, above)[k]) for k in fresh_above)

    cfg = TransferConfig(epochs=2, batch_size=16, lr=0.05)
    train_network(target, data, data, cfg, seed=1, mean=None, device=torch.device("cpu"))
    after_copied, after_above = _state(target, copied), _state(target, above)
    # frozen layers did not change, bit for bit (BatchNorm statistics included); "+" layers learned
    assert _equal(after_copied, _state(base, copied)) == freeze
    assert all(p.requires_grad != freeze for name in copied for p in dict(target.named_modules())[name].parameters())
    learned = [k for k in after_above if after_above[k].is_floating_point()]
    assert not any(torch.equal(after_above[k], fresh_above[k]) for k in learned)  # trained on B
    assert not any(torch.equal(after_above[k], _state(base, above)[k]) for k in learned)  # not the base's


def test_transplant_refuses_the_output_layer():
    net = create("small_cnn", **TINY)
    with pytest.raises(ConfigError, match="n runs from 1 to 3"):
        transplant(net, create("small_cnn", **TINY), 4, freeze=True)


# --------------------------------------------------------------------------- the study


@pytest.mark.slow
def test_study_table_plot_frozen_cells_and_resume(tmp_path, monkeypatch, tiny_idx):
    data = tiny_idx(tmp_path / "tiny", per_class=16, val_per_class=6)
    trainings, pending = [], {}
    interrupt_at = [6]
    real_train, real_transplant = transfer.train_network, transfer.transplant

    def transplant_spy(target, source, n, *, freeze):
        pending.update(source=source, n=n, freeze=freeze)
        return real_transplant(target, source, n, freeze=freeze)

    def train_spy(model, train, val, cfg, *, seed, mean, device):
        info = dict(pending)
        pending.clear()
        trainings.append(info)
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
        if info:  # a transfer/selffer cell: the first n layers are the base network's
            copied = {f"{m}.{w}" for group in weighted_layers(model)[: info["n"]] for m in group
                      for w in ("weight", "bias")}
            source = dict(info["source"].named_parameters())
            assert all(torch.equal(params[k], source[k]) for k in copied)
            assert frozen == (copied if info["freeze"] else set())
        result = real_train(model, train, val, cfg, seed=seed, mean=mean, device=device)
        after = dict(model.named_parameters())
        assert all(torch.equal(after[k], params[k]) for k in frozen)  # frozen: bit for bit unchanged
        assert all(not torch.equal(after[k], params[k]) for k in params if k not in frozen)  # the rest learned
        if interrupt_at and len(trainings) == interrupt_at[0]:
            interrupt_at.clear()
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the 6th training
        return result

    monkeypatch.setattr(transfer, "train_network", train_spy)
    monkeypatch.setattr(transfer, "transplant", transplant_spy)
    out = tmp_path / "study"
    cfg = TransferConfig(data=data, model_options=TINY, epochs=1, batch_size=32, out=str(out), device="cpu",
                         split_a=["0", "1", "2", "3", "4"])
    with pytest.raises(KeyboardInterrupt):
        run_transfer(cfg, progress=False)
    saved = json.loads((out / "results.json").read_text())["cells"]
    assert sorted(saved) == ["AnB/1", "BnB+/1", "BnB/1", "baseA", "baseB"]  # the 6th was not recorded

    trainings.clear()
    result = run_transfer(cfg, progress=False)
    assert len(trainings) == 9 and result["trained"] == 9  # 14 cells, 5 finished before the interruption
    assert [(t["n"], t["freeze"]) for t in trainings] == [(1, False), (2, True), (2, False), (2, True), (2, False),
                                                          (3, True), (3, False), (3, True), (3, False)]
    assert result["layers"] == 4 and len(result["cells"]) == 14
    assert result["A"] == ["0", "1", "2", "3", "4"] and result["B"] == ["5", "6", "7", "8", "9"]
    base_a = load_checkpoint(out / "baseA.safetensors")
    assert base_a.classes == result["A"] and base_a.model_state["classifier.fc4.weight"].shape == (5, 16)

    rows = list(csv.reader(open(out / "transfer.csv")))
    assert rows[0] == ["n", *KINDS] and [r[0] for r in rows[1:]] == ["0 (baseB)", "1", "2", "3"]
    assert all(0 <= float(v) <= 1 for r in rows[1:] for v in r[1:])
    assert "| n | BnB | BnB+ | AnB | AnB+ |" in (out / "transfer.md").read_text()
    assert (out / "transfer.png").stat().st_size > 10_000
    assert not list(out.glob(".*.tmp"))

    trainings.clear()
    again = run_transfer(cfg, progress=False)  # everything finished: nothing is trained
    assert trainings == [] and again["trained"] == 0 and again["cells"] == result["cells"]

    with pytest.raises(ConfigError, match="other settings"):
        run_transfer(TransferConfig(**{**cfg.__dict__, "epochs": 2}), progress=False)


def test_cli_bad_inputs_are_one_line_errors(tmp_path, capsys):
    for argv, fragment in [
        (["transfer", "--split-a", "0,1,2", "--split-b", "2,3", "--out", tmp_path / "t"], "overlap"),
        (["transfer", "--split-a", ",", "--out", tmp_path / "t"], "is empty"),
        (["transfer", "--option", "kernels=3", "--out", tmp_path / "t"], "--option 'kernels=3'"),
        (["transfer", "--option", "stride=x", "--out", tmp_path / "t"], "not a int"),
    ]:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
