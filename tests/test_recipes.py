"""Recipes, configuration files and their precedence, and the run options (averaging, schedules, losses,
precision, channels_last, compile) end to end on the embedded digits."""

import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from cnnkit.cli import build_parser, main
from cnnkit.cli.train import config_from_args
from cnnkit.data.augment import parse_augment
from cnnkit.errors import ConfigError
from cnnkit.train.checkpoint import load_checkpoint
from cnnkit.train.config import read_config_file
from cnnkit.train.evaluation import evaluate_checkpoint
from cnnkit.train.recipes import RECIPES, get_recipe, markdown_table
from cnnkit.train.runner import StepFactors, TrainConfig, fit

DOCS = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
INPUT = {"alexnet": (227, 227)}  # the zoo's AlexNet takes 227; the other recipes' models take 224



@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_values_are_valid_settings(name):
    recipe = get_recipe(name)
    names = {f.name for f in fields(TrainConfig)}
    assert set(recipe.settings) <= names
    assert all(source for _, source in recipe.settings.values())  # every number says where it comes from
    cfg = TrainConfig.from_dict({**recipe.values(), "model": "lenet5"})  # the zoo may not be merged yet
    cfg.validate()
    size = INPUT.get(recipe.values()["model"], (224, 224))
    load = cfg.load_size or size
    augment = parse_augment(cfg.augment, size, pca=(torch.ones(3), torch.eye(3)))
    assert augment.output_size(load) == size


@pytest.mark.parametrize("name", list(RECIPES))
def test_docs_table_is_the_recipe(name):
    assert markdown_table(get_recipe(name)) in DOCS.read_text()


def test_published_numbers():
    alex, vgg, goog = (get_recipe(n).values() for n in ("alexnet2012", "vgg2014", "googlenet2014"))
    assert (alex["batch_size"], alex["momentum"], alex["weight_decay"], alex["lr"], alex["epochs"]) == (
        128, 0.9, 5e-4, 0.01, 90)
    assert (vgg["batch_size"], vgg["epochs"], vgg["dropout"], vgg["augment"].split(",")[0]) == (
        256, 74, 0.5, "scale=256:512")
    assert (goog["step_size"], goog["gamma"], goog["aux_weight"], goog["weight_average"]) == (8, 0.96, 0.3, "polyak")
    factors = StepFactors(get_recipe("lenet1998").values()["lr_steps"])
    rates = [5e-4 * factors(epoch - 1) for epoch in range(1, 21)]  # the paper's global learning rates
    assert rates[:2] == [5e-4] * 2 and rates[2:5] == [2e-4] * 3 and rates[5:8] == [1e-4] * 3
    assert rates[8:12] == [5e-5] * 4 and rates[12:] == [1e-5] * 8


def test_lenet_recipe_cites_the_papers_sections():
    sources = {k: src for k, (_, src) in get_recipe("lenet1998").settings.items()}
    # Sec. III-B is "Results" (III-C compares classifiers); Appendix B is on-line learning, C is SDLM
    assert all(sources[k].startswith("Sec. III-B") for k in ("epochs", "schedule", "lr_steps"))
    assert sources["batch_size"].startswith("Appendix B") and "Appendix C" in sources["lr"]
    assert not any("III-C" in src for src in sources.values())


def test_precedence_recipe_then_file_then_flags(tmp_path):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('recipe = "vgg2014"\nbatch-size = 32\nlr = 0.02\naugment = "crop,flip"\n')
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--lr", "0.5"])
    cfg = config_from_args(args, TrainConfig())
    assert cfg.recipe == "vgg2014" and cfg.momentum == 0.9 and cfg.epochs == 74  # recipe
    assert cfg.batch_size == 32 and cfg.augment == "crop,flip"  # file over recipe
    assert cfg.lr == 0.5  # flag over file
    args = build_parser().parse_args(["train", "--recipe", "alexnet2012", "--config", str(cfg_file)])
    assert config_from_args(args, TrainConfig()).recipe == "alexnet2012"  # the flag's recipe wins


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        read_config_file(bad)
    bad.write_text("lr = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.toml")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.1\nepochs: 3\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="PyYAML"):
            read_config_file(yaml_file)
    else:
        assert read_config_file(yaml_file) == {"lr": 0.1, "epochs": 3}


