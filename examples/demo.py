"""`make demo`: the whole pipeline on the bundled digits classifier.

1. `nnbridge convert examples/digits.pt2 -o demo_out --force` — NMW, Metal, Nim, verified
   (Nim compiled and run; Metal on the GPU through MLX where there is one, else the CPU emulation).
2. Score the digits test split with the original torch model and with the generated Nim code
   through ParallelInferenceEngine: the accuracies must be identical.
3. Report throughput.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from digits_data import load_split  # noqa: E402

import nnbridge as nb  # noqa: E402
from nnbridge.cli import main as cli  # noqa: E402


def run(out: Path) -> int:
    """Run the demo into ``out``; returns the process exit code."""
    checkpoint = HERE / "digits.pt2"
    print(f"$ nnbridge convert {checkpoint.relative_to(HERE.parent)} -o {out} --force")
    code = cli(["convert", str(checkpoint), "-o", str(out), "--force"])
    if code != 0:
        print(f"conversion failed (exit {code})")
        return code

    _, _, x_test, y_test = load_split()
    model = torch.export.load(str(checkpoint)).module()
    with torch.inference_mode():
        torch_pred = model(torch.from_numpy(x_test)).argmax(1).numpy()

    with nb.ParallelInferenceEngine(out) as engine:
        res = engine.infer_batch(x_test)
        big = np.ascontiguousarray(np.tile(x_test, (max(1, 200_000 // len(x_test)), 1)))
        engine.infer_batch(big)  # warm-up
        timing = [engine.infer_batch(big) for _ in range(5)]
    acc_torch = float((torch_pred == y_test).mean())
    acc_nim = float((res.categories == y_test).mean())
    same = bool(np.array_equal(torch_pred, res.categories))
    rate = float(np.median([t.throughput for t in timing]))
    print()
    print(f"digits test split: {len(y_test)} samples")
    print(f"  accuracy, torch (original .pt2 model):          {acc_torch:.4f}")
    print(f"  accuracy, generated Nim code (engine, {engine.threads} threads): {acc_nim:.4f}")
    print(f"  predictions identical: {same}")
    print(f"  throughput of the generated code: {rate / 1e6:.2f} M samples/s "
          f"(median of 5 batches of {len(big)}, {engine.threads} threads)")
    return 0 if same and acc_nim == acc_torch else 1


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "demo_out"))
