"""PyTorch's figures for `cargo bench --bench distill`: the same 64-32-10 student, from the same
initial weights (target/bench-distill/student_64_32_10.safetensors, written by the bench), distilled
from the digits teacher on digits_train as the `distill` step does it (teacher logits computed once,
batches of 64 in a seeded order, KD loss T = 4 with kd_weight 0.9, AdamW lr 1e-2 with a cosine
schedule, 100 epochs, the last 10% held out, the best held-out epoch kept), then measured on
digits_test. Prints the training time (the loop alone, 2 threads) and the test accuracy of three
seeds. The batch order differs from ModelPress's (torch.randperm), so accuracies match in
distribution, not bit for bit.
"""
import math
import pathlib
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
torch.set_num_threads(2)


def mlp(state, sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [torch.nn.Linear(sizes[i], sizes[i + 1]), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    names = [f"fc{i + 1}" for i in range(len(sizes) - 1)]
    net.load_state_dict({f"{2 * i}.{k}": state[f"{n}.{k}"] for i, n in enumerate(names) for k in ["weight", "bias"]})
    return net


def main():
    train, test = load_file(FIX / "digits_train.safetensors"), load_file(FIX / "digits_test.safetensors")
    teacher = mlp(load_file(FIX / "teacher_mlp.safetensors"), [64, 256, 256, 10]).eval()
    init = load_file(ROOT / "target" / "bench-distill" / "student_64_32_10.safetensors")
    x, y = train["inputs"], train["labels"]
    n = x.shape[0]
    held = round(n * 0.1)
    xt, yt, xv, yv = x[: n - held], y[: n - held], x[n - held :], y[n - held :]
    with torch.no_grad():
        logits = teacher(xt)
    T, alpha, epochs, batch = 4.0, 0.9, 100, 64
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        student = mlp(init, [64, 32, 10])
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
        steps = epochs * math.ceil(len(xt) / batch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        best, best_state = -1.0, None
        start = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(len(xt))
            for i in range(0, len(xt), batch):
                idx = order[i : i + batch]
                s = student(xt[idx])
                kd = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(logits[idx] / T, 1), log_target=True, reduction="batchmean")
                loss = alpha * T * T * kd + (1 - alpha) * F.cross_entropy(s, yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                acc = (student(xv).argmax(1) == yv).float().mean().item()
            if acc > best:
                best, best_state = acc, {k: v.clone() for k, v in student.state_dict().items()}
        seconds = time.perf_counter() - start
        student.load_state_dict(best_state)
        with torch.no_grad():
            acc = (student(test["inputs"]).argmax(1) == test["labels"]).float().mean().item()
        print(f"seed {seed}: test accuracy {acc:.4f}, training {seconds:.2f} s ({seconds / epochs * 1e3:.2f} ms per epoch)")


if __name__ == "__main__":
    main()
