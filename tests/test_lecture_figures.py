"""The lecture report's figure sections, each built once in quick mode: figures written, key facts hold.

The studies and filters sections train (runner.fit) for a few seconds; the whole file takes about a minute.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cnnkit.lecture import figures
from cnnkit.lecture.fig_dense import LECTURE_D, sparse_pair, toy_trace, zero_inserted
from cnnkit.lecture.fig_frequency import crossover
from cnnkit.lecture.fig_geometry import stage_rows
from cnnkit.lecture.section import Section


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("lecture")
    sections = {key: build(out, quick=True, seed=0, progress=False) for key, build in figures.FIGURE_SECTIONS.items()}
    return out, sections


def number(section: Section, start: str):
    return next(n for n in section.numbers if n.what.startswith(start))


def test_every_section_keeps_the_contract(built):
    out, sections = built
    assert list(sections) == list(figures.FIGURE_SECTIONS)
    for key, s in sections.items():
        assert s.key == key
        assert s.command == f"cnnkit lecture --only {key}"
        assert s.figures and all(f.startswith(key) and f.endswith(".png") for f in s.figures)
        for f in s.figures:
            assert f in s.markdown  # the text says what each figure shows
            with Image.open(out / f) as im:
                assert im.format == "PNG" and min(im.size) > 100
        assert Section.from_json(json.loads(json.dumps(s.to_json()))) == s
        assert s.numbers and all(n.lecture and n.computed for n in s.numbers)
    # training runs only under out/runs/<key>/
    assert {p.name for p in (out / "runs").iterdir()} == {"filters", "studies"}


def test_sparse_kernels_have_the_zero_pattern(built):
    _, sections = built
    w = np.arange(1.0, 10.0).reshape(3, 3)
    for d in (2, 3):
        conv, pool, dilations = sparse_pair(d)
        assert dilations == (d, d)
        assert conv.shape == (2 * d + 1, 2 * d + 1) and pool.shape == (d + 1, d + 1)
        np.testing.assert_array_equal(conv, zero_inserted(w, d))
        np.testing.assert_array_equal(pool, zero_inserted(np.ones((2, 2)), d))
        keep = np.zeros(2 * d + 1, bool)
        keep[::d] = True
        assert not conv[~keep].any() and not conv[:, ~keep].any()  # the inserted rows and columns are all zero
        assert (conv[np.ix_(keep, keep)] == w).all()
    assert all(n.agrees for n in sections["sparse_kernels"].numbers)


def test_toy_example_trace_and_dense_equals_patch(built):
    _, sections = built
    _, patch, _, rows = toy_trace(0)
    assert patch == (15, 15)
    assert [r["layer"] for r in rows] == ["conv1", "pool1", "conv2", "pool2", "conv3"]
    assert [r["d"] for r in rows] == [1, 1, 2, 2, 6] == LECTURE_D
    assert [r["stride"] for r in rows] == [1, 2, 1, 3, 1]
    s = sections["toy_example"]
    trace = number(s, "Algorithm 1's d")
    assert trace.lecture == "1, 1, 2, 2, 6" and trace.computed == "1, 1, 2, 2, 6" and trace.agrees
    top_left = number(s, "dense output at the top-left")
    assert float(top_left.computed) < 1e-6 and top_left.agrees
    assert float(number(s, "dense vs patch-by-patch").computed) < 1e-6
    assert number(s, "padded input size").computed == "19x19"


def test_receptive_fields_grow_stage_by_stage(built):
    alexnet = stage_rows("alexnet")
    assert alexnet[0] == ("conv1", "11x11/4", 11, 4)
    assert alexnet[-1] == ("pool5", "3x3/2", 195, 32)
    rfs = [r[2] for r in alexnet]
    assert rfs == sorted(rfs) and len(set(rfs)) == len(rfs)
    lenet = stage_rows("lenet5")
    assert [(r[2], r[3]) for r in lenet] == [(5, 1), (6, 2), (14, 2), (16, 4), (32, 4)]
    _, sections = built
    assert all(n.agrees for n in sections["receptive_fields"].numbers if n.agrees is not None)


def test_pooling_over_rotated_fives_is_rotation_invariant(built):
    _, sections = built
    n = number(sections["learned_invariance"], "pooled unit")
    pooled, single = (float(v) for v in n.computed.replace("(single filter:", "").rstrip(")").split())
    assert pooled > 0.7 and single < pooled - 0.2 and n.agrees


def test_equivariance_translation_yes_rotation_scale_no(built):
    _, sections = built
    s = sections["equivariance"]
    assert float(number(s, "convolution, translation").computed) < 1e-12
    assert float(number(s, "convolution, rotation").computed) > 0.1
    assert float(number(s, "convolution, scaling").computed) > 0.1


def test_fft_matches_direct_and_crossover_rule(built):
    _, sections = built
    s = sections["fft"]
    assert number(s, "FFT convolution equals").agrees
    rows = [{"kernel": k, "direct_ms": d, "fft_ms": f} for k, d, f in
            [(3, 1, 2), (7, 3, 2), (11, 2, 3), (15, 5, 3), (19, 9, 3)]]
    assert crossover(rows) == 15  # faster at 7 but not at 11: the crossover is where it stays faster
    assert crossover(rows[:1]) is None


def test_filters_are_96_colour_11x11(built):
    out, sections = built
    s = sections["filters"]
    assert number(s, "first-layer filters").computed == "96 of 11x11x3"
    with Image.open(out / "filters_grid.png") as im:
        w, h = im.size
    assert w > h  # 12 columns x 8 rows, as the lecture's figure
    assert (out / "runs" / "filters" / "quick_0" / "last.safetensors").exists()


def test_studies_list_the_paper_values_as_needing_imagenet(built):
    out, sections = built
    s = sections["studies"]
    paper = [n for n in s.numbers if n.computed == "needs ImageNet"]
    assert len(paper) >= 10 and all(n.agrees is None for n in paper)
    assert any("13.1%, 13.7%, 16.7%, 17%" in n.lecture for n in paper)
    assert "smoke run" in s.markdown
    runs = out / "runs" / "studies" / "quick" / "seed0"
    assert (runs / "transfer" / "results.json").exists()
    assert len(list((runs / "ablate").glob("*/runs/*/last.safetensors"))) >= 8
