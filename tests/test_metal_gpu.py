"""Metal kernels on an Apple GPU through ``mx.fast.metal_kernel`` (macOS with Metal only).

Elsewhere every test here is skipped with the reason "no Metal device" — never reported
as passed. The CPU emulation (test_metal_emu.py) runs the same kernels everywhere.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import nnbridge as nb
from nnbridge.codegen import GenerateOptions, generate
from nnbridge.codegen.common import inference_weights
from nnbridge.verify import make_inputs, mlx_metal, verify
from nnbridge.verify.core import compare, tolerance
from nnbridge.verify.metal import LABEL_GPU, MetalRunner
from tests.conftest import random_weights
from tests.test_metal_codegen import coverage_net, digits_net

pytestmark = [pytest.mark.metal,
              pytest.mark.skipif(not mlx_metal.metal_available(), reason="no Metal device")]


def _assert_close(got: np.ndarray, ref: np.ndarray, x: np.ndarray, what: str, atol: float = 1e-5) -> None:
    scale = np.maximum(np.maximum(np.max(np.abs(x), axis=1), np.max(np.abs(ref), axis=1)), 1.0)
    max_abs, _, ok = compare(got, ref, tolerance(ref, scale, atol, atol))
    assert ok.all(), f"{what}: max |diff| {max_abs:.3g}"


@pytest.mark.parametrize("batch", [1, 31, 32, 33, 1000])
def test_mlx_form_on_gpu_matches_mlx_and_torch(batch: int) -> None:
    import mlx.core as mx

    net = coverage_net()
    inf = net.for_inference()
    module = mlx_metal.module_for(net.spec)
    x = make_inputs(24, n=batch - 4, seed=batch) if batch >= 8 else \
        np.random.default_rng(batch).standard_normal((batch, 24)).astype(np.float32)
    w = inference_weights(net)
    with mx.stream(mx.gpu):
        ref_layers = inf.layer_outputs(x, backend="mlx")  # net.to_mlx() on the GPU
    per = mlx_metal.run_on_gpu(module, x, w, "per_layer")
    for i, name in enumerate(module.LAYER_BUFFERS):
        _assert_close(per[name], ref_layers[i], x, f"layer {i}", atol=1e-4)
    fused = mlx_metal.run_on_gpu(module, x, w, "fused")["output"]
    _assert_close(fused, ref_layers[-1], x, "fused kernel", atol=1e-4)
    _assert_close(fused, net.predict(x, backend="torch"), x, "fused kernel vs torch", atol=1e-4)


@pytest.mark.parametrize("name", ["simple_mlp", "deep_mlp", "binary_classifier", "koan_classifier", "digits"])
def test_verify_reports_the_gpu(name: str) -> None:
    if name == "digits":
        net = digits_net()
    else:
        spec = getattr(nb, name)()
        net = nb.net.NeuralNet(spec, random_weights(spec, 11))
    report = verify(net, backends=["metal"], n=512)
    (b,) = report.backends
    assert b.backend == LABEL_GPU == "metal (gpu)" and b.passed, report.table()


def test_half_storage_on_gpu() -> None:
    spec = (nb.new_network("Half Net", input_size=20)
            .add_dense("a", 20, 37, "gelu")
            .add_dense("b", 37, 30, "softmax"))
    net = nb.net.NeuralNet(spec, random_weights(spec, 5))
    runner = MetalRunner(net.for_inference(), half=True)
    x = np.random.default_rng(0).standard_normal((45, 20)).astype(np.float32)
    _assert_close(runner.run(x), net.predict(x, backend="mlx"), x, "half storage", atol=3e-2)


def test_metal_file_compiles_with_apples_compiler(tmp_path: Path) -> None:
    """The standalone .metal library is accepted by Apple's Metal compiler (float and half)."""
    if shutil.which("xcrun") is None:
        pytest.skip("xcrun (Xcode command line tools) not installed")
    for half in (False, True):
        out = tmp_path / ("half" if half else "float")
        generate(coverage_net().spec, GenerateOptions(output_dir=out, generate_metal=True, generate_nim_cpu=False,
                                                      metal_half=half))
        (src,) = out.glob("*.metal")
        proc = subprocess.run(["xcrun", "-sdk", "macosx", "metal", "-Werror", "-c", str(src), "-o",
                               str(out / "lib.air")], capture_output=True, text=True)
        if "unable to find utility" in proc.stderr:
            pytest.skip("xcrun has no metal compiler (install the Metal toolchain)")
        assert proc.returncode == 0, proc.stderr
