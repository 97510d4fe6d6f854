"""Network spec: the guide's API, validation, parameter counts, summary and strict JSON."""

from __future__ import annotations

import json

import pytest

import nnbridge as nb
from nnbridge.spec import LayerKind


def test_guide_api_simple_mlp():
    spec = nb.new_network("SimpleMLP", input_size=128)
    ret = (spec.add_dense("hidden1", 128, 64, "relu")
           .add_dense("hidden2", 64, 32, nb.Activation.RELU)
           .add_dense("output", 32, 10, "softmax"))
    assert ret is spec
    assert spec.validate() is True
    assert spec.problems() == []
    assert spec.check() is spec
    assert spec.total_params() == 10666
    assert spec == nb.simple_mlp()
    assert nb.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("factory,params", [
    (nb.simple_mlp, 10666), (nb.deep_mlp, 43845), (nb.binary_classifier, 5152), (nb.koan_classifier, 5655),
])
def test_presets_validate_with_their_parameter_counts(factory, params):
    spec = factory()
    assert spec.validate()
    assert spec.total_params() == params


def test_summary_table():
    text = nb.simple_mlp().summary()
    lines = text.splitlines()
    assert "SimpleMLP" in lines[0]
    assert any("hidden1" in ln and "128 -> 64" in ln and "relu" in ln and "8,256" in ln for ln in lines)
    assert lines[-1] == "Total parameters: 10,666"


def test_every_activation_by_enum_and_name():
    for act in nb.Activation:
        spec = nb.new_network("A", 4).add_dense("d", 4, 3, act.value)
        assert spec.layers[0].activation is act
        assert nb.from_json(spec.to_json()) == spec
    assert nb.Activation.parse("ReLU") is nb.Activation.RELU


def test_unknown_activation_lists_supported():
    with pytest.raises(nb.SpecError) as e:
        nb.new_network("A", 4).add_dense("d", 4, 3, "swish")
    msg = str(e.value)
    assert "swish" in msg and "gelu_tanh" in msg and "leaky_relu" in msg


def test_layer_kinds_and_params():
    spec = (nb.new_network("K", 8).add_dense("a", 8, 16, use_bias=False).add_batch_norm("bn", 16, eps=1e-3)
            .add_dropout("dr", 16, 0.5).add_dense("b", 16, 2, "leaky_relu", negative_slope=0.2))
    assert spec.validate(), spec.problems()
    assert [layer.kind for layer in spec.layers] == [LayerKind.DENSE, LayerKind.BATCH_NORM, LayerKind.DROPOUT,
                                                     LayerKind.DENSE]
    assert spec.total_params() == 8 * 16 + 4 * 16 + 16 * 2 + 2
    back = nb.from_json(spec.to_json())
    assert back == spec and back.layers[1].eps == 1e-3 and back.layers[3].negative_slope == 0.2


def test_validate_finds_every_problem_and_never_raises():
    spec = nb.new_network("Bad", input_size=10)
    assert spec.validate() is False
    assert "no layers" in spec.problems()[0]
    spec = (nb.new_network("Bad", input_size=10)
            .add_dense("a", 12, 8)            # input mismatch with the network
            .add_dense("b", 7, 4)             # mismatch with a
            .add_dense("b", 4, 0)             # duplicate name, non-positive size
            .add_dense("bad name", 0, 3)      # invalid name
            .add_batch_norm("bn", 3, eps=0.0)
            .add_dropout("dr", 3, 1.0))
    spec.layers.append(nb.LayerSpec("", LayerKind.BATCH_NORM, 3, 4))
    problems = spec.problems()
    text = "\n".join(problems)
    assert spec.validate() is False
    assert "layer 0 ('a'): input_size 12 does not match the network input_size 10" in text
    assert "layer 1 ('b'): input_size 7 does not match layer 0 ('a') output_size 8" in text
    assert "layer 2 ('b'): duplicate name, already used by layer 1" in text
    assert "layer 2 ('b'): output_size must be a positive integer, found 0" in text
    assert "layer 3 ('bad name'): invalid name" in text
    assert "eps must be in (0, 1), found 0.0" in text
    assert "dropout_rate must be in [0, 1), found 1.0" in text
    assert "layer 6: name is empty" in text
    assert "batch_norm must keep the size, found input_size 3 != output_size 4" in text
    with pytest.raises(nb.SpecError) as e:
        spec.check()
    assert all(p in str(e.value) for p in problems)


