"""ONNX export of dense nets: the file, run in onnxruntime, gives the PyTorch dense net's scores on
images of sizes and batches other than the one traced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cnnkit.dense import densify  # noqa: E402
from cnnkit.dense.export import ExportError, export_onnx  # noqa: E402
from cnnkit.models import create_patch_net  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


class Inception(nn.Module):
    """An Inception block without padding: a 3x3 conv, a 3x3 max-pool then 1x1 conv, and two 2x2
    convs in a row, all 11 -> 9, concatenated; then a stride-2 conv and an FC head."""

    def __init__(self):
        super().__init__()
        self.b3 = nn.Conv2d(3, 4, 3)
        self.pool, self.proj = nn.MaxPool2d(3, 1), nn.Conv2d(3, 2, 1)
        self.b2a, self.b2b = nn.Conv2d(3, 4, 2), nn.Conv2d(4, 4, 2)
        self.down = nn.Conv2d(10, 6, 3, stride=2)  # 9 -> 4
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):  # (N, 3, 11, 11)
        y = torch.cat([torch.relu(self.b3(x)), self.proj(self.pool(x)), self.b2b(torch.relu(self.b2a(x)))], 1)
        return self.fc(torch.tanh(self.down(y)).flatten(1))  # (N, 3)


class Branchy(nn.Module):
    """Two stride-2 branches of different kernels (3 and 2) concatenated, then a 4x4 head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(3, 4, 2, stride=2)
        self.head = nn.Conv2d(8, 2, 4)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1))).flatten(1)


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _registry(name, **options):
    torch.manual_seed(0)
    model, patch = create_patch_net(name, **options)
    return model.eval(), patch


