"""Guide section "Binary Classifier": two classes, then the unified inference API on one sample."""

import numpy as np

import nnbridge as nb

spec = nb.new_network("BinaryClassifier", input_size=100)
spec.add_dense("hidden", 100, 50, "relu").add_dense("output", 50, 2, "softmax")
assert spec.validate()

net = nb.NeuralNet(spec)
net.init_weights("kaiming", seed=42)
sample = np.random.default_rng(0).standard_normal(100).astype(np.float32)
category, confidence = net.infer(sample)
print(f"class {category} with confidence {confidence:.3f}")
