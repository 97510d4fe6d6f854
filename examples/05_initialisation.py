"""Guide section "Weight Initialization": Kaiming for ReLU networks, Xavier for sigmoid/tanh.

The initialisers are torch's own (or MLX's with backend="mlx"); the same seed gives the same weights.
"""

import numpy as np

import nnbridge as nb

relu_net = nb.NeuralNet(nb.simple_mlp())
relu_net.init_weights("kaiming", seed=42)

tanh_spec = nb.new_network("TanhNet", 64).add_dense("h", 64, 32, "tanh").add_dense("out", 32, 1, "sigmoid")
tanh_net = nb.NeuralNet(tanh_spec)
tanh_net.init_weights("xavier", seed=42)

w = relu_net.weights["hidden1.weight"]
print(f"kaiming hidden1: std {w.std():.4f} (formula sqrt(2/fan_in) = {np.sqrt(2 / 128):.4f})")
again = nb.NeuralNet(nb.simple_mlp())
again.init_weights("kaiming", seed=42)
assert again.weights == relu_net.weights
print("same seed, same weights")