CASES = {
    "toy": (lambda: _registry("toy"), "reflect"),
    "segment": (lambda: _registry("segment", width=4, patch=16), "replicate"),
    "liskowski": (lambda: _registry("liskowski", width=0.25), "zeros"),
    "branchy": (lambda: (Branchy().eval(), 9), "reflect"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_matches_pytorch_on_other_sizes_and_batches(name, tmp_path):
    build, border = CASES[name]
    model, patch = build()
    dense = densify(model, patch, border=border)  # mode "auto": export pins the dilated layout
    path = export_onnx(dense, tmp_path / "dense.onnx", sample_size=(31, 30))
    sess = _session(path)
    gen = torch.Generator().manual_seed(1)
    for shape in [(2, 23, 37), (1, 40, 29)]:
        x = torch.randn(shape[0], dense.in_channels, *shape[1:], generator=gen)
        with torch.no_grad():
            ref = dense(x)
        got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
        assert got.shape == (shape[0], dense.num_classes, *shape[1:])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_border_padding_is_inside_the_graph(tmp_path):
    import onnx

    model, patch = _registry("toy")
    path = export_onnx(densify(model, patch, border="reflect"), tmp_path / "d.onnx")
    pads = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Pad"]
    modes = [a.s for n in pads for a in n.attribute if a.name == "mode"]
    assert modes == [b"reflect"]


def test_inception_concat_exports(tmp_path):
    torch.manual_seed(2)
    dense = densify(Inception().eval(), 11, border="zeros", exact=True)
    sess = _session(export_onnx(dense, tmp_path / "i.onnx"))
    x = torch.randn(2, 3, 26, 19)
    with torch.no_grad():
        ref = dense(x)
    torch.testing.assert_close(torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), ref,
                               rtol=1e-5, atol=1e-5)


def test_export_leaves_the_dense_net_as_it_was(tmp_path):
    model, patch = _registry("segment", width=4, patch=16)
    dense = densify(model, patch, mode="space_to_batch")
    model.train()
    export_onnx(dense, tmp_path / "d.onnx", verify=False)
    assert model.training and dense.core.chooser.mode == "space_to_batch"
    assert all(s.chooser is dense.core.chooser for _, s in dense.core.steps if hasattr(s, "chooser"))


def test_float64_net_is_refused_with_the_fix(tmp_path):
    model, patch = _registry("toy")
    with pytest.raises(ExportError, match="float32"):
        export_onnx(densify(model.double(), patch), tmp_path / "d.onnx")
    assert not (tmp_path / "d.onnx").exists()


def _cli(*args: str, pre: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    code = f"{pre}import sys; from cnnkit.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "densify", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_cli_writes_the_onnx_file(tmp_path):
    out = tmp_path / "sub" / "dense.onnx"
    r = _cli("--net", "toy", "--size", "20x20", "--border", "replicate", "--export", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout
    x = torch.randn(1, 1, 33, 18)
    got = _session(out).run(None, {"image": x.numpy()})[0]
    assert got.shape == (1, 2, 33, 18)
    assert [p.name for p in out.parent.iterdir()] == ["dense.onnx"]  # no temporary file left


def test_cli_bad_export_path_is_one_error_line(tmp_path):
    r = _cli("--net", "toy", "--size", "20x20", "--export", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "folder" in r.stderr
    assert r.stderr.startswith(f"error: --export {tmp_path} is a folder") and r.stdout == ""  # before any work


def test_cli_without_onnx_names_the_install(tmp_path):
    r = _cli("--net", "toy", "--size", "20x20", "--export", str(tmp_path / "d.onnx"),
             pre="import sys; sys.modules['onnx'] = None; ")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "pip install onnx onnxruntime" in r.stderr
    assert not (tmp_path / "d.onnx").exists()


USER_NET = '''
import torch
from torch import nn
from cnnkit.dense import register_function
from cnnkit.dense.rules_pointwise import _pointwise_call

register_function(torch.lgamma)(_pointwise_call)  # densify knows it; ONNX opset 17 has no lgamma


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.head(torch.lgamma(self.c(x))).flatten(1)


def build():
    return Net(), 5
'''


def test_op_without_onnx_form_names_the_layer(tmp_path, monkeypatch):
    from cnnkit.dense.rules import FUNCTION_RULES
    from cnnkit.dense.rules_pointwise import _pointwise_call

    monkeypatch.setitem(FUNCTION_RULES, torch.lgamma, _pointwise_call)  # USER_NET registers it; undone after
    user = {}
    exec(USER_NET, user)  # the net the command-line test imports
    with pytest.raises(ExportError, match=r"layer 'lgamma'.*aten::lgamma"):
        export_onnx(densify(user["Net"](), 5), tmp_path / "d.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_unexportable_layer_is_one_error_line(tmp_path):
    (tmp_path / "lgamma_net.py").write_text(USER_NET)
    env_path = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
    r = _cli("--net", "lgamma_net:build", "--size", "12x12", "--export", str(tmp_path / "d.onnx"), pre=env_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: layer 'lgamma'"), r.stderr
    assert "graph" not in r.stdout  # the exporter's IR dump is kept off the terminal
    assert not (tmp_path / "d.onnx").exists()


def test_1d_net_exports_with_dynamic_length(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.MaxPool1d(2), nn.ReLU(), nn.Conv1d(4, 3, 3), nn.Flatten(),
                          nn.Linear(3 * 2, 2)).eval()  # 10 -> 8 -> 4 -> 2
    dense = densify(model, 10, border="replicate")
    sess = _session(export_onnx(dense, tmp_path / "d.onnx"))
    x = torch.randn(3, 2, 47)
    with torch.no_grad():
        ref = dense(x)
    torch.testing.assert_close(torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), ref,
                               rtol=1e-5, atol=1e-5)


def test_3d_net_exports_with_dynamic_depth_height_width(tmp_path):
    """A volume net (Conv3d, max and average pooling, BatchNorm3d, FC head): N, D, H and W stay dynamic."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.MaxPool3d(2),  # 10 -> 8 -> 4
                          nn.Conv3d(4, 4, 2), nn.AvgPool3d(3, 1), nn.Flatten(), nn.Linear(4, 3))  # 4 -> 3 -> 1
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    dense = densify(model.eval(), 10, border="reflect")
    path = export_onnx(dense, tmp_path / "d.onnx", sample_size=(12, 11, 13))
    sess = _session(path)
    for shape in [(2, 13, 9, 17), (1, 7, 15, 8)]:
        x = torch.randn(shape[0], 2, *shape[1:])
        with torch.no_grad():
            ref = dense(x)
        got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
        assert got.shape == (shape[0], 3, *shape[1:])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
