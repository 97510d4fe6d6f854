"""Loading an untrusted file never runs code from it, unless the user says ``trust_pickle``.

Every malicious file here is proven live first (a positive control: plain ``torch.load`` or
``torch.export.load`` on it does create the marker file), then every nnbridge entry point —
``load_source``, ``from_torch``, ``describe_source``, ``nnbridge inspect`` and ``nnbridge
convert`` — must refuse or report it with the ``trust_pickle`` explanation, and the marker
must not exist afterwards.

Covered elsewhere, not repeated here: a legit pickled whole module loads with
``trust_pickle=True`` (``test_sources.py``, ``test_torch_bridge.py``); safetensors whose stored
spec disagrees with its tensors (``test_safetensors.py``); malformed files of every kind
(``tests/fuzz/test_fuzz_checkpoints.py``).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import nnbridge as nb
import nnbridge.cli
from nnbridge.converters.sources import describe_source
from tests.conftest import random_weights

SPEC = nb.new_network("Sec", 3).add_dense("a", 3, 4, "relu").add_batch_norm("bn", 4).add_dense("b", 4, 2)


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): stands for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def program_members(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes]]:
    """The entries of a valid ``.pt2`` file, in order."""
    net = nb.NeuralNet(SPEC, random_weights(SPEC))
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(torch.export.export(net.to_torch(), (torch.zeros(2, 3),)), path)
    with zipfile.ZipFile(path) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as z:
        warnings.simplefilter("ignore")  # duplicate names are part of one attack
        for name, data in members:
            z.writestr(name, data)
    return out.getvalue()


def _edit_weights_config(members: list[tuple[str, bytes]], edit: Callable[[dict[str, Any]], None]
                         ) -> list[tuple[str, bytes]]:
    out = []
    for name, data in members:
        if name.endswith("data/weights/model_weights_config.json"):
            config = json.loads(data)
            edit(config["config"])
            data = json.dumps(config).encode()
        out.append((name, data))
    return out


def _pickled_weight(members: list[tuple[str, bytes]], evil: bytes) -> list[tuple[str, bytes]]:
    """``a.weight`` stored as a pickle (``use_pickle``): torch.export.load unpickles it with weights_only=False."""
    edited = _edit_weights_config(members, lambda c: c["a.weight"].update(use_pickle=True))
    return [(n, evil if n.endswith("data/weights/weight_0") else d) for n, d in edited]


def _root(members: list[tuple[str, bytes]]) -> str:
    return members[0][0].split("/")[0]


def _legacy_fallback(members: list[tuple[str, bytes]], evil: bytes) -> list[tuple[str, bytes]]:
    """Top-level entries: torch.export.load's own reader fails on them, and its legacy fallback unpickles."""
    program = dict(members)[f"{_root(members)}/models/model.json"]
    return [*members, ("version", b"8.20"), ("serialized_exported_program.json", program),
            ("serialized_state_dict.pt", evil), ("serialized_constants.pt", evil),
            ("serialized_example_inputs.pt", evil)]


def _duplicate_entry(members: list[tuple[str, bytes]], evil: bytes) -> list[tuple[str, bytes]]:
    """A pickling copy of the weights config first, the clean one after it: Python's zipfile reads
    the last copy, torch's C++ reader (here) the first."""
    bad_config = [e for e in _pickled_weight(members, evil) if e[0].endswith("weights_config.json")]
    return [*bad_config, *[(n, evil if n.endswith("weights/weight_0") else d) for n, d in members]]


PT2_ATTACKS: dict[str, Callable[[list[tuple[str, bytes]], bytes], list[tuple[str, bytes]]]] = {
    "pickled weight": _pickled_weight,
    "legacy fallback": _legacy_fallback,
    "sample inputs": lambda m, evil: [(n, evil if n.endswith("data/sample_inputs/model.pt") else d) for n, d in m],
    "legacy weights file": lambda m, evil: [*m, (f"{_root(m)}/data/weights/model.pt", evil)],
    "duplicate entry": _duplicate_entry,
}


