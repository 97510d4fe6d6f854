"""Train the demo's digits classifier with torch and ship it as .pt2 and .safetensors.

    python examples/train_digits.py                      # writes examples/digits.pt2 and examples/digits.safetensors
    python examples/train_digits.py OUT_DIR --epochs 2   # a quick run into another folder (created if needed)

A custom module with its own ``forward`` (functional activations, batch norm, dropout),
the way people write models; ``make demo`` converts the checkpoint this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from digits_data import load_split  # noqa: E402

HERE = Path(__file__).parent


class DigitsMLP(nn.Module):
    """64 pixels -> 64 (batch norm, relu, dropout) -> 32 relu -> 10 softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.bn1 = nn.BatchNorm1d(64)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.bn1(self.fc1(x))))
        x = F.relu(self.fc2(x))
        return F.softmax(self.fc3(x), dim=-1)


def train(epochs: int = 60, seed: int = 0) -> tuple[DigitsMLP, float]:
    """Train on the digits training split; returns the model (eval mode) and its test accuracy."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_split()
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            loss = F.nll_loss(torch.log(model(xt[idx]) + 1e-9), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    return model, acc


def main(out: Path = HERE, epochs: int = 60) -> None:
    """Train, then write ``digits.pt2`` and ``digits.safetensors`` into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model, acc = train(epochs)
    example = (torch.zeros(2, 64),)
    ep = torch.export.export(model, example, dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, out / "digits.pt2")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, out / "digits.safetensors", metadata={"format": "pt", "trained_by": "examples/train_digits.py"})
    print(f"test accuracy {acc:.4f}; wrote {out / 'digits.pt2'} and {out / 'digits.safetensors'}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train the digits classifier and save it as .pt2 and .safetensors.")
    parser.add_argument("out", nargs="?", type=Path, default=HERE, help="output folder (default: examples/)")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    args = parser.parse_args()
    main(args.out, args.epochs)
