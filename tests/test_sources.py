"""A torch MLP trained here, converted from every source kind; load_source and describe_source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import nnbridge as nb
from nnbridge.converters.sources import describe_source
from nnbridge.inspect import inspect_file


class DigitsNet(nn.Module):
    """The same network as ``sequential()``, written with a custom forward and functional activations."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.norm = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        return self.out(self.drop(F.relu(self.norm(self.hidden(x)))))


def sequential() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    torch.manual_seed(0)
    model = sequential()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x[:1500]), torch.from_numpy(y[:1500])
    model.train()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    x_test = x[1500:]
    with torch.inference_mode():
        want = model(torch.from_numpy(x_test)).numpy()
    assert (want.argmax(1) == y[1500:]).mean() > 0.8  # it learned something
    custom = DigitsNet()
    custom.load_state_dict(dict(zip(custom.state_dict(), model.state_dict().values())))
    custom.eval()
    d = tmp_path_factory.mktemp("sources")
    spec = nb.from_torch(model, name="Digits").spec
    spec.save(d / "arch.json")
    torch.save(model.state_dict(), d / "state.pt")
    torch.save(model, d / "whole.pth")
    program = torch.export.export(custom, (torch.from_numpy(x_test[:4].reshape(4, 8, 8)),))
    torch.export.save(program, d / "digits.pt2")
    save_file(model.state_dict(), d / "plain.safetensors")
    nb.from_torch(model, name="Digits").save_safetensors(d / "ours.safetensors")
    nb.from_torch(model).to_mlx().save_weights(str(d / "mlx.npz"))
    return {"model": model, "custom": custom, "program": program, "dir": d, "x": x_test, "want": want}


