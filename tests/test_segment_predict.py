"""Segmentation prediction and scoring: TTA and model averaging against hand-written twins, resumable
and sharded file output, metrics against scikit-learn, and the command line's one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from cnnkit.dense import patch_by_patch
from cnnkit.errors import CheckpointError, DataError
from cnnkit.models import create_patch_net
from cnnkit.segmentation.augment import dihedral, preprocess
from cnnkit.segmentation.data import IGNORE_INDEX, load_image
from cnnkit.segmentation.metrics import ScoreHistogram, SegmentationMeter, best_threshold
from cnnkit.segmentation.predict import (
    Segmenter,
    class_colours,
    evaluate_files,
    load_segment_checkpoint,
    output_names,
    predict_files,
)
from cnnkit.train.checkpoint import Checkpoint, save_checkpoint

PREPROCESS = {"normalize": "image", "contrast": "none"}
USER_NET = '''
from torch import nn

def five(num_classes=2, in_chans=1):
    """A 5 x 5 patch net: conv 3x3, tanh, conv 3x3 to the class scores."""
    return nn.Sequential(nn.Conv2d(in_chans, 3, 3), nn.Tanh(), nn.Conv2d(3, num_classes, 3), nn.Flatten()), 5
'''


def _checkpoint(path: Path, seed: int = 0, *, classes: int = 2, name: str = "toy", task: str = "segment",
                threshold: float | None = None, border: str = "reflect") -> Path:
    torch.manual_seed(seed)
    options = {"num_classes": classes, "in_chans": 1}
    model, patch = create_patch_net(name, **options)
    meta = {"task": task, "patch": list(patch), "border": border, "preprocess": PREPROCESS,
            "threshold": threshold, "positive_class": 1, "palette": None, "ignore_value": None,
            "mask_mode": "auto", "config": {}}
    save_checkpoint(path, Checkpoint(model_name=name, model_options=options, model_state=model.state_dict(),
                                     classes=[f"class{k}" for k in range(classes)], epoch=1, meta=meta))
    return path


@pytest.fixture
def ckpt(tmp_path):
    return _checkpoint(tmp_path / "a.safetensors")


@pytest.fixture
def user_net(tmp_path, monkeypatch):
    (tmp_path / "seg_user_net.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "seg_user_net:five"


def _grey(path: Path, h: int, w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path)
    return path


def _folder(root: Path, n: int = 4) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [_grey(root / f"img{i}.png", 10 + i, 12, seed=i) for i in range(n)]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# --------------------------------------------------------------------------- TTA and averaging


def _hand_tta(ckpt_path: Path, image: torch.Tensor) -> torch.Tensor:
    """The 8 symmetries written out (flip left-right, then r quarter turns) and undone in reverse
    order, each pass patch by patch: the slow twin of Segmenter(tta=True)."""
    model, patch = create_patch_net("toy", num_classes=2, in_chans=1)
    model.load_state_dict(load_segment_checkpoint(ckpt_path).model_state)
    model.double().eval()
    x = preprocess(image.double(), normalize="image", contrast="none")[None]  # (1, 1, H, W)
    total = torch.zeros(2, *image.shape[1:], dtype=torch.float64)
    for flip in (False, True):
        for r in range(4):
            t = torch.rot90(x.flip(-1) if flip else x, r, (-2, -1))
            with torch.no_grad():
                y = torch.softmax(patch_by_patch(model, t, patch, border="reflect"), 1)[0]  # (K, h, w)
            y = torch.rot90(y, -r, (-2, -1))
            total += y.flip(-1) if flip else y
    return total / 8


def test_tta_is_the_mean_of_the_eight_transformed_passes(ckpt):
    image = load_image(_grey(ckpt.parent / "x.png", 11, 13, seed=5))  # not square: turns swap H and W
    seg = Segmenter(ckpt, tta=True, dtype=torch.float64)
    got = seg.probabilities(image)
    assert got.shape == (2, 11, 13) and got.dtype == torch.float64
    torch.testing.assert_close(got, _hand_tta(ckpt, image), rtol=0, atol=1e-10)


def test_tta_differs_from_one_pass_on_a_symmetric_image(ckpt):
    yy, xx = torch.meshgrid(torch.arange(15.0), torch.arange(15.0), indexing="ij")
    image = torch.exp(-((yy - 7) ** 2 + (xx - 7) ** 2) / 20)[None]  # a centred disc: all 8 symmetries
    assert all(torch.equal(dihedral(image, k), image) for k in range(8))
    tta = Segmenter(ckpt, tta=True, dtype=torch.float64).probabilities(image)
    one = Segmenter(ckpt, tta=False, dtype=torch.float64).probabilities(image)
    assert (tta - one).abs().max() > 1e-3  # the patch net is not equivariant: TTA does something


def test_two_checkpoints_average_their_probabilities(tmp_path, user_net):
    a = _checkpoint(tmp_path / "a.safetensors", seed=1)
    b = _checkpoint(tmp_path / "b.safetensors", seed=2, name=user_net, border="replicate")  # patch 5, not 15
    image = load_image(_grey(tmp_path / "x.png", 12, 10, seed=3))
    for tta in (False, True):
        both = Segmenter([a, b], tta=tta, dtype=torch.float64, allow_code=user_net).probabilities(image)
        pa = Segmenter(a, tta=tta, dtype=torch.float64).probabilities(image)
        pb = Segmenter(b, tta=tta, dtype=torch.float64, allow_code=[user_net]).probabilities(image)
        assert (pa - pb).abs().max() > 1e-3
        torch.testing.assert_close(both, (pa + pb) / 2, rtol=0, atol=1e-12)


def test_checkpoints_that_cannot_be_used_are_refused_in_one_line(tmp_path, user_net):
    user = _checkpoint(tmp_path / "user.safetensors", name=user_net)
    with pytest.raises(CheckpointError) as err:
        Segmenter(user)
    assert str(err.value) == (f"{user} builds its net by importing {user_net!r}, which loading never does on its "
                              f"own; pass --model {user_net} (allow_code) if you trust it")
    cls = _checkpoint(tmp_path / "cls.safetensors", task="classify")
    with pytest.raises(CheckpointError, match="classification checkpoint; evaluate it with `cnnkit eval`"):
        Segmenter(cls)
    three = _checkpoint(tmp_path / "three.safetensors", classes=3)
    with pytest.raises(CheckpointError, match="average only checkpoints of the same classes"):
        Segmenter([_checkpoint(tmp_path / "two.safetensors"), three])


def test_threshold_labels_the_positive_class(ckpt):
    probs = torch.tensor([[0.9, 0.6, 0.3], [0.1, 0.4, 0.7]])[:, None]  # (2, 1, 3)
    assert Segmenter(ckpt, threshold=None).labels(probs).tolist() == [[0, 0, 1]]
    assert Segmenter(ckpt, threshold=0.35).labels(probs).tolist() == [[0, 1, 1]]
    tuned = _checkpoint(ckpt.parent / "tuned.safetensors", threshold=0.05)
    assert Segmenter(tuned).labels(probs).tolist() == [[1, 1, 1]]  # "auto": the checkpoint's


# --------------------------------------------------------------------------- files


def test_predict_writes_labels_probability_and_overlay(tmp_path, ckpt):
    files = _folder(tmp_path / "images", 3)
    seg = Segmenter(ckpt, tta=False)
    seg.threshold = seg.probabilities(load_image(files[0]))[1].median().item()  # both classes in img0
    summary = predict_files(seg, files, tmp_path / "out")
    assert (summary.written, summary.skipped) == (3, 0)
    expected = {n for f in files for n in output_names(f.stem, 2)}
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected
    assert output_names("img0", 2) == ["img0_labels.png", "img0_prob.png", "img0_overlay.png"]
    image = load_image(files[0])
    probs = seg.probabilities(image)
    labels = np.asarray(Image.open(tmp_path / "out" / "img0_labels.png"))
    np.testing.assert_array_equal(labels, seg.labels(probs).numpy())
    prob = np.asarray(Image.open(tmp_path / "out" / "img0_prob.png"))
    assert prob.dtype == np.uint16
    np.testing.assert_allclose(prob / 65535, probs[1].numpy(), atol=1 / 65535)
    overlay = np.asarray(Image.open(tmp_path / "out" / "img0_overlay.png")).astype(int)
    grey = np.asarray(Image.open(files[0])).astype(int)
    colours = class_colours(2).astype(int)
    want = (0.5 * grey[..., None] + 0.5 * colours[labels] + 0.5).astype(int)
    np.testing.assert_array_equal(overlay, want)
    assert (labels == 0).any() and (labels == 1).any()  # class 0 is tinted too


def test_every_class_gets_its_own_colour():
    for k in (1, 2, 21, 22, 300):
        colours = class_colours(k)
        assert colours.shape == (k, 3) and len({tuple(c) for c in colours}) == k
    given = class_colours(3, [[1, 2, 3], [0, 0, 0]])
    assert given[:2].tolist() == [[1, 2, 3], [0, 0, 0]] and len({tuple(c) for c in given}) == 3


def test_more_classes_write_one_probability_file_per_class(tmp_path):
    ckpt = _checkpoint(tmp_path / "k3.safetensors", classes=3)
    files = _folder(tmp_path / "images", 1)
    predict_files(Segmenter(ckpt, tta=False), files, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "img0_labels.png", "img0_overlay.png", "img0_prob_0.png", "img0_prob_1.png", "img0_prob_2.png"]


def test_rerun_skips_and_an_interrupted_image_is_redone(tmp_path, ckpt):
    files = _folder(tmp_path / "images", 4)
    out = tmp_path / "out"
    seg = Segmenter(ckpt, tta=False)
    predict_files(seg, files, out)
    before = _mtimes(out)
    again = predict_files(seg, files, out)
    assert (again.written, again.skipped) == (0, 4) and _mtimes(out) == before
    # a run killed while writing img2: one of its files written, one left as a temporary file
    for name in output_names("img2", 2)[1:]:
        (out / name).unlink()
    (out / ".img2_prob.png.k1ll3d00.tmp").write_bytes(b"half a png")
    resumed = predict_files(seg, files, out)
    assert (resumed.written, resumed.skipped, resumed.stale_tmp_removed) == (1, 3, 1)
    after = _mtimes(out)
    assert sorted(after) == sorted(before) and not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    changed = {n for n in after if after[n] != before[n]}
    assert changed == set(output_names("img2", 2))


def test_ranks_share_the_files_exactly_once(tmp_path, ckpt):
    files = _folder(tmp_path / "images", 5)
    seg = Segmenter(ckpt, tta=False)
    written = []
    for rank in range(2):
        out = tmp_path / f"rank{rank}"
        summary = predict_files(seg, files, out, rank=rank, world_size=2)
        written.append({p.name.split("_")[0] for p in out.iterdir()})
        assert summary.written == len(written[-1])
    assert not written[0] & written[1] and written[0] | written[1] == {f.stem for f in files}


def test_an_unreadable_image_leaves_no_output(tmp_path, ckpt):
    files = _folder(tmp_path / "images", 2)
    bad = tmp_path / "images" / "img1.png"
    bad.write_text("not a png")
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        predict_files(Segmenter(ckpt, tta=False), files, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(output_names("img0", 2))


# --------------------------------------------------------------------------- metrics


def _scored(seed: int = 0, k: int = 2, n: int = 3, size: int = 40):
    """Probabilities that lean towards the truth, a target with ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (n, size, size), generator=g)
    logits = torch.randn(n, k, size, size, generator=g, dtype=torch.float64)
    logits += 1.5 * torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2)
    target[:, :5] = IGNORE_INDEX
    return torch.softmax(logits, 1), target


