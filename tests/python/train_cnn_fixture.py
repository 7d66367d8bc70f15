"""Trains the small digits CNN kept in tests/fixtures (digits_cnn.safetensors + digits_cnn.graph.json).

Usage: python tests/python/train_cnn_fixture.py PATH/TO/digits_train.safetensors
(the shared fixtures' training split: `images` f32 [N, 1, 8, 8], `labels` i64 [N]). Deterministic
(seed 0, one thread). Prints the test accuracy on tests/fixtures/digits_test.safetensors, which the
fixtures README records and the integration tests compare ModelPress's evaluation with.
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class Cnn(torch.nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, c, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.b1 = Block(c)
        self.dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.fc = torch.nn.Linear(c * 16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.b1(x)
        x = torch.max_pool2d(torch.relu(self.dw(x)), 2)
        return self.fc(x.flatten(1))


GRAPH = {"input": {"shape": [1, 8, 8]}, "layers": [
    {"kind": "conv2d", "name": "conv1", "padding": 1}, {"kind": "batch_norm", "name": "bn1"}, {"kind": "relu"},
    {"kind": "residual", "layers": [{"kind": "conv2d", "name": "b1.conv", "padding": 1}, {"kind": "relu"}]},
    {"kind": "conv2d", "name": "dw", "groups": 16, "padding": 1}, {"kind": "relu"},
    {"kind": "max_pool2d", "kernel": 2}, {"kind": "flatten"}, {"kind": "linear", "name": "fc"}]}


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train = load_file(sys.argv[1])
    test = load_file(FIX / "digits_test.safetensors")
    model = Cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train["images"], train["labels"]
    for epoch in range(40):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test["images"]).argmax(1) == test["labels"]).float().mean().item()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, FIX / "digits_cnn.safetensors")
    (FIX / "digits_cnn.graph.json").write_text(json.dumps(GRAPH, indent=1) + "\n")
    print(f"test accuracy {acc:.4f} ({round(acc * len(test['labels']))}/{len(test['labels'])})")


if __name__ == "__main__":
    main()
