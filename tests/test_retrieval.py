"""Features and retrieval: metrics against a naive twin and scikit-learn, files, and mAP on real digits."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from cnnkit.analysis.retrieval import (
    default_feature_layer,
    evaluate_retrieval,
    l2_normalise,
    load_features,
    nearest,
    run_retrieval,
    save_features,
)
from cnnkit.cli import main
from cnnkit.errors import ConfigError, DataError
from cnnkit.models import create
from cnnkit.train.runner import TrainConfig, fit


def naive_retrieval(q, ql, db, dbl, ks, metric="euclidean"):
    """The obvious loops: rank the database for each query, walk down the ranking."""
    aps, precs = [], {k: [] for k in ks}
    for i in range(len(q)):
        if metric == "euclidean":
            dist = [float(((q[i] - db[j]) ** 2).sum().sqrt()) for j in range(len(db))]
        else:
            dist = [1 - float(q[i] @ db[j] / (q[i].norm() * db[j].norm())) for j in range(len(db))]
        order = sorted(range(len(db)), key=lambda j: (dist[j], j))
        hits, total, relevant = 0, 0.0, int((dbl == ql[i]).sum())
        for rank, j in enumerate(order, start=1):
            if dbl[j] == ql[i]:
                hits += 1
                total += hits / rank
            if rank in precs:
                precs[rank].append(hits / rank)
        aps.append(total / relevant)
    return float(np.mean(aps)), {k: float(np.mean(v)) for k, v in precs.items()}


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_metrics_match_the_naive_twin_and_sklearn(metric):
    g = torch.Generator().manual_seed(0)
    db, q = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randn(25, 5, generator=g, dtype=torch.float64)
    dbl, ql = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    db[dbl == 1] += 1.5  # some structure, so that AP is not just chance
    q[ql == 1] += 1.5
    result = evaluate_retrieval(q, ql, db, dbl, metric=metric, ks=(1, 5, 10), chunk=7)
    expected_map, expected_p = naive_retrieval(q, ql, db, dbl, (1, 5, 10), metric)
    assert result["map"] == pytest.approx(expected_map, abs=1e-12)
    for k, v in expected_p.items():
        assert result[f"precision@{k}"] == pytest.approx(v, abs=1e-12)
    # scikit-learn's AP of each query with scores = -distance (no ties among random distances)
    for i in range(len(q)):
        dist = torch.cdist(q[i:i + 1], db)[0] if metric == "euclidean" else \
            1 - l2_normalise(q[i:i + 1]) @ l2_normalise(db).T
        ap = average_precision_score((dbl == ql[i]).numpy(), -dist.flatten().numpy())
        assert float(result["ap"][i]) == pytest.approx(ap, abs=1e-12)
    counts = torch.bincount(dbl, minlength=4).double()
    assert result["chance_map"] == pytest.approx(float((counts[ql] / 60).mean()))


def test_perfect_and_random_features():
    labels = torch.arange(200) % 10
    perfect = torch.nn.functional.one_hot(labels, 10).float()
    r = evaluate_retrieval(perfect, labels, perfect, labels)
    assert r["map"] == 1.0 and r["precision@10"] == 1.0
    noise = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    r = evaluate_retrieval(noise[:100], labels[:100], noise[100:], labels[100:])
    assert abs(r["map"] - r["chance_map"]) < 0.05


def test_nearest_cosine_is_euclidean_on_normalised_features():
    g = torch.Generator().manual_seed(2)
    q, db = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    idx = nearest(q, db, 5, "cosine", chunk=4)
    assert torch.equal(idx, nearest(l2_normalise(q), l2_normalise(db), 5, "euclidean"))
    brute = torch.stack([torch.tensor(sorted(range(40), key=lambda j: float((q[i] - db[j]).norm()))[:5])
                         for i in range(9)])
    assert torch.equal(nearest(q, db, 5), brute)
    assert torch.allclose(l2_normalise(q).norm(dim=1), torch.ones(9, dtype=torch.float64))
    with pytest.raises(ConfigError, match="unknown metric"):
        nearest(q, db, 5, "manhattan")


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_feature_files_round_trip_atomically(tmp_path, suffix):
    feats, labels = torch.randn(7, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    written = save_features(tmp_path / f"f{suffix}", feats, labels=labels, meta={"layer": "fc3"})
    assert not list(tmp_path.glob(".*.tmp")) and all(p.exists() for p in written)
    f2, l2, meta = load_features(tmp_path / f"f{suffix}")
    assert torch.equal(f2, feats) and torch.equal(l2, labels) and meta["layer"] == "fc3"
    if suffix == ".npy":
        assert np.array_equal(np.load(tmp_path / "f.npy"), feats.numpy())  # a plain array, readable anywhere
    with pytest.raises(ConfigError, match=r"\.npy or \.safetensors"):
        save_features(tmp_path / "f.txt", feats)
    with pytest.raises(DataError, match="does not exist"):
        load_features(tmp_path / "missing.npy")


def test_default_layer_is_the_top_hidden_layer():
    assert default_feature_layer(create("small_cnn")) == "relu3"
    assert default_feature_layer(create("small_cnn", dropout=0.5)) == "relu3"
    assert default_feature_layer(create("small_cnn", fc_width=[8, 8])) == "relu4"
    assert default_feature_layer(create("lenet5")) == "tanh6"


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval") / "run"
    fit(TrainConfig(model="small_cnn", model_options={"channels": [8, 16], "fc_width": 32}, epochs=2, batch_size=32,
                    out=str(out), device="cpu"), progress=False)
    return out / "last.safetensors"


@pytest.mark.slow
def test_digits_retrieval_far_above_chance_with_and_without_l2(digits_checkpoint, tmp_path):
    result = run_retrieval(digits_checkpoint, out=tmp_path, device="cpu")
    rows = {(r["features"], r["normalisation"]): r for r in result["rows"]}
    assert set(rows) == {("relu3", "none"), ("relu3", "l2"), ("pixels", "none"), ("pixels", "l2")}
    chance = rows["relu3", "none"]["chance_map"]
    assert 0.09 < chance < 0.11  # ten balanced classes
    for norm in ("none", "l2"):
        assert rows["relu3", norm]["map"] > 0.6 > 5 * chance, rows  # by a wide margin
        assert rows["relu3", norm]["map"] > rows["pixels", norm]["map"]  # features beat pixel distances
    assert result["queries"] == 359 and result["database"] == 1438 and result["dimensions"] == 32
    png = Image.open(tmp_path / "neighbours.png")
    assert png.size[0] > 400 and png.size[1] > 400 and np.asarray(png).std() > 30
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    assert saved["rows"][1]["map"] == pytest.approx(rows["relu3", "l2"]["map"])


@pytest.mark.slow
def test_cli_features_and_retrieve(digits_checkpoint, tmp_path, capsys):
    code = main(["features", str(digits_checkpoint), str(tmp_path / "f.safetensors"), "--layer", "conv2", "--l2",
                 "--split", "all"])
    out = capsys.readouterr().out
    assert code == 0 and "1797 x 1600 features of layer conv2 (L2-normalised)" in out  # 16 maps of 10x10
    feats, labels, meta = load_features(tmp_path / "f.safetensors")
    assert feats.shape == (1797, 1600) and torch.allclose(feats.norm(dim=1), torch.ones(1797))
    assert meta["split"] == "all" and labels.bincount().tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]

    image = tmp_path / "q.png"
    Image.fromarray((np.random.default_rng(0).random((20, 20)) * 255).astype(np.uint8)).save(image)
    code = main(["retrieve", str(digits_checkpoint), "--images", str(image), "--out", str(tmp_path / "r"),
                 "--show-k", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "queries 1 against a database of 1438" in out and "mAP" not in out
    assert (tmp_path / "r" / "neighbours.png").exists()

    for argv, fragment in [
        (["features", digits_checkpoint, tmp_path / "x.npy", "--layer", "conv9"], "no layer named 'conv9'"),
        (["features", digits_checkpoint, tmp_path / "x.csv"], ".npy or .safetensors"),
        (["retrieve", tmp_path / "missing.safetensors"], "does not exist"),
        (["retrieve", digits_checkpoint, "--k", "0"], "at least 1"),
    ]:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
