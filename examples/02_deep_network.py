"""Guide section "Deep Network": five dense layers, narrowing to five classes."""

import nnbridge as nb

spec = nb.new_network("DeepMLP", input_size=256)
(spec
 .add_dense("h1", 256, 128, nb.Activation.RELU)
 .add_dense("h2", 128, 64, nb.Activation.RELU)
 .add_dense("h3", 64, 32, nb.Activation.RELU)
 .add_dense("h4", 32, 16, nb.Activation.RELU)
 .add_dense("out", 16, 5, nb.Activation.SOFTMAX))

assert spec.validate() and spec == nb.deep_mlp()
print(spec.summary())
