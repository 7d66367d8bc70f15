"""PyTorch's whole process for the job `benches/whole_job.sh` measures as `prune`: global 50%
magnitude (L1) pruning of every tensor of a safetensors file, written back as dense safetensors
and fsynced (as `modelpress compress` makes its outputs durable).

    python benches/torch_prune.py IN.safetensors OUT.safetensors [THREADS]

`torch.nn.utils.prune.global_unstructured` with `L1Unstructured` is the reference the issue names
(https://pytorch.org/docs/stable/generated/torch.nn.utils.prune.global_unstructured.html); each
tensor becomes a module's `weight` because that is what the API prunes, and `prune.remove` makes
the zeros permanent, as a user saving the pruned model must. Prints the tensors' sparsity.
"""

import os
import sys

import torch
import torch.nn.utils.prune as prune
from safetensors.torch import load_file, save_file


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    holders = []
    for name, t in load_file(src).items():
        m = torch.nn.Module()
        m.weight = torch.nn.Parameter(t, requires_grad=False)
        holders.append((name, m))
    prune.global_unstructured(
        [(m, "weight") for _, m in holders], pruning_method=prune.L1Unstructured, amount=0.5
    )
    out = {}
    for name, m in holders:
        prune.remove(m, "weight")
        out[name] = m.weight.detach().contiguous()
    save_file(out, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    zeros = sum(int((t == 0).sum()) for t in out.values())
    total = sum(t.numel() for t in out.values())
    print(f"sparsity {zeros / total:.4f}")


if __name__ == "__main__":
    main()
