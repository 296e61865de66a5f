"""max_memory is an upper bound on a dense call's peak memory above the process's state.

Peaks are measured in fresh processes (a clean allocator): the resident-set high-water mark is
reset just before the call (/proc/self/clear_refs) and read after it, so the increase is the
call's own, measured against the resident set right before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cnnkit.dense import densify, patch_by_patch
from cnnkit.dense.memory import MB
from cnnkit.errors import ConfigError
from cnnkit.models import create_patch_net

_MEASURE = r"""
import json, sys, torch
from cnnkit.dense import densify
from cnnkit.dense.allocator import retain_freed_memory
from cnnkit.models import create_patch_net

net, w, h, budget, retain = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
if retain:
    retain_freed_memory()
torch.manual_seed(0)
model, patch = create_patch_net(net)
dense = densify(model.eval(), patch, max_memory=None if budget == "none" else int(budget))
x = torch.randn(1, dense.in_channels, h, w)

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

with torch.no_grad():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current resident set
    base = status("VmRSS")
    y = dense(x)
    peak = status("VmHWM") - base
plan = dense.last_plan
print(json.dumps({"peak": peak, "budget": plan.budget, "predicted": plan.predicted, "tile": plan.tile,
                  "shape": list(y.shape)}))
"""


def _measure(net: str, size: tuple[int, int], budget: int | None, retain: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-c", _MEASURE, net, str(size[0]), str(size[1]), str(budget or "none"),
           "1" if retain else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("net, size, budget, retain", [
    ("descriptor", (480, 360), 448 * MB, False),  # 84 MB output: a few tiles
    ("descriptor", (480, 360), 384 * MB, True),  # many small tiles, malloc keeping freed memory
    ("segment", (900, 700), 320 * MB, False),  # 3 channels in, ReLU in place, FC head
    ("liskowski", (500, 400), 320 * MB, True),
    ("toy", (1500, 1200), 300 * MB, False),
])
def test_max_memory_bounds_the_measured_peak(net, size, budget, retain):
    r = _measure(net, size, budget, retain)
    assert r["tile"] is not None, "the budget should force tiles"
    assert r["shape"][2:] == [size[1], size[0]]
    assert r["peak"] <= budget, f"{net}: peak {r['peak'] / MB:.0f} MB above a {budget / MB:.0f} MB budget"


@needs_proc
@pytest.mark.slow
def test_default_budget_descriptor_1080x720_stays_under_1_gb():
    """The issue's figure: Bailer et al.'s 1080 x 720 image through the descriptor net (398 MB of
    output alone) with no budget given peaks at <= 1 GB (the speed side is in benchmarks/dense.py)."""
    r = _measure("descriptor", (1080, 720), None, True)
    assert r["tile"] is not None
    assert r["peak"] <= 10**9, f"peak {r['peak'] / MB:.0f} MB"


def test_budget_too_small_is_one_error_naming_the_minimum():
    model, patch = create_patch_net("descriptor")
    dense = densify(model.eval(), patch, max_memory=64 * MB)
    x = torch.randn(1, 1, 400, 300)  # the 128 x 400 x 300 output alone takes 59 MB
    with pytest.raises(ConfigError, match=r"max_memory=67108864 bytes \(64 MB\) is below the minimum") as e:
        with torch.no_grad():
            dense(x)
    minimum = int(str(e.value).split("minimum for this image, ")[1].split(" bytes")[0])
    assert minimum > 64 * MB
    dense.max_memory = minimum  # the minimum it names is enough (for tiny tiles: not run here)
    with torch.no_grad():
        assert dense.plan((400, 300)).predicted <= minimum


def test_plan_fits_budget_and_tiles_shrink_with_it():
    model, patch = create_patch_net("descriptor")
    dense = densify(model.eval(), patch)
    with torch.no_grad():
        dense(torch.randn(1, 1, 100, 100))  # layouts chosen: plans are final
        tiles = []
        for budget in (700 * MB, 550 * MB, 480 * MB):
            dense.max_memory = budget
            plan = dense.plan((720, 1080))
            assert plan.budget == budget and plan.predicted <= budget
            tiles.append(plan.tile[0] * plan.tile[1])
        assert tiles[0] > tiles[1] > tiles[2]
        dense.max_memory = 10**12
        assert dense.plan((720, 1080)).tile is None  # fits whole


def test_budget_tiling_is_exact():
    """Tiles chosen by the memory model give the untiled result bit for bit (float64 runs
    size-independent kernels), and that is patch by patch."""
    model, patch = create_patch_net("toy", num_classes=3, width=3)
    model = model.double().eval()
    x = torch.randn(1, 1, 61, 47, dtype=torch.float64)
    dense = densify(model, patch)
    with torch.no_grad():
        full = dense(x)
        dense.max_memory = dense.plan((61, 47), torch.float64).predicted - 1  # just too little for one pass
        plan = dense.plan((61, 47), torch.float64)
        assert plan.tile is not None and plan.predicted <= dense.max_memory
        assert torch.equal(dense(x), full)
        torch.testing.assert_close(full, patch_by_patch(model, x, patch), rtol=1e-10, atol=1e-10)


def test_autograd_keeps_untiled_by_default_and_counts_saved_maps():
    """Training keeps every tile's saved maps until backward, so the default budget (for inference)
    does not tile it; an explicit budget counts those maps for every tile."""
    model, patch = create_patch_net("toy", num_classes=3, width=3)
    dense = densify(model.eval(), patch)
    assert dense.plan((300, 200)).tile is None and dense.plan((300, 200)).budget is None
    with torch.no_grad():
        dense(torch.randn(1, 1, 40, 40))  # layouts chosen: plans are final
        dense.max_memory = dense.plan((300, 200)).predicted - 1
        inference = dense.plan((300, 200))
    assert inference.tile is not None
    try:
        trained = dense.plan((300, 200))  # same budget, autograd on
    except ConfigError:
        return  # not even 1-pixel tiles fit once every tile's saved maps count
    assert trained.tile[0] * trained.tile[1] < inference.tile[0] * inference.tile[1]
