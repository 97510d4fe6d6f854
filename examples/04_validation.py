"""Guide section "Validation": validate() is a predicate; problems() says exactly what is wrong."""

import nnbridge as nb

spec = nb.new_network("Broken", input_size=128)
spec.add_dense("hidden1", 128, 64, "relu").add_dense("output", 32, 10, "softmax")  # 64 != 32

if not spec.validate():
    print("Error: layer dimensions don't match!")
    for problem in spec.problems():
        print("  -", problem)

try:
    spec.check()
except nb.SpecError as e:
    print("check() raised SpecError as expected")
    assert "does not match" in str(e)

fixed = nb.simple_mlp()
assert fixed.validate()
print("Total parameters:", fixed.total_params())
