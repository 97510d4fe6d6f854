"""`nnbridge convert | predict | verify | generate` on a trained model, end to end (issue 6).

A small torch MLP (dense, batch norm, relu, dense) is trained on scikit-learn's digits once
per module and saved in every source format ``convert`` reads. Two formats are converted
with full verification (Nim compiled and run, Metal through the GPU or the CPU emulation);
the others with ``--no-verify``, their files and predictions still checked. Commands run
in-process through :func:`nnbridge.cli.main` (one import of torch and MLX); one run goes
through a real process to check the exit code and stderr a shell sees.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnbridge.cli import build_parser, main
from nnbridge.errors import NNBridgeError
from nnbridge.pipeline import open_output
from tests.conftest import needs_nim

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_SUFFIXES = (".json", ".nmw", ".safetensors", "_cpu.nim", ".metal", ".manifest.json", "_mlx.py")
VERIFY_SAMPLES = "256"


class DigitsNet(nn.Module):
    """64 pixels -> 32 (batch norm, relu) -> 10 logits; module-level so that pickling finds it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn1(self.fc1(x))))


class Sources:
    """The trained model, its reference outputs and the model in every file format."""

    def __init__(self, folder: Path) -> None:
        from safetensors.torch import save_file
        from sklearn.datasets import load_digits

        from nnbridge.converters.mlx import to_mlx
        from nnbridge.converters.torch import from_torch

        digits = load_digits()
        self.x = np.ascontiguousarray(digits.data / 16.0, dtype=np.float32)
        torch.manual_seed(0)
        model = DigitsNet()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        xt, yt = torch.from_numpy(self.x), torch.from_numpy(digits.target)
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(model(xt), yt).backward()
            opt.step()
        model.eval()
        with torch.inference_mode():
            self.logits = model(xt).numpy()
        self.labels = self.logits.argmax(1)
        assert (self.labels == digits.target).mean() > 0.9  # it learned something

        self.folder = folder
        self.arch = folder / "arch.json"
        net = from_torch(model)
        net.spec.save(self.arch)
        torch.save(model.state_dict(), folder / "digits_state.pt")
        torch.save(model, folder / "digits_module.pt")
        batch = {"x": {0: torch.export.Dim("batch")}}
        program = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=batch)
        torch.export.save(program, folder / "digits_program.pt2")
        net.save_safetensors(folder / "digits_own.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "digits_torch.safetensors")
        to_mlx(net).save_weights(str(folder / "digits_mlx.npz"))
        self.inputs = folder / "x.npy"
        np.save(self.inputs, self.x)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Sources:
    return Sources(tmp_path_factory.mktemp("sources"))


# kind -> (file, extra arguments, verify fully, expected stem of the output files)
KINDS = {
    "state_dict_pt": ("digits_state.pt", ["--arch"], True, "DigitsNet"),
    "pickled_module_pt": ("digits_module.pt", ["--trust-pickle"], False, "digits_module"),
    "export_pt2": ("digits_program.pt2", [], True, "digits_program"),
    "safetensors_nnbridge": ("digits_own.safetensors", [], False, "DigitsNet"),
    "safetensors_torch": ("digits_torch.safetensors", ["--arch"], False, "DigitsNet"),
    "mlx_npz": ("digits_mlx.npz", ["--arch"], False, "DigitsNet"),
}


def convert_args(src: Sources, kind: str) -> list[str]:
    file, extra, verify, _ = KINDS[kind]
    args = [str(src.folder / file)]
    for a in extra:
        args += [a, str(src.arch)] if a == "--arch" else [a]
    return args + (["-n", VERIFY_SAMPLES] if verify else ["--no-verify"])


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    """``get(kind)``: the output folder of converting that kind (converted once, on first use)."""
    root = tmp_path_factory.mktemp("converted")
    done: dict[str, tuple[Path, dict]] = {}

    def get(kind: str, capsys=None) -> tuple[Path, dict]:
        if kind not in done:
            out = root / kind
            code = main(["convert", *convert_args(src, kind), "-o", str(out), "--json"])
            printed = capsys.readouterr().out if capsys is not None else None
            assert code == 0, printed
            done[kind] = (out, json.loads(printed) if printed else {})
        return done[kind]

    return get


def one_error_line(err: str) -> str:
    """The error a failed command printed: exactly one ``error:`` line, the last, and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(ln.startswith("error") for ln in lines) == 1, err
    assert all(ln.startswith("…") for ln in lines[:-1]), err  # anything before it is progress
    return lines[-1]


def load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


# ------------------------------------------------------------------ convert
@pytest.mark.parametrize("kind", list(KINDS))
def test_convert_each_source_kind(kind, src, converted, capsys, tmp_path):
    _, _, verified, stem = KINDS[kind]
    if verified and shutil.which("nim") is None:
        pytest.skip("nim is not installed (make test installs it)")
    out, printed = converted(kind, capsys)
    expected = {stem + s for s in OUTPUT_SUFFIXES} | ({"report.json"} if verified else set())
    assert {p.name for p in out.iterdir()} == expected
    assert sorted(Path(f).name for f in printed["files"]) == sorted(expected)
    assert printed["passed"] is True
    if verified:
        report = json.loads((out / "report.json").read_text())
        assert report["passed"] is True and printed["report"]["passed"] is True
        labels = [b["backend"] for b in report["backends"]]
        assert labels[0] == "nim" and labels[1].startswith("metal"), labels
        assert all(b["argmax_agreement"] == 1.0 for b in report["backends"])
    else:
        assert printed["report"] is None
    # the converted network computes what the trained torch model computes
    net = open_output(out).network()
    got = net.predict(src.x, backend="torch")
    assert np.array_equal(got.argmax(1), src.labels)
    np.testing.assert_allclose(got, src.logits, rtol=1e-5, atol=1e-4)
    if kind == "safetensors_torch":  # converted without verification: its Nim code still runs right
        y = tmp_path / "y.npy"
        assert main(["predict", str(out), "--inputs", str(src.inputs), "-o", str(y), "--backend", "nim"]) == 0
        assert np.array_equal(load_npy(y).argmax(1), src.labels)


def test_pickled_module_refused_without_trust_pickle(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(src.folder / "digits_module.pt"), "-o", str(out), "--no-verify"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "digits_module.pt" in line and "pickled" in line and "--trust-pickle" in line
    assert not out.exists()


def test_weights_without_arch_ask_for_it(src, tmp_path, capsys):
    for file in ("digits_state.pt", "digits_mlx.npz", "digits_torch.safetensors"):
        assert main(["convert", str(src.folder / file), "-o", str(tmp_path / file), "--no-verify", "-q"]) == 2
        assert "--arch" in one_error_line(capsys.readouterr().err), file
        assert not (tmp_path / file).exists()


# ------------------------------------------------------------------ predict
@needs_nim
def test_predict_every_backend_agrees(src, converted, tmp_path, capsys):
    out, _ = converted("export_pt2")
    x = tmp_path / "x.npy"
    np.save(x, src.x[:300])
    got = {}
    for backend in ("nim", "metal", "torch", "mlx"):
        y = tmp_path / f"{backend}.npy"
        assert main(["predict", str(out), "--inputs", str(x), "-o", str(y), "--backend", backend]) == 0
        assert f"300 samples -> {y} ({backend})" in capsys.readouterr().out
        got[backend] = load_npy(y)
        assert got[backend].shape == (300, 10) and got[backend].dtype == np.float32
        assert np.array_equal(got[backend].argmax(1), src.labels[:300]), backend
    np.testing.assert_allclose(got["nim"], got["torch"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["metal"], got["torch"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- verify
@needs_nim
def test_verify_passes_then_fails_on_a_planted_bug_naming_the_layer(converted, tmp_path, capsys):
    out, _ = converted("export_pt2")
    capsys.readouterr()
    assert main(["verify", str(out), "-n", VERIFY_SAMPLES]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "FAIL" not in text

    bugged = tmp_path / "bugged"
    shutil.copytree(out, bugged)
    nim = bugged / "digits_program_cpu.nim"
    code = nim.read_text()
    planted = code.replace(", w1, b1)", ", w1, w1)")  # layer 1 (fc2) gets part of its weights as bias
    assert planted != code, "the generated loader changed: plant the bug elsewhere"
    nim.write_text(planted)
    assert main(["verify", str(bugged), "--backends", "nim", "-n", VERIFY_SAMPLES]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "first divergent layer 1 (fc2)" in text
    assert main(["verify", str(bugged), "--backends", "nim", "-n", VERIFY_SAMPLES, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    (nim_report,) = report["backends"]
    assert nim_report["first_divergent_layer"] == "1 (fc2)"
    assert [(t["layer"], t["ok"]) for t in nim_report["trace"]] == [("fc1", True), ("fc2", False)]


@needs_nim
def test_generate_from_arch_and_nmw_then_verify(converted, tmp_path, capsys):
    out, _ = converted("export_pt2")
    gen = tmp_path / "gen"
    arch, weights = out / "digits_program.json", out / "digits_program.nmw"
    assert main(["generate", str(arch), "--weights", str(weights), "-o", str(gen)]) == 0
    assert {p.name for p in gen.iterdir()} == {"digits_program" + s for s in OUTPUT_SUFFIXES}
    for name in ("digits_program_cpu.nim", "digits_program.metal"):  # the same code convert wrote
        assert (gen / name).read_text() == (out / name).read_text()
    capsys.readouterr()
    assert main(["verify", str(gen), "-n", VERIFY_SAMPLES, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True and len(report["backends"]) == 2


def test_generate_refuses_weights_of_another_network(converted, tmp_path, capsys):
    out, _ = converted("export_pt2")
    arch = json.loads((out / "digits_program.json").read_text())
    arch["layers"][-1]["activation"] = "sigmoid"
    (tmp_path / "other.json").write_text(json.dumps(arch))
    code = main(["generate", str(tmp_path / "other.json"), "--weights", str(out / "digits_program.nmw"),
                 "-o", str(tmp_path / "gen")])
    assert code == 2 and not (tmp_path / "gen").exists()
    line = one_error_line(capsys.readouterr().err)
    assert "its spec differs" in line and "expected" in line and "sigmoid" in line


def test_convert_nmw_only_verifies_nothing(src, tmp_path, capsys):
    out = tmp_path / "nmw_only"
    assert main(["convert", str(ROOT / "examples" / "digits.pt2"), "-o", str(out), "--targets", "nmw", "-q"]) == 0
    assert {p.name for p in out.iterdir()} == {"digits.json", "digits.nmw", "digits.safetensors"}


def test_generate_without_weights_writes_code_only(src, tmp_path, capsys):
    gen = tmp_path / "gen"
    assert main(["generate", str(src.arch), "-o", str(gen), "--targets", "nim", "-q"]) == 0
    assert {p.name for p in gen.iterdir()} == {"DigitsNet.json", "DigitsNet_cpu.nim"}
    assert main(["verify", str(gen)]) == 2
    assert "no .nmw weights" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------- the output folder
def test_existing_folder_refused_without_force(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    source = str(src.folder / "digits_program.pt2")
    assert main(["convert", source, "-o", str(out), "--no-verify"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "--force" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    assert main(["convert", source, "-o", str(out), "--no-verify", "--force", "-q"]) == 0
    assert not (out / "keep.txt").exists() and (out / "digits_program.nmw").is_file()


# --------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(src, converted, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    np.save(d / "narrow.npy", np.zeros((3, 5), np.float32))
    np.save(d / "ints.npy", np.zeros((3, 64), np.int64))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "text.npy").write_text("not numpy")
    out, _ = converted("safetensors_nnbridge")
    corrupt = d / "corrupt_out"
    shutil.copytree(out, corrupt)
    data = bytearray((out / "DigitsNet.nmw").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the tensor data: the CRC trailer catches it
    (corrupt / "DigitsNet.nmw").write_bytes(bytes(data))
    (d / "truncated.nmw").write_bytes(data[:100])
    return {"out": out, "corrupt_out": corrupt, **{p.stem: p for p in d.iterdir()}}


BAD = {
    "npy_wrong_width": (["predict", "{out}", "--inputs", "{narrow}", "-o", "{tmp}/y.npy"], "[n, 64]"),
    "npy_wrong_dtype": (["predict", "{out}", "--inputs", "{ints}", "-o", "{tmp}/y.npy"], "int64"),
    "npy_pickled_objects": (["predict", "{out}", "--inputs", "{objects}", "-o", "{tmp}/y.npy"], "objects.npy"),
    "npy_not_numpy": (["predict", "{out}", "--inputs", "{text}", "-o", "{tmp}/y.npy"], "text.npy"),
    "npy_missing": (["predict", "{out}", "--inputs", "{tmp}/none.npy", "-o", "{tmp}/y.npy"], "no such file"),
    "verify_inputs_wrong_width": (["verify", "{out}", "--inputs", "{narrow}"], "[n, 64]"),
    "source_missing": (["convert", "{tmp}/none.pt2", "-o", "{tmp}/o"], "no such file"),
    "source_unknown_suffix": (["convert", "{narrow}", "-o", "{tmp}/o"], "unknown model file type"),
    "unknown_target": (["convert", "{src}/digits_program.pt2", "-o", "{tmp}/o", "--targets", "nmw,cuda"], "cuda"),
    "corrupt_nmw_verify": (["verify", "{corrupt_out}"], "DigitsNet.nmw"),
    "corrupt_nmw_predict": (["predict", "{corrupt_out}", "--inputs", "{src}/x.npy", "-o", "{tmp}/y.npy",
                             "--backend", "torch"], "DigitsNet.nmw"),
    "truncated_nmw_generate": (["generate", "{src}/arch.json", "--weights", "{truncated}", "-o", "{tmp}/o"],
                               "truncated.nmw"),
    "not_an_output_folder": (["verify", "{tmp}"], "expected exactly one network spec"),
    "out_missing": (["predict", "{tmp}/nothing", "--inputs", "{src}/x.npy", "-o", "{tmp}/y.npy"], "not a folder"),
    "bad_arch_json": (["convert", "{src}/digits_state.pt", "--arch", "{narrow}", "-o", "{tmp}/o"], "narrow.npy"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_exit_2(case, bad_files, src, tmp_path, capsys):
    argv, expect = BAD[case]
    names = {k: str(v) for k, v in bad_files.items()} | {"tmp": str(tmp_path), "src": str(src.folder)}
    capsys.readouterr()
    assert main([a.format(**names) for a in argv]) == 2
    captured = capsys.readouterr()
    assert expect in one_error_line(captured.err)
    assert captured.out == ""
    assert not (tmp_path / "o").exists() and not (tmp_path / "y.npy").exists()


def test_bad_input_in_a_real_process(bad_files, tmp_path):
    r = subprocess.run([sys.executable, "-m", "nnbridge", "predict", str(bad_files["out"]), "--inputs",
                        str(bad_files["narrow"]), "-o", str(tmp_path / "y.npy")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "found shape [3, 5]" in r.stderr


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(NNBridgeError, match="no such file"):
        main(["convert", str(tmp_path / "none.pt2"), "-o", str(tmp_path / "o"), "--debug"])
    r = subprocess.run([sys.executable, "-m", "nnbridge", "convert", str(tmp_path / "none.pt2"), "-o",
                        str(tmp_path / "o"), "--debug"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr and "ConversionError" in r.stderr


# -------------------------------------------------------------------- help
def test_every_command_has_help_with_an_example(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"convert", "predict", "verify", "generate", "inspect", "bench"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: nnbridge {name}" in text and f"example: nnbridge {name} " in text, name
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(name in top for name in commands)
    assert main([]) == 2  # no command: the overview, and a non-zero exit
