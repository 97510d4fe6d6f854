"""Guide section "Code Generation": Metal kernels and Nim CPU code for a network."""

import tempfile
from pathlib import Path

import nnbridge as nb

spec = nb.simple_mlp()
with tempfile.TemporaryDirectory() as d:
    opts = nb.default_options()
    opts.output_dir = d
    opts.generate_metal = True
    opts.generate_nim_cpu = True
    files = spec.generate(opts)  # weights loaded at run time from an NMW file
    for f in files:
        print("wrote", Path(f).name, f"({Path(f).stat().st_size} bytes)")
    assert any(str(f).endswith("SimpleMLP.metal") for f in files)
    assert any(str(f).endswith("SimpleMLP_cpu.nim") for f in files)
