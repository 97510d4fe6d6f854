"""Guide section "Basic MLP": build, validate and summarise the SimpleMLP."""

import nnbridge as nb

spec = nb.new_network("SimpleMLP", input_size=128)
(spec
 .add_dense("hidden1", 128, 64, "relu")
 .add_dense("hidden2", 64, 32, "relu")
 .add_dense("output", 32, 10, "softmax"))

assert spec.validate()
print(spec.summary())
assert spec.total_params() == 10666