@pytest.mark.parametrize("k,positive", [(2, 1), (2, 0), (3, 1)])
def test_metrics_against_sklearn(k, positive):
    probs, target = _scored(k=k)
    meter = SegmentationMeter(k, positive=positive)
    for i in range(len(probs)):
        meter.update(probs[i:i + 1], target[i:i + 1])
    m = meter.compute()
    keep = target != IGNORE_INDEX
    t, p = target[keep].numpy(), probs.argmax(1)[keep].numpy()
    classes = list(range(k))
    assert m["confusion_matrix"] == skm.confusion_matrix(t, p, labels=classes).tolist()
    assert m["pixels"] == keep.sum().item()
    assert m["pixel_accuracy"] == pytest.approx(skm.accuracy_score(t, p), abs=1e-12)
    np.testing.assert_allclose(m["per_class_iou"], skm.jaccard_score(t, p, average=None, labels=classes))
    prec, rec, f1, _ = skm.precision_recall_fscore_support(t, p, labels=classes)
    np.testing.assert_allclose(m["per_class_precision"], prec)
    np.testing.assert_allclose(m["per_class_recall"], rec)
    np.testing.assert_allclose(m["per_class_f1"], f1)
    assert m["mean_iou"] == pytest.approx(np.mean(m["per_class_iou"]))
    if k == 2:
        assert m["positive_class"] == positive
        assert m["f1"] == pytest.approx(skm.f1_score(t, p, pos_label=positive))
        auc = skm.roc_auc_score(t == positive, probs[:, positive][keep].numpy())
        assert abs(m["roc_auc"] - auc) < 1e-4
    else:
        assert "roc_auc" not in m and "f1" not in m


