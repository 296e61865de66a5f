"""Transfer study (Yosinski et al. 2014): class splits, copy/freeze/re-initialise, the study and its resume."""

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnkit.analysis import transfer
from cnnkit.analysis.transfer import (
    KINDS,
    TransferConfig,
    TransferTask,
    class_subset,
    run_transfer,
    split_classes,
    transplant,
    weighted_layers,
)
from cnnkit.cli import main
from cnnkit.data import ArrayDataset, Splits, compute_mean_image, load_dataset
from cnnkit.errors import ConfigError
from cnnkit.models import ClassifierNet, create
from cnnkit.train import classification, runner
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.config import TrainConfig
from cnnkit.train.runner import fit

TINY = {"channels": [4, 8], "fc_width": 16}
CLASSES = [str(i) for i in range(10)]


@pytest.fixture
def no_run_pictures(monkeypatch):
    """Each network is a runner run folder. Its per-epoch pictures (curves.png, confusion.png) are the
    runner's, tested with it; drawing them took 80% of these tests' time."""
    monkeypatch.setattr(runner, "plot_training_curves", lambda *args, **kwargs: None)
    monkeypatch.setattr(classification, "plot_confusion", lambda *args, **kwargs: None)

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
    net = ClassifierNet(features, classifier, (1, 14, 14))
    net.model_options = {}  # what a checkpoint records of a zoo model's builder options
    return net


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


class _GivenNet(TransferTask):
    """The study's task (data, mean, frozen layers) for a network the test built and transplanted itself."""

    def __init__(self, model, data):
        splits = Splits(data, data, data.classes, 1, "tiny")
        super().__init__(splits, list(range(len(data.classes))), compute_mean_image(data), init_seed=0)
        self.model = model

    def build_model(self, cfg):
        return self.model


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "fine-tuned"])
@pytest.mark.parametrize("make", [_small_net, _bn_net], ids=["small_cnn", "batchnorm"])
def test_transplant_copies_freezes_and_reinitialises(make, freeze, tmp_path, no_run_pictures):
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

    cfg = TrainConfig(model="small_cnn", epochs=2, batch_size=16, lr=0.05, schedule="cosine", seed=1,
                      out=str(tmp_path / "run"), device="cpu")
    fit(cfg, progress=False, task=_GivenNet(target, data))  # the runner trains ``target`` in place
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


def _spy_on_networks(monkeypatch, interrupt_at=None):
    """Record each network the study trains ({} for a base, else n and freeze) and check it around its
    training: copied layers equal the base checkpoint's, exactly those are frozen, frozen parameters do
    not change and all others learn. ``interrupt_at``: Ctrl-C in the first epoch of that network."""
    trainings, pending = [], [interrupt_at]
    real_fit = transfer.fit

    def fit_spy(cfg, *, resume=False, progress=None, task=None):
        info = {"n": task.n, "freeze": task.freeze} if task.base is not None else {}
        trainings.append({**info, "run": Path(cfg.out).name, "resume": resume})
        built = {}
        real_build = task.build_model

        def build(c):
            model = built["model"] = real_build(c)
            built["params"] = {k: p.detach().clone() for k, p in model.named_parameters()}
            built["frozen"] = {k for k, p in model.named_parameters() if not p.requires_grad}
            if info:  # a transfer/selffer cell: the first n layers are the base network's
                copied = {f"{m}.{w}" for group in weighted_layers(model)[: info["n"]] for m in group
                          for w in ("weight", "bias")}
                source = load_checkpoint(task.base).model_state
                assert all(torch.equal(built["params"][k], source[k]) for k in copied)
                assert built["frozen"] == (copied if info["freeze"] else set())
            return model

        task.build_model = build
        if len(trainings) == pending[0]:
            pending[0] = None  # once

            def ctrl_c(*args, **kwargs):
                raise KeyboardInterrupt

            task.train_epoch = ctrl_c
        summary = real_fit(cfg, resume=resume, progress=progress, task=task)
        after, before, frozen = dict(built["model"].named_parameters()), built["params"], built["frozen"]
        assert all(torch.equal(after[k], before[k]) for k in frozen)  # frozen: bit for bit unchanged
        assert all(not torch.equal(after[k], before[k]) for k in before if k not in frozen)  # the rest learned
        return summary

    monkeypatch.setattr(transfer, "fit", fit_spy)
    return trainings


