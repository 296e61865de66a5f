"""Features and retrieval: the streaming ranking against a full-sort twin (ties included), metrics
against scikit-learn, files, and mAP on real digits."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from cnnkit.analysis.retrieval import (
    Database,
    compute_features,
    default_feature_layer,
    distances,
    evaluate_retrieval,
    l2_normalise,
    load_features,
    nearest,
    pixel_baseline_skipped,
    query_subset,
    run_retrieval,
    save_features,
    stable_order,
)
from cnnkit.cli import main
from cnnkit.errors import ConfigError, DataError
from cnnkit.models import create
from cnnkit.train.runner import TrainConfig, fit


def naive_retrieval(q, ql, db, dbl, ks, metric="euclidean"):
    """The obvious loops: every distance one by one, then each query's ranking walked down."""
    rows = []
    for i in range(len(q)):
        if metric == "euclidean":
            rows.append([float(((q[i] - db[j]) ** 2).sum().sqrt()) for j in range(len(db))])
        else:
            rows.append([1 - float(q[i] @ db[j] / (q[i].norm() * db[j].norm())) for j in range(len(db))])
    aps, precs = full_sort_twin(np.array(rows), np.asarray(ql), np.asarray(dbl), ks)
    return float(np.mean(aps)), {k: float(np.mean(v)) for k, v in precs.items()}


def full_sort_twin(dist, ql, dbl, ks):
    """Per query: AP and precision@k from the whole ranking, NumPy's stable argsort, walked in order."""
    aps, precs = [], {k: [] for k in ks}
    for i in range(len(dist)):
        order = np.argsort(dist[i], kind="stable")
        hits, total, relevant = 0, 0.0, int((dbl == ql[i]).sum())
        for rank, j in enumerate(order, start=1):
            if dbl[j] == ql[i]:
                hits += 1
                total += hits / rank
            if rank in precs:
                precs[rank].append(hits / rank)
        aps.append(total / relevant if relevant else 0.0)
    return aps, precs