def test_histogram_auc_is_exact_on_bin_edges_and_bounded_otherwise():
    g = torch.Generator().manual_seed(1)
    labels = torch.rand(200_000, generator=g) < 0.2
    scores = (torch.rand(200_000, generator=g, dtype=torch.float64) + 0.3 * labels).clamp(0, 1)
    hist = ScoreHistogram()
    hist.update(scores, labels)
    assert abs(hist.roc_auc() - skm.roc_auc_score(labels.numpy(), scores.numpy())) < 1e-4
    assert hist.counts.numel() == 2 * 2**16  # memory does not grow with the pixels
    quantised = (scores * 1024).floor() / 1024  # every score on a bin edge: ties are real ties
    exact = ScoreHistogram()
    exact.update(quantised, labels)
    assert exact.roc_auc() == pytest.approx(skm.roc_auc_score(labels.numpy(), quantised.numpy()), abs=1e-12)


def _f1_at(scores: np.ndarray, labels: np.ndarray, t: float) -> float:
    pred = scores >= t
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    return 2 * tp / (2 * tp + fp + fn)


def test_best_threshold_against_brute_force():
    probs, target = _scored(seed=4)
    probs = (probs * 512).floor() / 512  # scores on bin edges: the histogram sees every threshold
    keep = target != IGNORE_INDEX
    scores, labels = probs[:, 1][keep].numpy(), target[keep].numpy() == 1
    brute = max(_f1_at(scores, labels, t) for t in np.unique(scores))
    meter = SegmentationMeter(2)
    meter.update(probs, target)
    t, f1 = best_threshold(meter)
    assert f1 == pytest.approx(brute, abs=1e-12)
    assert _f1_at(scores, labels, t) == pytest.approx(f1, abs=1e-12)
    assert meter.compute()["best_threshold"] == t
    # continuous scores: never better than the brute-force best, and close to it
    cont, target = _scored(seed=5)
    keep = target != IGNORE_INDEX
    scores, labels = cont[:, 1][keep].numpy(), target[keep].numpy() == 1
    hist = ScoreHistogram()
    hist.update(cont[:, 1][keep], target[keep] == 1)
    t, f1 = best_threshold(hist)
    assert _f1_at(scores, labels, t) == pytest.approx(f1, abs=1e-12)
    assert f1 <= max(_f1_at(scores, labels, s) for s in np.unique(scores)) <= f1 + 1e-3


