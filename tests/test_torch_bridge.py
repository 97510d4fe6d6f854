"""torch ⇄ NeuralNet: modules (fx), ExportedPrograms and .pt2, state dicts, pickles, refusals, round trips."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nnbridge as nb
from nnbridge.converters._table import TABLE, rows_for
from nnbridge.converters.torch import ATEN, FUNCTIONS, METHODS, MODULES, pt2_risks

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "softmax": lambda: nn.Softmax(dim=-1),
    "none": lambda: nn.Identity(),
}


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def every_kind(act: str) -> nn.Sequential:
    """Linear(+act), Dropout, Linear → BatchNorm1d(+act), Linear without bias: every layer kind."""
    torch.manual_seed(0)
    a = ACTIVATIONS[act]
    return _randomise_bn(nn.Sequential(
        nn.Flatten(), nn.Linear(10, 16), a(), nn.Dropout(0.1), nn.Linear(16, 12), nn.BatchNorm1d(12, eps=1e-3), a(),
        nn.Linear(12, 5, bias=False)))


def run(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_round_trip_torch_nmw_mlx_torch(act: str, tmp_path: Path) -> None:
    tm = every_kind(act)
    n1 = nb.from_torch(tm)
    assert [x.kind.value for x in n1.spec.layers] == ["dense", "dropout", "dense", "batch_norm", "dense"]
    assert n1.spec.layers[0].activation.value == act and n1.spec.layers[3].activation.value == act
    assert n1.spec.layers[3].eps == pytest.approx(1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nb.NMWPortabilityWarning)
        n1.save_nmw(tmp_path / "a.nmw")
    n2 = nb.NeuralNet.load(tmp_path / "a.nmw")
    mm = n2.to_mlx()
    n3 = nb.from_mlx(mm)
    tm2 = n3.to_torch()
    np.testing.assert_array_equal(n3.weights.to_flat(), n1.weights.to_flat())
    rng = np.random.default_rng(1)
    for batch in (1, 2, 7, 1000):
        x = rng.standard_normal((batch, 10)).astype(np.float32)
        want = run(tm, x)
        assert np.max(np.abs(run(tm2, x) - want)) <= 1e-6
        assert np.max(np.abs(n2.predict(x) - want)) <= 1e-6
        assert np.max(np.abs(n3.predict(x, backend="mlx") - want)) <= 1e-5


def test_names_come_from_module_paths() -> None:
    spec = nb.simple_mlp()
    net = nb.NeuralNet(spec).init_weights("kaiming", seed=1)
    back = nb.from_torch(net.to_torch())
    assert [x.name for x in back.spec.layers] == ["hidden1", "hidden2", "output"]
    assert back.name == "Sequential"
    assert nb.from_torch(net.to_torch(), name="Mine").name == "Mine"
    wrapped = nn.Sequential()
    wrapped.add_module("layers", nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    assert [x.name for x in nb.from_torch(wrapped).spec.layers] == ["layers_0", "layers_2"]


# --------------------------------------------------------- custom forward (fx)
FORMS = [
    lambda x: F.relu(x), lambda x: torch.relu(x), lambda x: x.relu(), lambda x: torch.sigmoid(x),
    lambda x: F.sigmoid(x), lambda x: x.sigmoid(), lambda x: torch.tanh(x), lambda x: x.tanh(),
    lambda x: F.gelu(x), lambda x: F.gelu(x, approximate="tanh"), lambda x: F.silu(x),
    lambda x: F.leaky_relu(x, 0.2), lambda x: F.softmax(x, -1), lambda x: torch.softmax(x, dim=1),
    lambda x: x.softmax(-1),
]
FORM_ACTS = ["relu", "relu", "relu", "sigmoid", "sigmoid", "sigmoid", "tanh", "tanh", "gelu", "gelu_tanh", "silu",
             "leaky_relu", "softmax", "softmax", "softmax"]


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.first = nn.Linear(12, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in FORMS)
        self.bn = nn.BatchNorm1d(16)
        self.w = nn.Parameter(torch.randn(6, 16) * 0.3)
        self.b = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = self.bn(self.first(x))
        x = F.dropout(x, 0.2, training=self.training)
        x = x.reshape(x.shape[0], -1).contiguous()
        for block, form in zip(self.blocks, FORMS):
            x = form(block(x))
            x = torch.flatten(x, 1).flatten(1).view(-1, 16)
        return F.linear(x, self.w, self.b)


def test_custom_forward_with_functional_forms() -> None:
    model = _randomise_bn(Functional())
    net = nb.from_torch(model)
    acts = [x.activation.value for x in net.spec.layers if x.name.startswith("blocks")]
    assert acts == FORM_ACTS
    assert net.spec.layers[0].input_size == 12 and net.name == "Functional"
    assert [x.kind.value for x in net.spec.layers[:3]] == ["dense", "batch_norm", "dropout"]
    assert net.spec.layers[-1].name == "linear" and net.spec.layers[-1].output_size == 6
    x = np.random.default_rng(0).standard_normal((9, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(net.predict(x.reshape(9, 12)), run(model, x), atol=1e-6)


def test_activation_after_dropout_moves_to_the_layer_before() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.3), nn.ReLU(), nn.Linear(3, 2)).eval()
    net = nb.from_torch(model)
    assert [(x.kind.value, x.activation.value) for x in net.spec.layers] == [
        ("dense", "relu"), ("dropout", "none"), ("dense", "none")]
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(net.predict(x), run(model, x), atol=1e-6)


def test_bn_without_affine_and_training_mode_module() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=False), nn.Tanh()).train()
    with torch.no_grad():
        model[1].running_mean.fill_(0.2)
        model[1].running_var.fill_(2.0)
    net = nb.from_torch(model)  # eval statistics, whatever the module's mode
    np.testing.assert_array_equal(net.weights["_1.gamma"], np.ones(3, np.float32))
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(net.predict(x), run(model.eval(), x), atol=1e-6)


# ----------------------------------------------------------- torch.export, .pt2
class Exportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(16, 12)
        self.out = nn.Linear(12, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.leaky_relu(self.bn(self.fc1(x)), 0.1)
        x = self.drop(x)
        x = F.gelu(self.fc2(x), approximate="tanh")
        return F.softmax(self.out(x), dim=-1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.export.ExportedProgram, Path]:
    model = _randomise_bn(Exportable())
    program = torch.export.export(model, (torch.randn(3, 2, 4),))
    path = tmp_path_factory.mktemp("pt2") / "exportable.pt2"
    torch.export.save(program, path)
    return model, program, path


def _expected_export_spec(net: nb.NeuralNet) -> None:
    assert [(x.kind.value, x.activation.value) for x in net.spec.layers] == [
        ("dense", "none"), ("batch_norm", "leaky_relu"), ("dropout", "none"), ("dense", "gelu_tanh"),
        ("dense", "softmax")]
    assert net.spec.layers[1].negative_slope == pytest.approx(0.1)
    assert net.spec.layers[2].dropout_rate == pytest.approx(0.25)
    assert [x.name for x in net.spec.layers] == ["fc1", "bn", "drop", "fc2", "out"]


def test_exported_program(exported) -> None:
    model, program, _ = exported
    net = nb.from_torch(program)
    _expected_export_spec(net)
    assert net.name == "Exportable" and net.spec.input_size == 8
    x = np.random.default_rng(0).standard_normal((11, 2, 4)).astype(np.float32)
    np.testing.assert_allclose(net.predict(x.reshape(11, 8)), run(model, x), atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_pt2_file_and_decomposed_program(exported) -> None:
    model, program, path = exported
    net = nb.from_torch(path)
    _expected_export_spec(net)
    assert net.name == "exportable"
    decomposed = nb.from_torch(program.run_decompositions(), name="Decomposed")
    assert [x.kind.value for x in decomposed.spec.layers] == ["dense", "batch_norm", "dense", "dense"]
    x = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    want = run(model, x.reshape(6, 2, 4))
    np.testing.assert_allclose(net.predict(x), want, atol=1e-6)
    np.testing.assert_allclose(decomposed.predict(x), want, atol=1e-6)


def _rewrite_zip(src: Path, dst: Path, change) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = change(item.filename, zin.read(item.filename))
            zout.writestr(item, data)
        extra = change(None, None)
        if extra:
            zout.writestr(extra[0], extra[1])
    return dst


def test_pt2_with_pickled_weights_is_refused(exported, tmp_path: Path) -> None:
    _, _, path = exported

    def pickled(name, data):
        if name and name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    bad = _rewrite_zip(path, tmp_path / "pickled.pt2", pickled)
    assert pt2_risks(path) == []
    assert pt2_risks(bad)
    with pytest.raises(nb.ConversionError, match="trust_pickle=True") as e:
        nb.from_torch(bad)
    assert "arbitrary code" in str(e.value) and "pickled entry 'fc1.weight'" in str(e.value)


def test_pt2_with_aot_library_is_refused(exported, tmp_path: Path) -> None:
    _, _, path = exported
    root = zipfile.ZipFile(path).namelist()[0].split("/")[0]

    def add_lib(name, data):
        return (f"{root}/data/aotinductor/model/model.so", b"\x7fELF") if name is None else data

    bad = _rewrite_zip(path, tmp_path / "aoti.pt2", add_lib)
    with pytest.raises(nb.ConversionError, match="AOTInductor"):
        nb.from_torch(bad)


def test_not_a_pt2(tmp_path: Path) -> None:
    p = tmp_path / "junk.pt2"
    p.write_bytes(b"not a zip at all")
    with pytest.raises(nb.ConversionError, match="not a torch.export .pt2 archive"):
        nb.from_torch(p)


# ---------------------------------------------------------------- state dicts
@pytest.fixture()
def trained_like() -> tuple[nb.NeuralNet, nn.Sequential]:
    spec = (nb.new_network("Clf", 6).add_dense("hidden", 6, 8, "relu").add_batch_norm("norm", 8)
            .add_dense("out", 8, 3, "softmax"))
    from tests.conftest import random_weights

    net = nb.NeuralNet(spec, random_weights(spec, seed=4))
    return net, net.to_torch()


def test_state_dict_by_name_and_by_order(trained_like, tmp_path: Path) -> None:
    net, tm = trained_like
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    by_name = nb.from_torch(tm.state_dict(), arch=net.spec)
    assert by_name.weights == net.weights
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3), nn.Softmax(-1))
    plain.load_state_dict(dict(zip(plain.state_dict(), tm.state_dict().values())))
    wrapped = nn.Sequential()
    wrapped.add_module("model", plain)
    torch.save({"model_state_dict": wrapped.state_dict(), "epoch": 3}, tmp_path / "ck.pt")
    net.spec.save(tmp_path / "arch.json")
    by_order = nb.from_torch(tmp_path / "ck.pt", arch=tmp_path / "arch.json")
    assert by_order.name == "Clf"
    np.testing.assert_array_equal(by_order.weights.to_flat(), net.weights.to_flat())
    np.testing.assert_allclose(by_order.predict(x), run(plain.eval(), x), atol=1e-6)


def test_state_dict_errors(trained_like, tmp_path: Path) -> None:
    net, tm = trained_like
    sd = tm.state_dict()
    with pytest.raises(nb.ConversionError, match="pass arch="):
        nb.from_torch(sd)
    wrong = dict(sd)
    wrong["out.weight"] = torch.zeros(3, 7)
    with pytest.raises(nb.ConversionError,
                       match=r"tensor 'out.weight' has shape \[3, 7\]; layer 'out'.*expects \[3, 8\]"):
        nb.from_torch(wrong, arch=net.spec)
    renamed = {k.replace("hidden", "a").replace("norm", "b").replace("out", "c"): v for k, v in sd.items()}
    renamed["c.weight"] = torch.zeros(8, 3)
    with pytest.raises(nb.ConversionError, match=r"tensor 'c.weight' has shape \[8, 3\]"):
        nb.from_torch(renamed, arch=net.spec)
    extra = dict(sd)
    extra["extra.weight"] = torch.zeros(2, 2)
    with pytest.raises(nb.ConversionError, match="4 tensor groups"):
        nb.from_torch(extra, arch=net.spec)
    torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, tmp_path / "nostate.pt")
    with pytest.raises(nb.ConversionError, match="without a state dict"):
        nb.from_torch(tmp_path / "nostate.pt", arch=net.spec)


def test_pickled_module_needs_trust(trained_like, tmp_path: Path) -> None:
    net, tm = trained_like
    torch.save(tm, tmp_path / "whole.pt")
    with pytest.raises(nb.ConversionError) as e:
        nb.from_torch(tmp_path / "whole.pt")
    msg = str(e.value)
    assert "trust_pickle=True" in msg and "--trust-pickle" in msg and "arbitrary code" in msg
    assert "torch.nn.modules.container.Sequential" in msg
    trusted = nb.from_torch(tmp_path / "whole.pt", trust_pickle=True)
    assert trusted.name == "whole"
    np.testing.assert_array_equal(trusted.weights.to_flat(), net.weights.to_flat())


def test_arch_disagreement_is_named(trained_like) -> None:
    net, tm = trained_like
    other = (nb.new_network("Other", 6).add_dense("hidden", 6, 8, "tanh").add_batch_norm("norm", 8)
             .add_dense("out", 8, 3, "softmax"))
    with pytest.raises(nb.ConversionError, match=r"layer 0: expected 'hidden' dense 6->8 tanh, found 'hidden' "
                                                 r"dense 6->8 relu"):
        nb.from_torch(tm, arch=other)
    assert nb.from_torch(tm, arch=net.spec).spec.layers == net.spec.layers


# ------------------------------------------------------------------- refusals
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.fc(x) * y


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.abs(self.fc(x))


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        self.a(x)
        return self.b(x)


class BadView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).view(-1, 2)


REFUSALS = [
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 1)), ["module '1'", "torch.nn.modules.conv.Conv2d"]),
    (lambda: Residual(), ["graph node 'add'", "_operator.add"]),
    (lambda: TwoInputs(), ["forward(x, y)", "2 inputs"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=0)), ["module '1'", "Softmax", "dim 0"]),
    (lambda: UnknownOp(), ["graph node 'abs_1'", "torch.abs"]),
    (lambda: Branch(), ["module 'b'", "instead of the running value"]),
    (lambda: BadView(), ["graph node 'view'", "reshapes 4 features into 2"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sigmoid()), ["module '2'", "second activation in a row"]),
    (lambda: nn.Sequential(nn.ReLU(), nn.Linear(4, 4)), ["module '0'", "before the first layer"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(), nn.Tanh()),
     ["module '3'", "after dropout module '2'", "already has relu"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)),
     ["module '1'", "BatchNorm1d", "track_running_stats=False"]),
    (lambda: nn.Sequential(nn.Flatten(0), nn.Linear(4, 4)), ["module '0'", "Flatten(0, -1)"]),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), ["module '1'", "LayerNorm"]),
]


@pytest.mark.parametrize("make,needles", REFUSALS, ids=[n[0] for _, n in REFUSALS])
def test_refusals_name_the_module_and_the_supported_set(make, needles) -> None:
    with pytest.raises(nb.ConversionError) as e:
        nb.from_torch(make())
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    assert "supported: nn.Linear" in msg and "F.relu" in msg, msg


def test_export_refusals_name_the_node(exported) -> None:
    program = torch.export.export(Residual(), (torch.randn(2, 4),))
    with pytest.raises(nb.ConversionError) as e:
        nb.from_torch(program)
    assert "graph node 'add' (aten.add.Tensor)" in str(e.value) and "supported: aten.linear.default" in str(e.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_untraceable_and_unknown_sources(tmp_path: Path) -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(nb.ConversionError, match="torch.fx cannot trace DataDependent.forward.*torch.export"):
        nb.from_torch(DataDependent())
    with pytest.raises(nb.ConversionError, match="cannot convert a int"):
        nb.from_torch(3)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(nb.ConversionError, match="from_mlx or load_source"):
        nb.from_torch(tmp_path / "w.npz")
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(nb.ConversionError, match="TorchScript"):
        nb.from_torch(scripted)
    torch.jit.save(scripted, tmp_path / "ts.pt")
    with pytest.raises(nb.ConversionError, match="TorchScript"):
        nb.from_torch(tmp_path / "ts.pt", arch=nb.new_network("x", 2).add_dense("a", 2, 2))


# --------------------------------------------------------------- the table
def test_dispatch_tables_follow_the_one_table() -> None:
    assert set(MODULES.values()) | set(FUNCTIONS.values()) | set(METHODS.values()) == \
        {row.family for row in TABLE if row.torch_modules or row.torch_functions}
    assert len(MODULES) == len(rows_for("torch_modules"))
    assert len(FUNCTIONS) + len(METHODS) == len(rows_for("torch_functions"))
    assert len(ATEN) == len(rows_for("torch_aten"))


@pytest.mark.parametrize("doc", ["docs/bridges.md", "README.md"])
def test_docs_show_the_table(doc: str) -> None:
    from nnbridge.converters._table import supported_markdown

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    assert supported_markdown() in text


def test_computed_arguments_and_tuple_output() -> None:
    class SlopeParam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.p = nn.Parameter(torch.tensor(0.2))

        def forward(self, x):
            return F.leaky_relu(self.fc(x), self.p)

    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return (self.fc(x),)

    with pytest.raises(nb.ConversionError, match="graph node 'leaky_relu'.*also reads p") as e:
        nb.from_torch(SlopeParam())
    assert "supported: nn.Linear" in str(e.value)
    assert nb.from_torch(TupleOut()).spec.layers[0].output_size == 2


def test_pt2_that_disagrees_with_the_given_arch(exported) -> None:
    _, _, path = exported
    right = nb.from_torch(path).spec
    assert nb.from_torch(path, arch=right).spec == right
    wrong = (nb.new_network("W", 8).add_dense("fc1", 8, 16).add_batch_norm("bn", 16, activation="relu")
             .add_dropout("drop", 16, 0.25).add_dense("fc2", 16, 12, "gelu_tanh").add_dense("out", 12, 4, "softmax"))
    with pytest.raises(nb.ConversionError, match=r"exportable.pt2: the model disagrees with the given arch 'W': "
                                                 r"layer 1: expected 'bn' batch_norm\(eps=1e-05\) 16->16 relu"):
        nb.from_torch(path, arch=wrong)
