"""`cnnkit lecture --quick` as a user runs it: every number of the lecture appears beside cnnkit's value,
every figure the report shows exists, a rerun reuses the finished sections, bad input is one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Every number the lecture's text prints about networks, data and results, as it prints it (commas and
# spaces do not matter). Each must appear as the "lecture" value of a row of numbers.json.
LECTURE = [
    # AlexNet
    "253440", "186624", "64896", "43264", "4096", "1000", "650000", "60000000", "63000000",
    # Deep Image's augmentation table, layers and FC width
    "68920", "1960", "260", "20", "2", "82944", "16", "6144", "upto 8192",
    # NIN vs AlexNet
    "7.5 Million", "29 Megabytes", "60 Million", "230 Megabytes",
    # Clarifai / OverFeat
    "11x11 to 7x7", "4 to 2", "384 => 512", "384 => 1024",
    # CNN-F/M/S table (one cell of each row) and the fc7 study
    "64x11x11 st. 4, pad 0 LRN, x2 pool", "96x7x7 st. 2, pad 0 LRN, x2 pool", "96x7x7 st. 2, pad 0 LRN, x3 pool",
    "2048", "1024", "128", "32x smaller",
    # VGG: weight layers per configuration
    "11", "13", "19",
    # GoogLeNet Table 1 (params K, ops M), a few rows of each column
    "2.7", "34", "112", "360", "159", "128", "1388", "71",
    # results that need ImageNet
    "0.15315", "0.26172", "40.7 / 18.2", "38.4 / 16.5", "25.5 => 24.8", "7.89 / 8.0 / 7.42",
    "16.0 / 16.7 / 13.7 / 13.5 / 13.1",
    # pixelwise: FC -> conv kernels, Algorithm 1's dilations on the toy example, the speed-up
    "256x6x6", "4096x1x1", "1, 1, 2, 2, 6", "more than 1,500X",
    # LeNet-5
    "60,000",
]


def _key(text: str) -> str:
    return re.sub(r"[\s,]", "", text).lower()


def _cnnkit(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", "cnnkit", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("lecture") / "report"
    t0 = time.perf_counter()
    r = _cnnkit("lecture", "--quick", "--out", out)
    assert r.returncode == 0, r.stderr
    return out, r, time.perf_counter() - t0


def test_quick_report_has_every_lecture_number_with_its_counterpart(report):
    out, _, _ = report
    doc = json.loads((out / "numbers.json").read_text())
    rows = doc["numbers"]
    printed = {}
    for row in rows:
        printed.setdefault(_key(row["lecture"]), []).append(row)
    missing = [v for v in LECTURE if _key(v) not in printed]
    assert not missing, f"lecture numbers with no row: {missing}"
    for row in rows:
        assert row["computed"], row
        if row["computed"] == "-":  # not computed: said why (ImageNet, or nothing printed to compare)
            assert row["agrees"] is None and row["note"], row
        if row["agrees"] is False:
            assert row["note"], f"a disagreement without its reason: {row}"
    assert doc["counts"]["numbers"] == len(rows)


def test_report_files_and_figures(report):
    out, r, _ = report
    text = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(figures) >= 10
    for name in figures:
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    html = (out / "report.html").read_text()
    assert html.count("<img ") == len(figures) and "<table>" in html
    assert "Where the lecture and cnnkit disagree" in text
    assert r.stdout.strip().splitlines()[-1].startswith(f"wrote {out / 'report.md'}")


def test_quick_report_time(report):
    _, _, seconds = report
    assert seconds < 240, f"cnnkit lecture --quick took {seconds:.0f} s"  # target 3 min on 2 cores


def test_rerun_reuses_every_section(report):
    out, _, _ = report
    before = (out / "numbers.json").read_text()
    r = _cnnkit("lecture", "--quick", "--out", out)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("wrote ")]
    assert lines and all(" reused " in ln for ln in lines), r.stdout
    assert (out / "numbers.json").read_text() == before


def test_only_rebuilds_one_section_and_keeps_the_others(report):
    out, _, _ = report
    r = _cnnkit("lecture", "--quick", "--out", out, "--only", "alexnet", "--rebuild")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("alexnet") and "reused" not in r.stdout
    sections = {row["section"] for row in json.loads((out / "numbers.json").read_text())["numbers"]}
    assert {"alexnet", "deep_image", "googlenet"} <= sections


def test_unknown_section_is_one_line_and_leaves_no_folder(tmp_path):
    r = _cnnkit("lecture", "--out", tmp_path / "new", "--only", "alexnet,nosuch")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: --only: no section named nosuch; choose from ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "new").exists()


def test_list_names_every_section():
    r = _cnnkit("lecture", "--list")
    assert r.returncode == 0
    keys = [ln.split()[0] for ln in r.stdout.splitlines()]
    assert {"alexnet", "toy_example", "relu_tanh", "direct_maps", "pixelwise"} <= set(keys)


def test_damaged_stored_section_is_built_again_with_a_warning(report):
    out, _, _ = report
    (out / "sections" / "nin.json").write_text("{not json")
    r = _cnnkit("lecture", "--quick", "--out", out, "--only", "nin")
    assert r.returncode == 0
    assert r.stderr == f"warning: {out / 'sections' / 'nin.json'} is damaged; building the section again\n"
    assert r.stdout.startswith("nin ") and "reused" not in r.stdout.splitlines()[0]
    assert json.loads((out / "sections" / "nin.json").read_text())["section"]["key"] == "nin"