def test_cli_recipe_run_saves_the_resolved_configuration(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--recipe", "vgg2014", "--model", "lenet5", "--epochs", "1", "--batch-size", "64",
                 "--lr", "0.05", "--input-size", "32", "--load-size", "36", "--augment", "scale=36:44,flip",
                 "--scales", "36", "40", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "test protocol multiscale" in stdout
    args = json.loads((out / "args.json").read_text())
    assert (args["recipe"], args["mean"], args["momentum"], args["weight_decay"], args["plateau_metric"]) == (
        "vgg2014", "channel", 0.9, 5e-4, "error")
    saved = TrainConfig.from_dict(read_config_file(out / "config.toml"))
    assert asdict(saved) == {k: (tuple(v) if k in ("input_size", "load_size") else v)
                             for k, v in args.items() if k in asdict(saved)}
    test = json.loads((out / "test.json").read_text())
    assert test["protocol"] == "multiscale" and test["scales"] == [36, 40] and 0 <= test["acc1"] <= 1
    mean = load_checkpoint(out / "last.safetensors").mean_image
    assert mean.shape == (1, 32, 32) and torch.equal(mean, mean[:, :1, :1].expand_as(mean))  # per channel


def quick(tmp_path, **kw):
    return TrainConfig(**{"out": str(tmp_path / "run"), "epochs": 2, "batch_size": 64, **kw})


@pytest.mark.slow
def test_polyak_averaging_is_evaluated_saved_and_resumed(tmp_path):
    straight = fit(quick(tmp_path / "a", weight_average="polyak"))
    ckpt = load_checkpoint(straight["last_checkpoint"])
    assert ckpt.meta["n_averaged"] == 2 * 23  # every step of both epochs (1438 images, batches of 64)
    assert ckpt.live_state is not None
    assert any(not torch.equal(ckpt.live_state[k], ckpt.model_state[k]) for k in ckpt.model_state)
    # eval uses the averaged weights: the same accuracy as the run's last validation
    result = evaluate_checkpoint(straight["last_checkpoint"], device="cpu")
    assert result["acc1"] == pytest.approx(straight["final"]["val_acc1"])
    fit(quick(tmp_path / "b", weight_average="polyak", epochs=1))
    resumed = load_checkpoint(fit(quick(tmp_path / "b", weight_average="polyak"), resume=True)["last_checkpoint"])
    for k in ckpt.model_state:
        assert torch.equal(resumed.model_state[k], ckpt.model_state[k])
        assert torch.equal(resumed.live_state[k], ckpt.live_state[k])


@pytest.mark.slow
def test_ranking_hinge_loss_with_l2_features_trains(tmp_path):
    summary = fit(quick(tmp_path, loss="ranking-hinge", l2_features=True, epochs=3, lr=0.1))
    assert summary["final"]["val_acc1"] > 0.8
    # the checkpoint rebuilds the normalised head: evaluation agrees with training
    result = evaluate_checkpoint(summary["last_checkpoint"], device="cpu")
    assert result["acc1"] == pytest.approx(summary["final"]["val_acc1"])


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"precision": "bf16", "channels_last": True}, {"precision": "fp16", "epochs": 1},
                                     {"schedule": "piecewise", "lr_steps": [[1, 1.0], [2, 0.1]]}])
def test_run_options(tmp_path, options):
    summary = fit(quick(tmp_path, **options))
    assert summary["final"]["val_acc1"] > 0.3
    rows = load_checkpoint(summary["last_checkpoint"]).meta["history"]
    if options.get("schedule") == "piecewise":
        assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.005])


@pytest.mark.slow
def test_compile_wraps_the_training_step(tmp_path, monkeypatch):
    compiled = []
    real = torch.compile

    def eager_compile(model, **kw):  # the eager backend: dynamo traces, no C++ toolchain needed
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    summary = fit(quick(tmp_path, epochs=1, compile=True))
    assert len(compiled) == 1 and summary["final"]["val_acc1"] > 0.3


@pytest.mark.parametrize("argv, fragment", [
    (["--augment", "crop,warp"], "unknown augmentation 'warp'"),
    (["--load-size", "40"], "--load-size"),
    (["--recipe", "googlenet2014", "--model", "lenet5", "--tta", "multiscale"], "--scales"),
    (["--tta", "10crop"], "--load-size"),
    (["--tta", "multiscale", "--scales", "24"], "smaller than"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, fragment):
    code = main(["train", "--epochs", "1", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and fragment in err
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_cli_bad_config_file(tmp_path, capsys):
    (tmp_path / "run.toml").write_text("epoch = 3\n")
    code = main(["train", "--config", str(tmp_path / "run.toml")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown setting 'epoch'" in err and "did you mean epochs" in err
