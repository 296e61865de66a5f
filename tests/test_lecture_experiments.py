"""The four experiment sections of ``cnnkit lecture`` (``cnnkit.lecture.exp_*``), each run once with
``quick=True`` into one folder (so "strided_fcn" reuses the patch classifier "direct_maps" trained):
the figures exist and the result each section reports holds, with a margin."""

from __future__ import annotations

import json

import pytest

from cnnkit.lecture import experiments
from cnnkit.lecture.section import Section

# the order matters: "strided_fcn" reuses the patch classifier that "direct_maps" trained
SECTIONS = {key: getattr(experiments, key) for key in ("relu_tanh", "direct_maps", "strided_fcn", "stride1_pooling")}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("lecture")
    sections = {key: build(out, quick=True, seed=0, progress=False) for key, build in SECTIONS.items()}
    results = {key: json.loads((out / "runs" / key / "results.json").read_text()) for key in SECTIONS}
    return out, sections, results


@pytest.mark.parametrize("key", list(SECTIONS))
def test_section_contract(report, key):
    out, sections, _ = report
    section = sections[key]
    assert isinstance(section, Section) and section.key == key
    assert section.command == f"cnnkit lecture --only {key}"
    assert section.figures and all(f.startswith(key) and f.endswith(".png") for f in section.figures)
    for figure in section.figures:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert figure in section.markdown
    assert "|---|" in section.markdown  # the result table
    assert Section.from_json(json.loads(json.dumps(section.to_json()))) == section
    assert (out / "runs" / key).is_dir()


def test_relu_reaches_the_threshold_sooner_at_the_papers_scale(report):
    _, sections, results = report
    runs = {r["activation"]: r for r in results["relu_tanh"]["runs"] if r["condition"] == "paper"}
    relu, tanh = runs["relu"]["passes_to_threshold"], runs["tanh"]["passes_to_threshold"]
    assert relu is not None and relu <= 1.5
    assert tanh is None or tanh >= 1.5 * relu
    assert len(runs["relu"]["train_error"]) == 4 * results["relu_tanh"]["passes"]["paper"]  # every quarter pass
    number = sections["relu_tanh"].numbers[0]
    assert number.lecture.startswith("about 6x") and number.agrees is None


def test_direct_map_fails_when_objects_move_and_the_dense_patch_classifier_does_not(report):
    r = report[2]["direct_maps"]
    direct = [v for k, v in r.items() if k.startswith("direct map")]
    dense = [v for k, v in r.items() if k.startswith("patch classifier")]
    (direct_in, direct_moved), (dense_in, dense_moved) = direct, dense
    assert direct_in["iou"] > 0.5
    assert direct_moved["iou"] < 0.25 < direct_in["iou"] - 0.25
    assert dense_in["iou"] > 0.75
    assert dense_moved["iou"] > dense_in["iou"] - 0.05


def test_exact_dense_equals_patch_by_patch_and_the_strided_fcn_is_coarse(report):
    r = report[2]["strided_fcn"]
    assert r["coarse_size"] == [8, 8] and r["exact_size"] == [32, 32]
    diff = r["max_abs_diff_to_patch_by_patch"]
    assert diff["exact dense (d-regularly sparse)"] < 1e-4
    assert r["max_abs_diff_fcn_vs_exact_at_centres"] < 1e-4
    assert min(diff["strided FCN, nearest"], diff["strided FCN, bilinear"]) > 0.1
    acc = r["accuracy"]
    exact = acc["exact dense (d-regularly sparse)"]["near_boundary"]
    assert exact > acc["strided FCN, nearest"]["near_boundary"] + 0.05
    assert exact > acc["strided FCN, bilinear"]["near_boundary"] + 0.01
    assert r["seconds_per_image"]["patch by patch"] > 5 * r["seconds_per_image"]["exact dense (d-regularly sparse)"]


def test_stride1_pooling_is_more_invariant_than_none_and_keeps_more_than_stride_k(report):
    r = report[2]["stride1_pooling"]
    none = r["none"]
    assert none["r2"] > 0.999 and none["positions_told_apart"] == [324, 324]
    for k in (2, 3):
        s1, sk = r[f"max {k}x{k}, stride 1"], r[f"max {k}x{k}, stride {k}"]
        assert s1["relative_change"] < none["relative_change"] - 0.03
        assert s1["r2"] < none["r2"]  # information lost at full resolution
        assert 1 - sk["r2"] > 1.5 * (1 - s1["r2"])  # stride k loses more
        assert s1["positions_told_apart"] == [324, 324]
        assert sk["positions_told_apart"] == [324 // k**2, 324]
