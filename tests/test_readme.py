"""The README's quick start runs as written (with a small torch model as `model`)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import needs_nim

README = Path(__file__).resolve().parents[1] / "README.md"


@needs_nim
def test_quick_start_runs(tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3),
                                torch.nn.Softmax(dim=-1))
    scope = {"model": model}
    exec(compile(block, "README quick start", "exec"), scope)
    assert scope["report"].passed
    assert (tmp_path / "model.nmw").is_file()
    assert len(scope["res"].categories) == 10_000
    assert sorted(p.suffix for p in (tmp_path / "generated").iterdir()) == [".json", ".metal", ".nim", ".py"]
