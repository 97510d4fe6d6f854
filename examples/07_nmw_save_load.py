"""Guide section "Binary Weights": save NMW (readable by the Nim library) and load it back."""

import tempfile
from pathlib import Path

import nnbridge as nb

net = nb.NeuralNet(nb.simple_mlp())
net.init_weights("kaiming", seed=42)
with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "weights.nmw"
    net.weights.save_nmw(path)
    weights = nb.load_nmw(path)
    assert weights == net.weights
    info = nb.read_nmw(path)
    print(f"{path.name}: {info.size} bytes, {len(weights)} tensors, trailer tool = {info.trailer['tool']}")
    net2 = nb.NeuralNet.load(path)
    assert net2.weights == net.weights
