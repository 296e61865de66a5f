import pickle

import pytest
import torch

from cnnkit.errors import CheckpointError, OutputError
from cnnkit.models import create
from cnnkit.train.checkpoint import (
    Checkpoint,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


class Evil:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint():
    torch.manual_seed(0)
    model = create("lenet5")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    opt.step()
    t, d = capture_rng_state()
    return model, opt, Checkpoint(
        model_name="lenet5", model_options={"num_classes": 10}, model_state=model.state_dict(),
        classes=[str(i) for i in range(10)], mean_image=torch.rand(1, 32, 32), epoch=3,
        optimizer_state=opt.state_dict(), scheduler_state={"step_size": 8, "last_epoch": 3},
        rng_state={"tensors": t, "doc": d}, meta={"config": {"seed": 1}, "history": [{"epoch": 1}]},
    )


def test_roundtrip_restores_everything(tmp_path):
    model, opt, ckpt = _checkpoint()
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    back = load_checkpoint(path)
    assert back.model_name == "lenet5" and back.epoch == 3 and back.classes == ckpt.classes
    assert torch.equal(back.mean_image, ckpt.mean_image)
    rebuilt = back.build_model()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    opt2 = torch.optim.SGD(rebuilt.parameters(), lr=1.0, momentum=0.0)
    opt2.load_state_dict(back.optimizer_state)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.9
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], buf)
    assert back.scheduler_state == {"step_size": 8, "last_epoch": 3}
    assert back.meta["history"] == [{"epoch": 1}]
    # RNG: the state restores the same random stream
    restore_rng_state(back.rng_state["tensors"], back.rng_state["doc"])
    a = torch.rand(5)
    restore_rng_state(back.rng_state["tensors"], back.rng_state["doc"])
    assert torch.equal(a, torch.rand(5))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    if writer == "pickle":
        evil.write_bytes(pickle.dumps({"model": Evil(marker)}))
    else:
        torch.save({"model": Evil(marker)}, evil)
    with pytest.raises(CheckpointError, match="not a cnnkit checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_other_safetensors_and_missing_file(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a cnnkit checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_weights_of_another_model_are_refused(tmp_path):
    _, _, ckpt = _checkpoint()
    ckpt.model_options = {"num_classes": 3}  # the weights have 10 outputs
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(path).build_model()


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    _, _, ckpt = _checkpoint()
    path = save_checkpoint(tmp_path / "c.safetensors", ckpt)
    before = path.read_bytes()
    import cnnkit.train.checkpoint as mod

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(OutputError, match=f"cannot write {path}: disk full"):  # one line naming the file
        save_checkpoint(path, ckpt)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