@pytest.mark.slow
def test_study_table_plot_frozen_cells_and_resume(tmp_path, monkeypatch, tiny_idx, no_run_pictures):
    data = tiny_idx(tmp_path / "tiny", per_class=16, val_per_class=6)
    out = tmp_path / "study"
    cfg = TransferConfig(data=data, model_options=TINY, epochs=1, batch_size=32, out=str(out), device="cpu",
                         split_a=["0", "1", "2", "3", "4"])
    trainings = _spy_on_networks(monkeypatch, interrupt_at=6)  # Ctrl-C in the middle of the 6th network
    with pytest.raises(KeyboardInterrupt):
        run_transfer(cfg, progress=False)
    saved = json.loads((out / "results.json").read_text())["cells"]
    assert sorted(saved) == ["AnB/1", "BnB+/1", "BnB/1", "baseA", "baseB"]  # the 6th was not recorded
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["AnB+_1", "AnB_1", "BnB+_1", "BnB_1", "baseA",
                                                                  "baseB"]
    assert not (out / "runs" / "AnB+_1" / "last.safetensors").exists()  # killed in its first epoch

    trainings.clear()
    result = run_transfer(cfg, progress=False)
    assert len(trainings) == 9 and result["trained"] == 9  # 14 cells, 5 finished before the interruption
    assert [(t["n"], t["freeze"]) for t in trainings] == [(1, False), (2, True), (2, False), (2, True), (2, False),
                                                          (3, True), (3, False), (3, True), (3, False)]
    assert not any(t["resume"] for t in trainings)  # nothing had finished an epoch
    assert result["layers"] == 4 and len(result["cells"]) == 14
    assert result["A"] == ["0", "1", "2", "3", "4"] and result["B"] == ["5", "6", "7", "8", "9"]
    base_a = load_checkpoint(out / "runs" / "baseA" / "last.safetensors")
    assert base_a.classes == result["A"] and base_a.model_state["classifier.fc4.weight"].shape == (5, 16)
    # one mean image for every network: that of the whole training set (A and B), as the base networks saw it
    mean = compute_mean_image(load_dataset(data, (32, 32), channels=1).train)
    cell = load_checkpoint(out / "runs" / "AnB_3" / "last.safetensors")
    assert torch.equal(base_a.mean_image, mean) and torch.equal(cell.mean_image, mean)
    assert cell.classes == result["B"] and cell.epoch == 1

    rows = list(csv.reader(open(out / "transfer.csv")))
    assert rows[0] == ["n", *KINDS] and [r[0] for r in rows[1:]] == ["0 (baseB)", "1", "2", "3"]
    assert all(0 <= float(v) <= 1 for r in rows[1:] for v in r[1:])
    assert "| n | BnB | BnB+ | AnB | AnB+ |" in (out / "transfer.md").read_text()
    assert (out / "transfer.png").stat().st_size > 10_000
    assert not list(out.glob(".*.tmp")) and not list(out.glob("runs/*/.*.tmp"))

    trainings.clear()
    again = run_transfer(cfg, progress=False)  # everything finished: nothing is trained
    assert trainings == [] and again["trained"] == 0 and again["cells"] == result["cells"]

    with pytest.raises(ConfigError, match="other settings"):
        run_transfer(TransferConfig(**{**cfg.__dict__, "epochs": 2}), progress=False)


@pytest.mark.slow
def test_network_killed_mid_way_resumes_to_the_same_weights(tmp_path, monkeypatch, tiny_idx, no_run_pictures):
    data = tiny_idx(tmp_path / "tiny", per_class=8, val_per_class=3)
    two_layers = {"channels": [4], "fc_width": []}  # conv1 and the output layer: n = 1 only, 6 networks

    def study(name):
        return TransferConfig(data=data, model_options=two_layers, epochs=2, batch_size=16, out=str(tmp_path / name),
                              device="cpu", split_a=["0", "1", "2", "3", "4"])

    whole = run_transfer(study("whole"), progress=False)

    real_epoch = TransferTask.train_epoch

    def killed_in_epoch_2_of_anb1(self, *args, epoch, **kwargs):
        if self.base is not None and self.base.parent.name == "baseA" and self.freeze and epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, *args, epoch=epoch, **kwargs)

    def killed_in_epoch_2(self, *args, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(TransferTask, "train_epoch", killed_in_epoch_2_of_anb1)
    with pytest.raises(KeyboardInterrupt):
        run_transfer(study("killed"), progress=False)
    runs = tmp_path / "killed" / "runs"
    assert load_checkpoint(runs / "AnB_1" / "last.safetensors").epoch == 1

    monkeypatch.setattr(TransferTask, "train_epoch", real_epoch)
    trainings = _spy_on_networks(monkeypatch)
    resumed = run_transfer(study("killed"), progress=False)
    assert [(t["run"], t["resume"]) for t in trainings] == [("AnB_1", True), ("AnB+_1", False)]
    assert [r["epoch"] for r in csv.DictReader(open(runs / "AnB_1" / "metrics.csv"))] == ["1", "2"]
    for name in ("baseA", "baseB", "BnB_1", "BnB+_1", "AnB_1", "AnB+_1"):
        a = load_checkpoint(tmp_path / "whole" / "runs" / name / "last.safetensors").model_state
        b = load_checkpoint(runs / name / "last.safetensors").model_state
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert all(resumed["cells"][k]["acc1"] == whole["cells"][k]["acc1"] for k in whole["cells"])

    # killed before any network finished (no results.json yet): other settings are refused all the same
    monkeypatch.setattr(TransferTask, "train_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_transfer(study("early"), progress=False)
    with pytest.raises(ConfigError, match=r"runs/baseA holds a network trained with other settings \(lr: 0.05 there"):
        run_transfer(TransferConfig(**{**study("early").__dict__, "lr": 0.1}), progress=False)


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
