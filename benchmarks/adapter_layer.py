"""One linear layer, forward + backward: full-rank against the adapter path, step by step.

    python benchmarks/adapter_layer.py            # llama-60m's shapes, rank 64, 1024 tokens, 1 thread

What each part of `relora.ReLoRALinear`'s forward buys, measured on the layer alone
(the whole-model figures are throughput.py's):
- full:            ``x @ W.T`` with W trainable (forward, dX and dW)
- dropout(0) copy: the textbook adapter with an ``nn.Dropout(0.0)`` on its input
- unfused:         ``base + s * (x @ A.T) @ B.T``: W frozen, so autograd skips dW
- fused addmm:     the scaled update added into the base output by one ``addmm`` (no
                   full-size temporaries), autograd for the backward
- relora:          the library's layer: no dropout module at p = 0, the fused forward, and a
                   hand-written backward that sums the two dX terms in place
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import relora


def layer_variants(d_in: int, d_out: int, rank: int) -> dict:
    full = torch.nn.Linear(d_in, d_out, bias=False)
    layer = relora.ReLoRALinear(d_in, d_out, rank=rank, alpha=2 * rank, bias=False)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    weight, lora_a, lora_b, s = layer.weight, layer.lora_A, layer.lora_B, layer.scale
    dropout = torch.nn.Dropout(0.0)

    def unfused(x, drop=lambda t: t):
        return F.linear(x, weight) + s * F.linear(F.linear(drop(x), lora_a), lora_b)

    def fused(x):
        base = F.linear(x, weight)
        return torch.addmm(base.reshape(-1, d_out), F.linear(x, lora_a).reshape(-1, rank), lora_b.t(), alpha=s)

    return {
        "full": full,
        "dropout(0) copy": lambda x: unfused(x, dropout),
        "unfused": unfused,
        "fused addmm": fused,
        "relora": layer,
    }


def time_layer(forward, x: torch.Tensor, repeats: int) -> float:
    grad = torch.randn_like(forward(x))
    for _ in range(2):
        forward(x).backward(grad)
    started = time.perf_counter()
    for _ in range(repeats):
        forward(x).backward(grad)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="512x512,512x1376,1376x512", help="in x out of each layer")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"rank {args.rank}, {args.tokens} tokens, {args.threads} thread(s); ms per forward + backward\n")
    print("| in x out | full | dropout(0) copy | unfused | fused addmm | relora | relora vs full |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in args.shapes.split(","):
        d_in, d_out = map(int, shape.split("x"))
        x = torch.randn(args.tokens, d_in, requires_grad=True)
        variants = layer_variants(d_in, d_out, args.rank)
        torch.testing.assert_close(variants["fused addmm"](x), variants["relora"](x))
        ms = {name: 1000 * min(time_layer(f, x, args.repeats) for _ in range(3)) for name, f in variants.items()}
        cells = " | ".join(f"{ms[name]:.2f}" for name in variants)
        print(f"| {shape} | {cells} | {ms['full'] / ms['relora']:.2f}x |")


if __name__ == "__main__":
    main()
