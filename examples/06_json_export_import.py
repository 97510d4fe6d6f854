"""Guide section "JSON Export/Import": the Nim library's spec JSON, read back strictly."""

import tempfile
from pathlib import Path

import nnbridge as nb

spec = nb.simple_mlp()
text = spec.to_json()
with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "architecture.json"
    path.write_text(text)
    loaded = nb.from_json(path.read_text())
    assert loaded == spec
    assert nb.load_spec(nb.save_spec(spec, Path(d) / "again.json")) == spec
print(text[:120] + "...")
