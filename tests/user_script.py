"""A user's standalone script: their own model class, plain DataLoaders, one call to ``autoprune.prune``.

Run by ``tests/test_api.py`` as ``python tests/user_script.py OUTDIR``; exits 0 and prints what it checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune


class Net(nn.Module):
    """The user's own network (defined in ``__main__``)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-like images (0-255) whose class is the colour channel that is raised."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = 120 + 40 * torch.randn(n, 3, 16, 16, generator=g) + 25 * F.one_hot(labels, 3).float()[:, :, None, None]
    return images, labels


def main(out: Path) -> None:
    torch.manual_seed(0)
    train_x, train_y = make_data(256, 0)
    val_x, val_y = make_data(96, 1)
    mean, std = train_x.mean((0, 2, 3), keepdim=True), train_x.std((0, 2, 3), keepdim=True)
    # normalisation happens here, outside the model
    train_dl = DataLoader(TensorDataset((train_x - mean) / std, train_y), batch_size=32, shuffle=True)
    val_dl = DataLoader(TensorDataset((val_x - mean) / std, val_y), batch_size=64)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(4):
        for x, y in train_dl:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()

    example_inputs = torch.randn(1, 3, 16, 16)
    # every argument of the documented call; a small swarm and two timed latency runs keep it quick
    result = autoprune.prune(model, example_inputs, method=autoprune.methods.PSO(particles=3, iterations=2),
                             macs_reduction=0.5, train_loader=train_dl, val_loader=val_dl, score_fn=None,
                             finetune=autoprune.TrainConfig(epochs=1, lr=0.01), budget=None, ignored_layers=None,
                             round_to=None, device=None, seed=0, callbacks=(), out=None,
                             latency_repeats=2, latency_batch=4)
    print(f"macs reduction: {result.reduction['macs']:.4f}")
    print(f"accuracy: {result.base.accuracy:.3f} -> {result.pruned.accuracy:.3f}")
    print("widths: " + ", ".join(f"{w.name} {w.before}->{w.after}" for w in result.widths))

    path = out / "pruned.pt"
    result.save(path)
    reloaded = autoprune.load(path, model=Net())
    batch = (val_x[:7] - mean) / std
    with torch.no_grad():
        same = torch.equal(reloaded.eval()(batch), result.model.eval()(batch))
    print(f"reloaded outputs: {'identical' if same else 'DIFFERENT'}")

    report = autoprune.export_onnx(result.model, example_inputs, out / "pruned.onnx")
    print(f"onnx: {'verified' if report.verified else 'not verified'} max_abs_diff={report.max_abs_diff:.2e}")
    if not same or not report.verified:
        sys.exit(1)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