def test_validate_survives_garbage_fields():
    spec = nb.new_network("G", 4).add_dense("d", 4, 2)
    spec.layers[0].input_size = "four"  # type: ignore[assignment]
    spec.layers[0].use_bias = "yes"  # type: ignore[assignment]
    assert spec.validate() is False
    assert any("found 'four'" in p for p in spec.problems())


def test_json_is_the_nim_librarys(koan_dump):
    spec = nb.koan_classifier()
    nim_text = json.dumps(koan_dump["spec"], separators=(",", ":"))
    assert spec.to_json(marker=False) == nim_text
    assert spec.to_json().startswith(nim_text[:-1] + ',"format":')
    assert nb.from_json(nim_text) == spec


def test_dropout_json_keys_in_nim_order():
    spec = nb.new_network("D", 4).add_dense("a", 4, 4).add_dropout("drop", 4, 0.25)
    text = spec.to_json(marker=False)
    assert ('{"name":"drop","kind":"dropout","input_size":4,"output_size":4,"activation":"none",'
            '"use_bias":false,"dropout_rate":0.25}') in text


@pytest.mark.parametrize("mutate,path", [
    (lambda d: d["layers"][1].update(kind="conv"), "layers[1].kind"),
    (lambda d: d["layers"][0].update(activation="swish"), "layers[0].activation"),
    (lambda d: d["layers"][1].pop("output_size"), "layers[1]: missing key 'output_size'"),
    (lambda d: d["layers"][1].update(output_size=-3), "layers[1].output_size"),
    (lambda d: d["layers"][1].update(output_size=2.5), "layers[1].output_size"),
    (lambda d: d["layers"][0].update(use_bias=1), "layers[0].use_bias"),
    (lambda d: d.update(layers={}), "spec.layers"),
    (lambda d: d.update(input_shape=[1, 2]), "spec.input_shape"),
    (lambda d: d.pop("name"), "missing key 'name'"),
    (lambda d: d["layers"].__setitem__(0, 5), "layers[0]"),
])
def test_from_json_is_strict_and_names_the_path(mutate, path):
    d = nb.koan_classifier().to_dict()
    mutate(d)
    with pytest.raises(nb.SpecError) as e:
        nb.from_json(json.dumps(d))
    assert path in str(e.value)


@pytest.mark.parametrize("text", ["", "{", "[1,2]", '{"name": NaN}', "\xff", "[" * 100000 + "]" * 100000])
def test_from_json_garbage_is_a_spec_error(text):
    with pytest.raises(nb.SpecError):
        nb.from_json(text)


def test_save_and_load_spec(tmp_path):
    p = nb.save_spec(nb.deep_mlp(), tmp_path / "arch.json")
    assert nb.load_spec(p) == nb.deep_mlp()
    (tmp_path / "bad.json").write_text('{"name": "x"}')
    with pytest.raises(nb.SpecError, match=r"bad\.json.*missing key 'input_shape'"):
        nb.load_spec(tmp_path / "bad.json")
    with pytest.raises(nb.SpecError, match="cannot read"):
        nb.load_spec(tmp_path / "missing.json")


def test_save_refuses_an_invalid_spec(tmp_path):
    with pytest.raises(nb.SpecError):
        nb.save_spec(nb.new_network("empty", 3), tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_nim_portability():
    assert nb.simple_mlp().is_nim_portable()
    assert not nb.new_network("g", 2).add_dense("d", 2, 2, "gelu").is_nim_portable()
    assert not nb.new_network("g", 2).add_dense("d", 2, 2, "leaky_relu", negative_slope=0.3).is_nim_portable()
