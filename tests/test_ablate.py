"""Ablation grids: keys and values, networks shared across averaging, the study, its resume and errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.analysis import ablate
from cnnkit.analysis.ablate import (
    AblateConfig,
    apply_settings,
    cells_of,
    member_config,
    parse_grid,
    run_ablation,
)
from cnnkit.cli import main
from cnnkit.data import labels_of, load_dataset
from cnnkit.errors import ConfigError
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.engine import predict_proba
from cnnkit.train.runner import TrainConfig

TINY = {"channels": [4, 8], "fc_width": 16}

# --------------------------------------------------------------------------- keys and values


def test_grid_values_are_typed_by_what_they_set():
    grid = parse_grid(["kernel_size=3,5", "channels=8/16,16", "lr=0.1,0.02", "schedule=step,none",
                       "dropout=0,0.5", "skip-bad-files=yes,no", "average=1,3"], "small_cnn")
    assert grid == {"kernel_size": [3, 5], "channels": [[8, 16], 16], "lr": [0.1, 0.02], "schedule": ["step", "none"],
                    "dropout": [0.0, 0.5], "skip_bad_files": [True, False], "average": [1, 3]}
    assert len(cells_of(grid)) == 2 * 2 * 2 * 2 * 2 * 2 * 2


def test_any_trainconfig_field_is_an_axis(monkeypatch):
    """A field added to TrainConfig later (e.g. a data-augmentation setting) needs no change here."""
    fields = dict(ablate.train_fields(), augment="none")
    monkeypatch.setattr(ablate, "train_fields", lambda: fields)
    assert parse_grid(["augment=none,flip"], "small_cnn") == {"augment": ["none", "flip"]}


@pytest.mark.parametrize("items, message", [
    (["kernels=3,5"], "unknown grid key 'kernels'"),
    (["kernel_size=3", "kernel_size=5"], "given twice"),
    (["kernel_size=3,3"], "lists a value twice"),
    (["lr=fast"], "'fast' is not a float"),
    (["fc_width=wide"], "'wide' is not a int"),
    (["average=0,1"], "at least 1"),
    (["kernel_size"], "KEY=V1,V2"),
    (["model=lenet5,small_cnn", "kernel_size=3,5"], "for model lenet5"),
    (["model=nonet"], "unknown model 'nonet'"),
])
def test_bad_grids_are_one_line_errors(items, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_grid(items, "small_cnn")
    assert "\n" not in str(info.value)


def test_members_differ_only_in_their_initial_weights(tmp_path):
    base = TrainConfig(model="small_cnn", model_options={"fc_width": 16}, lr=0.1, seed=2)
    cell = {"kernel_size": 3, "lr": 0.01, "dropout": 0.5, "average": 3}
    cfgs = [member_config(base, cell, m, tmp_path) for m in range(3)]
    assert [c.model_options for c in cfgs] == [{"fc_width": 16, "kernel_size": 3, "init_seed": 2000 + m}
                                               for m in range(3)]
    assert all(c.lr == 0.01 and c.dropout == 0.5 and c.seed == 2 for c in cfgs)
    assert [Path(c.out).name for c in cfgs] == [f"kernel_size=3_lr=0.01_dropout=0.5_m{m}" for m in range(3)]
    # the same member of another "average" value is the same network (same folder)
    assert member_config(base, {**cell, "average": 1}, 0, tmp_path).out == cfgs[0].out
    with pytest.raises(ConfigError, match="lenet5 has no init_seed"):
        member_config(TrainConfig(model="lenet5"), {"average": 2}, 1, tmp_path)


def test_settings_for_every_cell():
    cfg = apply_settings(TrainConfig(model="small_cnn"), ["lr=0.02", "channels=8", "epochs=3"])
    assert cfg.lr == 0.02 and cfg.epochs == 3 and cfg.model_options == {"channels": 8}
    with pytest.raises(ConfigError, match="belongs in --grid"):
        apply_settings(cfg, ["average=2"])


# --------------------------------------------------------------------------- the study


@pytest.mark.slow
def test_grid_table_plot_averaging_and_resume(tmp_path, monkeypatch, tiny_idx):
    data = tiny_idx(tmp_path / "tiny", per_class=12, val_per_class=5)
    fits, interrupt = [], ["kernel_size=5_m0"]
    real_fit = ablate.fit

    def fit_spy(cfg, *, resume=False, progress=None):
        fits.append((Path(cfg.out).name, resume))
        if interrupt and Path(cfg.out).name == interrupt[0]:
            interrupt.clear()
            import cnnkit.train.runner as runner

            real_curves = runner.plot_training_curves

            def stop_after_first_epoch(*a, **k):  # Ctrl-C once epoch 1 of this network is checkpointed
                monkeypatch.setattr(runner, "plot_training_curves", real_curves)
                raise KeyboardInterrupt

            monkeypatch.setattr(runner, "plot_training_curves", stop_after_first_epoch)
        return real_fit(cfg, resume=resume, progress=progress)

    monkeypatch.setattr(ablate, "fit", fit_spy)
    base = TrainConfig(data=data, model="small_cnn", model_options=TINY, epochs=2, batch_size=32, device="cpu")
    cfg = AblateConfig(base=base, grid=parse_grid(["kernel_size=3,5", "average=1,2"], "small_cnn"),
                       out=str(tmp_path / "abl"))
    with pytest.raises(KeyboardInterrupt):
        run_ablation(cfg, progress=False)
    assert fits == [("kernel_size=3_m0", False), ("kernel_size=3_m1", False), ("kernel_size=5_m0", False)]
    saved = json.loads((tmp_path / "abl" / "results.json").read_text())["cells"]
    assert sorted(k for k in saved if k.startswith("cell")) == ["cell kernel_size=3 average=1",
                                                                "cell kernel_size=3 average=2"]

    fits.clear()
    result = run_ablation(cfg, progress=False)
    # the interrupted network resumes from its epoch-1 checkpoint; finished ones are not trained again
    assert fits == [("kernel_size=5_m0", True), ("kernel_size=5_m1", False)] and result["trained"] == 2
    history = load_checkpoint(tmp_path / "abl" / "runs" / "kernel_size=5_m0" / "last.safetensors").meta["history"]
    assert [r["epoch"] for r in history] == [1, 2]

    rows = {(r["cell"]["kernel_size"], r["cell"]["average"]): r for r in result["cells"]}
    assert set(rows) == {(3, 1), (3, 2), (5, 1), (5, 2)}
    # average=1 is member 0 alone; average=2 averages the posteriors of members 0 and 1 (checked by hand)
    splits = load_dataset(data, (32, 32), val_fraction=0.2, seed=0)
    labels = labels_of(splits.val)
    images = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    probs = []
    for m in range(2):
        ckpt = load_checkpoint(tmp_path / "abl" / "runs" / f"kernel_size=5_m{m}" / "last.safetensors")
        probs.append(predict_proba(ckpt.build_model(), images, mean=ckpt.mean_image))
    assert rows[5, 1]["acc1"] == pytest.approx(float((probs[0].argmax(1) == labels).double().mean()))
    assert rows[5, 2]["acc1"] == pytest.approx(float(((probs[0] + probs[1]).argmax(1) == labels).double().mean()))
    assert rows[5, 2]["single_acc1_mean"] == pytest.approx(
        float(np.mean([(p.argmax(1) == labels).double().mean() for p in probs])))
    assert not torch.equal(probs[0], probs[1])  # members differ (their initial weights)

    table = list(csv.reader(open(tmp_path / "abl" / "ablation.csv")))
    assert table[0][:4] == ["kernel_size", "average", "top-1", "top-1 error"] and len(table) == 5
    assert "| kernel_size | average | top-1 |" in (tmp_path / "abl" / "ablation.md").read_text()
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 10_000

    fits.clear()
    assert run_ablation(cfg, progress=False)["trained"] == 0 and fits == []
    with pytest.raises(ConfigError, match="other settings"):
        run_ablation(AblateConfig(base=base, grid={"kernel_size": [3]}, out=cfg.out), progress=False)


def test_cli_ablate_errors_before_any_training(tmp_path, capsys):
    for argv, fragment in [
        (["ablate", "--grid", "kernels=3,5"], "unknown grid key 'kernels'"),
        (["ablate", "--grid", "kernel_size=9", "stride=4"], "shrinks a 32x32 input to nothing"),
        (["ablate", "--grid", "lr=-1,0.1"], "--lr must be positive"),
        (["ablate", "--grid", "average=1,2", "--model", "lenet5"], "no init_seed option"),
        (["ablate", "--grid", "lr=0.1", "--set", "average=3"], "belongs in --grid"),
    ]:
        code = main([str(a) for a in argv] + ["--out", str(tmp_path / "a")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "a" / "runs").exists()