SOURCES = {
    "sequential": lambda t: nb.from_torch(t["model"]),
    "custom forward": lambda t: nb.from_torch(t["custom"]),
    "ExportedProgram": lambda t: nb.from_torch(t["program"]),
    ".pt2": lambda t: nb.from_torch(t["dir"] / "digits.pt2"),
    ".pt state dict + arch": lambda t: nb.load_source(t["dir"] / "state.pt", arch=t["dir"] / "arch.json"),
    "state dict in memory + arch": lambda t: nb.from_torch(t["model"].state_dict(), arch=t["dir"] / "arch.json"),
    "pickled module, trusted": lambda t: nb.load_source(t["dir"] / "whole.pth", trust_pickle=True),
    ".safetensors (ours)": lambda t: nb.load_source(t["dir"] / "ours.safetensors"),
    ".safetensors (torch) + arch": lambda t: nb.from_torch(t["dir"] / "plain.safetensors", arch=t["dir"] / "arch.json"),
    "MLX module": lambda t: nb.from_mlx(nb.from_torch(t["model"]).to_mlx()),
    ".npz + arch": lambda t: nb.load_source(t["dir"] / "mlx.npz", arch=t["dir"] / "arch.json"),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_trained_mlp_from_every_source(trained: dict, kind: str) -> None:
    net = SOURCES[kind](trained)
    assert [(x.kind.value, x.activation.value) for x in net.spec.layers] == [
        ("dense", "none"), ("batch_norm", "relu"), ("dropout", "none"), ("dense", "none")]
    got = net.predict(trained["x"])
    np.testing.assert_array_equal(got.argmax(1), trained["want"].argmax(1))
    assert np.max(np.abs(got - trained["want"])) <= 1e-5
    assert np.max(np.abs(net.for_inference().predict(trained["x"]) - trained["want"])) <= 1e-5
    r = net.infer_batch(trained["x"])
    np.testing.assert_array_equal(r.categories, trained["want"].argmax(1))


def test_default_names(trained: dict) -> None:
    d = trained["dir"]
    assert nb.from_torch(trained["custom"]).name == "DigitsNet"
    assert nb.from_torch(d / "digits.pt2").name == "digits"
    assert nb.load_source(d / "whole.pth", trust_pickle=True).name == "whole"
    assert nb.load_source(d / "state.pt", arch=d / "arch.json").name == "Digits"
    assert nb.load_source(d / "ours.safetensors").name == "Digits"
    assert nb.load_source(d / "state.pt", arch=d / "arch.json", name="X").name == "X"


def test_load_source_refusals(trained: dict, tmp_path: Path) -> None:
    d = trained["dir"]
    with pytest.raises(nb.ConversionError, match="trust_pickle=True"):
        nb.load_source(d / "whole.pth")
    with pytest.raises(nb.ConversionError, match="pass arch="):
        nb.load_source(d / "state.pt")
    with pytest.raises(nb.ConversionError, match="pass arch="):
        nb.load_source(d / "mlx.npz")
    with pytest.raises(nb.ConversionError, match="unknown model file type '.onnx'"):
        (tmp_path / "m.onnx").write_bytes(b"x")
        nb.load_source(tmp_path / "m.onnx")
    with pytest.raises(nb.ConversionError, match="no such file"):
        nb.load_source(tmp_path / "missing.pt")
    with pytest.raises(nb.SpecError):
        nb.load_source(d / "state.pt", arch=tmp_path / "missing.json")


def test_describe_convertible_sources(trained: dict) -> None:
    d = trained["dir"]
    for name, kind in (("ours.safetensors", "safetensors (torch)"), ("digits.pt2", "torch.export program (.pt2)")):
        info = describe_source(d / name)
        assert info["kind"] == "checkpoint" and info["file"] == str(d / name)
        assert info["source_kind"] == kind and info["convertible"] is True and info["reason"] is None
        assert info["total_params"] == 64 * 32 + 32 + 4 * 32 + 32 * 10 + 10
        assert "summary" in info and info["output_size"] == 10
        assert [t["name"] for t in info["tensors"]][:2] == [f"{info['layers'][0]['name']}.weight",
                                                            f"{info['layers'][0]['name']}.bias"]
        assert info["tensors"][0]["shape"] == [64, 32]  # NMW layout
        json.dumps(info)
    assert inspect_file(d / "digits.pt2")["convertible"] is True


def test_describe_sources_that_need_more(trained: dict) -> None:
    d = trained["dir"]
    expect = {
        "state.pt": ("torch state dict", "--arch"),
        "whole.pth": ("torch pickled object (e.g. torch.save(model))", "trust_pickle=True"),
        "plain.safetensors": ("safetensors", "pass arch="),
        "mlx.npz": ("MLX weights (.npz)", "--arch"),
    }
    for name, (kind, reason) in expect.items():
        info = describe_source(d / name)
        assert info["source_kind"] == kind and info["convertible"] is False and reason in info["reason"]
        assert "summary" not in info
        json.dumps(info)
    assert describe_source(d / "state.pt")["tensors"][0]["shape"] == [32, 64]  # as stored (torch layout)
    assert describe_source(d / "whole.pth")["tensors"] == []  # never unpickled


def test_describe_unsupported_model_reports_the_reason(tmp_path: Path) -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(x)

    torch.export.save(torch.export.export(Residual(), (torch.randn(2, 4),)), tmp_path / "res.pt2")
    info = describe_source(tmp_path / "res.pt2")
    assert info["convertible"] is False and "graph node 'add'" in info["reason"]


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pt2", ".safetensors", ".npz"])
@pytest.mark.parametrize("data", [b"", b"garbage bytes", b"PK\x03\x04" + b"\x00" * 40, b"\x80\x02}q\x00."])
def test_bad_files_raise_only_nnbridge_errors(tmp_path: Path, suffix: str, data: bytes) -> None:
    p = tmp_path / f"bad{suffix}"
    p.write_bytes(data)
    try:
        info = describe_source(p)
    except nb.NNBridgeError:
        pass
    else:
        assert info["convertible"] is False
    with pytest.raises(nb.NNBridgeError):
        nb.load_source(p, arch=nb.new_network("A", 2).add_dense("a", 2, 2))
