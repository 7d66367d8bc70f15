"""PyTorch's figures for `cargo bench --bench graph`, on the files that bench writes (and one KD step).

Forward passes of the digits MLP and the bench's CNN at batch 256 (torch.no_grad, 2 threads,
median of repeated runs), and torch.svd_lowrank(q=256, niter=2) of the bench's 4096x4096 matrix
with its relative Frobenius error. Writes target/bench-graph/torch.json.
"""
import json
import pathlib
import statistics
import time

import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
DIR = ROOT / "target" / "bench-graph"
FIX = ROOT / "tests" / "fixtures"
torch.set_num_threads(2)


def median_ms(runs, f):
    f()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    data = load_file(FIX / "digits_test.safetensors")
    t = load_file(FIX / "teacher_mlp.safetensors")
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    mlp.load_state_dict({f"{i}.{k}": t[f"fc{n}.{k}"] for i, n in [(0, 1), (2, 2), (4, 3)] for k in ["weight", "bias"]})
    mlp.eval()
    x = data["inputs"][:256]

    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)

        def forward(self, x):
            return x + torch.relu(self.conv(x))

    class Cnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(32)
            self.b1 = Res()
            self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.fc = torch.nn.Linear(32 * 16, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.b1(x)
            x = torch.max_pool2d(torch.relu(self.dw(x)), 2)
            return self.fc(x.flatten(1))

    cnn = Cnn()
    weights = load_file(DIR / "cnn.safetensors")
    missing = cnn.load_state_dict(weights, strict=False)
    assert not missing.unexpected_keys, missing
    cnn.eval()
    images = data["images"][:256]

    w = load_file(DIR / "matrix.safetensors")["w"]
    out = {}
    with torch.no_grad():
        out["mlp_forward_ms"] = median_ms(50, lambda: mlp(x))
        out["cnn_forward_ms"] = median_ms(20, lambda: cnn(images))
        torch.manual_seed(0)
        result = {}

        def svd():
            u, s, v = torch.svd_lowrank(w, q=256, niter=2)
            result["err"] = float(torch.linalg.norm(w - (u * s) @ v.T) / torch.linalg.norm(w))

        out["svd_rank256_ms"] = median_ms(3, svd)
        out["svd_rank256_relative_error"] = result["err"]

    # One KD step: teacher 784-1024-1024-10 (no grad) -> student 784-256-10, AdamW, batch 256.
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)).eval()
    student = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    xb = torch.randn(256, 784)

    def kd_step():
        with torch.no_grad():
            t = teacher(xb)
        s = student(xb)
        loss = torch.nn.functional.kl_div(torch.log_softmax(s / 4, 1), torch.log_softmax(t / 4, 1), log_target=True, reduction="batchmean") * 16
        opt.zero_grad()
        loss.backward()
        opt.step()

    out["kd_step_ms"] = median_ms(20, kd_step)

    def teacher_forward():
        with torch.no_grad():
            teacher(xb)

    with torch.no_grad():
        t_fixed = teacher(xb)

    def student_step():
        s = student(xb)
        loss = torch.nn.functional.kl_div(torch.log_softmax(s / 4, 1), torch.log_softmax(t_fixed / 4, 1), log_target=True, reduction="batchmean") * 16
        opt.zero_grad()
        loss.backward()
        opt.step()

    out["kd_teacher_forward_ms"] = median_ms(20, teacher_forward)
    out["kd_student_step_ms"] = median_ms(20, student_step)
    (DIR / "torch.json").write_text(json.dumps(out, indent=1))
    for k, v in out.items():
        print(f"{k:<30} {v:.4f}")


if __name__ == "__main__":
    main()