def _refusals(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What every entry point says about ``path``: each must refuse (or report) without running it."""
    said = []
    for load in (nb.load_source, nb.from_torch, lambda p: nb.load_source(p, arch=SPEC)):
        with pytest.raises(nb.ConversionError) as e:
            load(path)
        said.append(str(e.value))
    info = describe_source(path)
    assert info["convertible"] is False and info["tensors"] == []
    said.append(info["reason"])
    capsys.readouterr()
    assert nnbridge.cli.main(["inspect", str(path)]) == 0
    said.append(capsys.readouterr().out.replace("\n", " "))
    out = tmp_path / "converted"
    assert nnbridge.cli.main(["convert", str(path), "-o", str(out), "--targets", "nmw", "--no-verify"]) == 2
    said.append(capsys.readouterr().err)
    assert not out.exists()
    return said


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_pickled_pt_never_runs(zipped: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"a.weight": Payload(marker)}, path, _use_new_zipfile_serialization=zipped)
    torch.load(path, weights_only=False)  # positive control: the payload is live
    assert marker.exists()
    marker.unlink()
    for text in _refusals(path, tmp_path, capsys):
        assert "trust_pickle" in text or "trust-pickle" in text, text
    assert not marker.exists()


@pytest.mark.parametrize("attack", list(PT2_ATTACKS))
def test_pt2_that_would_unpickle_never_runs(attack: str, program_members, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt2"
    path.write_bytes(_zip(PT2_ATTACKS[attack](program_members, _torch_bytes(Payload(marker)))))
    torch_log = logging.getLogger("torch.export")
    level, torch_log.level = torch_log.level, logging.CRITICAL
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.load(path)  # positive control: plain torch runs the payload
    except Exception:  # noqa: BLE001 - torch fails after unpickling; the marker is what counts
        pass
    finally:
        torch_log.level = level
    assert marker.exists(), f"{attack}: the payload did not run under plain torch.export.load"
    marker.unlink()
    for text in _refusals(path, tmp_path, capsys):
        assert "trust_pickle" in text or "trust-pickle" in text, text
        assert "would run code" in text or "error:" in text
    assert not marker.exists()


def test_npz_object_array_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.npz"
    np.savez(path, **{"layers.0.weight": np.array([Payload(marker)], dtype=object)})
    np.load(path, allow_pickle=True)["layers.0.weight"]  # positive control
    assert marker.exists()
    marker.unlink()
    for load in (lambda p: nb.load_source(p, arch=SPEC), lambda p: nb.from_mlx(p, arch=SPEC), describe_source):
        with pytest.raises(nb.ConversionError, match="holds Python objects"):
            load(path)
    assert not marker.exists()


def test_torch_load_is_weights_only_unless_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Every torch.load nnbridge makes, on every path, passes weights_only=True; only trust_pickle lifts it."""
    net = nb.NeuralNet(SPEC, random_weights(SPEC))
    (tmp_path / "state.pt").write_bytes(_torch_bytes(net.to_torch().state_dict()))
    (tmp_path / "whole.pt").write_bytes(_torch_bytes(net.to_torch()))
    torch.export.save(torch.export.export(net.to_torch(), (torch.zeros(2, 3),)), tmp_path / "m.pt2")
    calls: list[Any] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    uses: list[Callable[[Path], Any]] = [lambda p: nb.load_source(p, arch=SPEC), lambda p: nb.from_torch(p, arch=SPEC),
                                         describe_source, lambda p: nnbridge.cli.main(["inspect", str(p)])]
    for name in ("state.pt", "whole.pt", "m.pt2"):
        for use in uses:
            try:
                use(tmp_path / name)
            except nb.NNBridgeError:
                pass
    capsys.readouterr()
    assert calls and all(w is True for w in calls), calls
    calls.clear()
    assert nb.load_source(tmp_path / "whole.pt", trust_pickle=True).spec.layers == SPEC.layers
    assert calls == [False]


def test_pt2_whose_weights_metadata_disagrees_with_its_graph_is_refused(program_members, tmp_path: Path) -> None:
    """The weights config says a.weight is [3, 4] where the graph and the data say [4, 3]."""
    def transpose(config: dict[str, Any]) -> None:
        meta = config["a.weight"]["tensor_meta"]
        meta["sizes"], meta["strides"] = [{"as_int": 3}, {"as_int": 4}], [{"as_int": 4}, {"as_int": 1}]

    path = tmp_path / "disagrees.pt2"
    path.write_bytes(_zip(_edit_weights_config(program_members, transpose)))
    with pytest.raises(nb.ConversionError, match=r"disagrees.pt2: graph node 'batch_norm' .* normalises 4 features "
                                                 r"but the layer before .*'linear'.* gives 3; sizes must chain"):
        nb.load_source(path)


def test_pt2_whose_weights_metadata_disagrees_with_its_data_is_refused(program_members, tmp_path: Path) -> None:
    """The weights config says float64 where the file holds 48 bytes of float32."""
    path = tmp_path / "disagrees.pt2"
    path.write_bytes(_zip(_edit_weights_config(program_members,
                                               lambda c: c["a.weight"]["tensor_meta"].update(dtype=8))))
    with pytest.raises(nb.ConversionError, match=r"disagrees.pt2: cannot read as a torch.export program: "
                                                 r"RuntimeError: setStorage: sizes \[4, 3\].* itemsize 8 requiring a "
                                                 r"storage size of 96 are out of bounds for storage of size 48"):
        nb.load_source(path)


def test_inspect_prints_text_from_the_file_literally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Tensor names come from the file: neither rich markup nor terminal escapes in them may take effect."""
    from safetensors.torch import save_file

    path = tmp_path / "names.safetensors"
    save_file({"[/red]a.weight": torch.zeros(2, 2), "\x1b]0;pwned\x07b.weight": torch.zeros(2)}, path)
    assert nnbridge.cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[/red]a.weight" in out and "\x1b" not in out


@pytest.mark.parametrize("suffix", [".npz", ".pt2"])
def test_zip_bomb_is_refused_before_decompressing(tmp_path: Path, suffix: str) -> None:
    import zipfile

    from nnbridge.errors import ConversionError

    bomb = tmp_path / f"bomb{suffix}"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("bomb/data/0" if suffix == ".pt2" else "w.npy", b"\0" * (64 << 20))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ConversionError, match="zip bomb"):
        nb.load_source(bomb, arch=nb.koan_classifier())