def test_evaluate_files_honours_valid_regions_and_ignore_value(tmp_path, ckpt):
    files = _folder(tmp_path / "images", 2)
    rng = np.random.default_rng(0)
    masks, valids = [], []
    for f in files:
        h, w = np.asarray(Image.open(f)).shape
        mask = rng.choice([0, 255, 7], size=(h, w), p=[0.6, 0.3, 0.1]).astype(np.uint8)
        masks.append(tmp_path / f"{f.stem}_mask.png")
        Image.fromarray(mask).save(masks[-1])
        region = np.zeros((h, w), np.uint8)
        region[2:, 1:] = 255
        valids.append(tmp_path / f"{f.stem}_fov.png")
        Image.fromarray(region).save(valids[-1])
    seg = Segmenter(ckpt, tta=False)
    m = evaluate_files(seg, files, masks, valids, mask_mode="binary", ignore_value=7)
    meter = SegmentationMeter(2)
    for f, mp, vp in zip(files, masks, valids):
        raw = np.asarray(Image.open(mp))
        target = torch.from_numpy((raw > 127).astype(np.int64))
        target[torch.from_numpy((raw == 7) | (np.asarray(Image.open(vp)) == 0))] = IGNORE_INDEX
        valid = torch.from_numpy(np.asarray(Image.open(vp)) > 0)
        meter.update(seg.probabilities(load_image(f), valid)[None], target[None])
    want = meter.compute()
    assert m["confusion_matrix"] == want["confusion_matrix"] and m["roc_auc"] == want["roc_auc"]
    assert m["images"] == 2 and m["classes"] == ["class0", "class1"]


# --------------------------------------------------------------------------- command line

RUNNER = """
import sys, types
import cnnkit.cli as cli
from cnnkit.cli import segment_predict as sp

def register(sub):
    seg = sub.add_parser("segment")
    segsub = seg.add_subparsers(dest="segment_command", parser_class=type(seg))
    sp.add_predict_parser(segsub)
    sp.add_eval_parser(segsub)

mod = types.ModuleType("segment_predict_under_test")
mod.register = register
sys.modules[mod.__name__] = mod
cli.COMMAND_MODULES = [mod.__name__]
sys.exit(cli.main(sys.argv[1:]))
"""