def tied_features(dtype, seed=0):
    """Few distinct values in 3 dimensions, duplicated and zero database rows: many exactly equal distances,
    across classes too. Query class 5 has no database item (AP 0)."""
    g = torch.Generator().manual_seed(seed)
    db = torch.randint(0, 3, (300, 3), generator=g).to(dtype)
    db[100:140] = db[:40]  # duplicates, of other classes as often as not
    db[200:210] = 0
    q = torch.randint(0, 3, (90, 3), generator=g).to(dtype)
    q[:5] = 0
    q[48:] += 0.5  # no query at distance 0 from any item: their chunks take the fast path (Euclidean)
    dbl, ql = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 6, (90,), generator=g)
    return q, ql, db, dbl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["none", "l2"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_streaming_ranking_equals_a_full_stable_sort_with_ties(metric, norm, dtype):
    q, ql, db, dbl = tied_features(dtype)
    if norm == "l2":
        q, db = l2_normalise(q), l2_normalise(db)
    chunk = 16  # several chunks; each makes one distance call, as the twin does
    dist = torch.cat([distances(x, db, metric) for x in q.split(chunk)]).numpy()
    tied = (np.diff(np.sort(dist, axis=1), axis=1) == 0).sum()
    assert tied > 1000  # the ties are there
    ks = (1, 5, 10, 400)  # k beyond the database: precision over all of it
    result = evaluate_retrieval(q, ql, db, dbl, metric=metric, ks=ks, chunk=chunk)
    aps, precs = full_sort_twin(dist, ql.numpy(), dbl.numpy(), (1, 5, 10, 300))
    assert result["ap"].tolist() == aps  # exact: the same ranks, the same sums in the same order
    assert float(result["ap"][ql == 5].abs().sum()) == 0.0
    for k in (1, 5, 10, 300):
        assert result["precision"][k].tolist() == precs[k]
        assert result[f"precision@{k}"] == float(torch.tensor(precs[k], dtype=torch.float64).mean())
    assert result["map"] == float(torch.tensor(aps, dtype=torch.float64).mean())
    # the chunk size changes nothing when each chunk's distance calls are the same (multiples of 64)
    assert torch.equal(evaluate_retrieval(q, ql, db, dbl, metric=metric, ks=ks, chunk=64)["ap"],
                       evaluate_retrieval(q, ql, db, dbl, metric=metric, ks=ks)["ap"])


def test_stable_order_is_a_stable_argsort_on_awkward_values():
    g = torch.Generator().manual_seed(3)
    d = torch.randint(-4, 5, (6, 200), generator=g).float() / 4  # ties, negatives, zeros
    d[0, 3], d[0, 4], d[1, 5], d[1, 7], d[2, 9], d[2, 11] = -0.0, 0.0, float("nan"), float("nan"), float("inf"), -1e-30
    d[3, :] = 2.5  # one value throughout
    expected = d.sort(dim=1, stable=True).indices.numpy()
    for dd in (d, d.double(), d.abs() + 1):  # careful float32, float64, and the fast float32 path
        for threads in (1, 4):
            assert np.array_equal(stable_order(dd, threads), dd.sort(dim=1, stable=True).indices.numpy())
    assert np.array_equal(stable_order(d), expected)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n", [20, 200])  # torch.cdist computes directly up to 25 rows, by a product above
def test_database_distances_are_those_of_distances_bit_for_bit(metric, n):
    g = torch.Generator().manual_seed(4)
    q, db = torch.randn(150, 40, generator=g), torch.randn(n, 40, generator=g)
    expected = torch.cat([distances(x, db, metric) for x in q.split(64)])
    assert torch.equal(Database.of(db, metric).distances(q), expected)
    assert torch.equal(Database(db.split(7), n, 40, metric).distances(q), expected)  # built from batches
    with pytest.raises(DataError, match="expected 20"):
        Database(db[:10].split(7), 20, 40, metric)


def test_query_subset_and_pixel_baseline_limit():
    a = query_subset(10_000, 500)
    assert torch.equal(a, query_subset(10_000, 500)) and len(a.unique()) == 500  # the same every run
    assert torch.equal(a, a.sort().values) and int(a.max()) > 9000  # in order, from all over
    assert query_subset(10, 10) is None and query_subset(10, None) is None
    with pytest.raises(ConfigError, match="at least 1"):
        query_subset(10, 0)
    assert pixel_baseline_skipped(359, 1438, 64) is None  # digits
    reason = pixel_baseline_skipped(10_000, 50_000, 3072)  # CIFAR-10
    assert "1.5e+12 multiply-adds" in reason and "--queries 651 or fewer" in reason
    assert pixel_baseline_skipped(651, 50_000, 3072) is None
    assert "GiB" in pixel_baseline_skipped(100, 1_000_000, 3072)


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


def test_features_of_a_sliced_array_dataset_equal_item_by_item(digits_checkpoint):
    from torch.utils.data import Subset

    from cnnkit.analysis.common import checkpoint_splits
    from cnnkit.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(digits_checkpoint)
    model, val = ckpt.build_model(), checkpoint_splits(ckpt).val
    fast = compute_features(model, val, "relu3", mean=ckpt.mean_image, batch_size=100)
    slow = compute_features(model, Subset(val, range(len(val))), "relu3", mean=ckpt.mean_image, batch_size=100)
    assert fast.shape == (359, 32) and torch.equal(fast, slow)


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
    assert "pixels_skipped" not in result

    part = run_retrieval(digits_checkpoint, queries=100, device="cpu")
    assert part["queries"] == 100 and part["queries_available"] == 359 and len(part["rows"]) == 4
    assert part["rows"][0]["map"] != rows["relu3", "none"]["map"]  # another set of queries


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

    code = main(["retrieve", str(digits_checkpoint), "--queries", "50", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 0 and "queries 50 (a random subset of 359, seed 0) against a database of 1438" in out

    for argv, fragment in [
        (["features", digits_checkpoint, tmp_path / "x.npy", "--layer", "conv9"], "no layer named 'conv9'"),
        (["features", digits_checkpoint, tmp_path / "x.csv"], ".npy or .safetensors"),
        (["retrieve", tmp_path / "missing.safetensors"], "does not exist"),
        (["retrieve", digits_checkpoint, "--k", "0"], "at least 1"),
    ]:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    with pytest.raises(SystemExit) as exit_:  # refused by the parser, before any work
        main(["retrieve", str(digits_checkpoint), "--queries", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--queries: '0' is not a positive whole number" in err