def _registered() -> bool:
    """Whether `cnnkit segment` already offers these parsers (else the tests run them on their own)."""
    from cnnkit.cli import build_parser

    def sub(parser, name):
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        return action.choices.get(name) if action else None

    try:
        seg = sub(build_parser(), "segment")
        ev = seg and sub(seg, "eval")
    except Exception:
        return False
    return bool(ev) and "--positive-class" in ev._option_string_actions


def _cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cnnkit"] if _registered() else [sys.executable, "-c", RUNNER]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, "segment", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def _eval_data(root: Path, mask_size=None, value: int = 255) -> Path:
    files = _folder(root / "images", 2)
    (root / "masks").mkdir()
    for f in files:
        h, w = np.asarray(Image.open(f)).shape
        mask = np.zeros(mask_size or (h, w), np.uint8)
        mask[: mask.shape[0] // 2] = value
        Image.fromarray(mask).save(root / "masks" / f.name)
    return root


def test_cli_eval_prints_scores_and_writes_json(tmp_path, ckpt):
    data = _eval_data(tmp_path / "data")
    out = tmp_path / "m.json"
    r = _cli("eval", ckpt, "--data", data, "--no-tta", "--out", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    saved = json.loads(out.read_text())
    assert saved["pixels"] == 10 * 12 + 11 * 12 and saved["classes"] == ["class0", "class1"]
    assert lines[0].startswith(f"pixel_accuracy {saved['pixel_accuracy']:.4f}  mean_iou ")
    assert lines[0].endswith(f"roc_auc {saved['roc_auc']:.4f}  (2 images, 252 pixels, argmax, TTA off)")
    assert lines[1].split() == ["class", "IoU", "prec.", "recall", "F1"]
    assert [row.split()[:2] for row in lines[2:4]] == [["0", "class0"], ["1", "class1"]]


@pytest.mark.parametrize("case", ["size", "value"])
def test_cli_eval_bad_mask_is_one_line(tmp_path, ckpt, case):
    data = _eval_data(tmp_path / "data", mask_size=(9, 12) if case == "size" else None,
                      value=255 if case == "size" else 5)
    r = _cli("eval", ckpt, "--data", data, "--no-tta")
    mask = data / "masks" / "img0.png"
    want = {"size": f"error: mask {mask} is 12x9 but image img0.png is 12x10; pass the mask made for this image, "
                    "at its size",
            "value": f"error: mask {mask} has value 5 but the checkpoint has 2 classes (0..1); pass masks of "
                     "these classes, or --ignore-value 5 if 5 marks unlabelled pixels"}[case]
    assert (r.returncode, r.stderr.splitlines(), r.stdout) == (2, [want], "")


def test_cli_predict_unreadable_image_is_one_line_and_writes_nothing_for_it(tmp_path, ckpt):
    files = _folder(tmp_path / "images", 2)
    files[1].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    try:
        load_image(files[1])
    except DataError as exc:
        want = f"error: {exc}"
    out = tmp_path / "out"
    r = _cli("predict", ckpt, "--images", tmp_path / "images", "--out", out, "--no-tta")
    assert (r.returncode, r.stderr.splitlines()) == (2, [want])
    assert sorted(p.name for p in out.iterdir()) == sorted(output_names("img0", 2))


def _parser() -> argparse.ArgumentParser:
    from cnnkit.cli import Parser
    from cnnkit.cli.segment_predict import add_eval_parser, add_predict_parser

    parser = Parser(prog="cnnkit segment")
    segsub = parser.add_subparsers(parser_class=Parser)
    add_predict_parser(segsub)
    add_eval_parser(segsub)
    return parser


def test_help_shows_every_default():
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("predict", "eval"):
        for action in sub.choices[name]._actions:
            if action.option_strings and not action.required and action.dest != "help":
                assert "default:" in sub.choices[name]._get_formatter()._get_help_string(action), action.dest


def test_under_torchrun_predict_labels_its_share(tmp_path, ckpt, monkeypatch, capsys):
    files = _folder(tmp_path / "images", 5)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = _parser().parse_args(["predict", str(ckpt), "--images", str(tmp_path / "images"), "--out",
                                 str(tmp_path / "out"), "--no-tta", "--device", "cpu"])
    assert args.func(args) == 0
    assert {p.name.split("_")[0] for p in (tmp_path / "out").iterdir()} == {files[1].stem, files[3].stem}
    assert capsys.readouterr().out.startswith("process 1 of 2: wrote the outputs of 2 images")
