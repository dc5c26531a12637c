"""Speed and memory of full-rank, LoRA and ReLoRA training on one model, in one run.

    python benchmarks/throughput.py                       # llama-60m (vocab 4096) on this machine's CPUs
    python benchmarks/throughput.py --model llama-350m --seq-len 512 --micro-batch 8   # on GPUs

For each method it trains the same model, from the same initial weights, on the same
random tokens, and measures tokens/s, seconds per optimizer step, peak memory, trainable
parameters and optimizer-state bytes (Adam moments plus fp32 master copies), twice:
plain PyTorch in one process, and DeepSpeed ZeRO with ``--workers`` ranks (gloo on CPU,
nccl on GPU). ReLoRA's numbers include its restarts; the cost of one restart (merge,
re-init, fp32 master sync, optimizer reset) is also reported as a fraction of a step.
Ratios are against full-rank from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

import relora
from orchestrator.collectives import barrier, init_deepspeed_comm, sum_across_ranks

METHODS = ("full", "lora", "relora")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; a fresh process per run


def build(args, method: str, device: torch.device):
    torch.manual_seed(0)
    model = relora.build_model(args.model, vocab_size=args.vocab, max_position_embeddings=args.seq_len).to(device)
    if args.bf16:
        model = model.to(torch.bfloat16)
    if method != "full":
        relora.wrap(model, rank=args.rank, alpha=2 * args.rank)
    return model


def optimizer_state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # a ZeRO wrapper holds the torch optimizer
    total = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if torch.is_tensor(t))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO fp32 masters
        total += sum(t.numel() * t.element_size() for t in getattr(optimizer, name, []))
    return total


def batches(args, rank: int, device: torch.device):
    generator = torch.Generator().manual_seed(rank)
    while True:
        yield torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=generator).to(device)


def make_optimizer(args, model: torch.nn.Module):
    """The trials' AdamW and jagged cosine (relora.make_optimizer), restarting where the timing restarts."""
    schedule = relora.ReLoRAConfig(
        rank=args.rank, alpha=2 * args.rank, restart_every=args.restart_every, restart_warmup_steps=1
    )
    return relora.make_optimizer(model, schedule, lr=1e-4, total_steps=10**6, warmup_steps=1)


def run_plain(args, method: str, out: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args, method, device)
    optimizer, scheduler = make_optimizer(args, model)
    data = batches(args, 0, device)

    def step() -> None:
        ids = next(data)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def restart() -> None:
        relora.restart(model, optimizer, reset_ratio=0.99)

    measure(args, method, device, step, restart, optimizer, model, world_size=1, out=out)


def run_deepspeed(rank: int, args, method: str, port: int, out: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(args.workers),
        LOCAL_WORLD_SIZE=str(args.workers),
    )
    import deepspeed

    cuda = torch.cuda.is_available()
    init_deepspeed_comm()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = build(args, method, device)
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.bf16},
        "steps_per_print": 10**9,
    }
    optimizer, scheduler = make_optimizer(args, model)
    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    data = batches(args, rank, device)

    def step() -> None:
        ids = next(data)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    def restart() -> None:
        relora.restart(model, engine, reset_ratio=0.99, generator=torch.Generator(device=device).manual_seed(1))

    measure(args, method, device, step, restart, zero_optimizer, model, world_size=args.workers, out=out, rank=rank)
    barrier(device)
    torch.distributed.destroy_process_group()  # exiting with the group alive aborts on gloo


def measure(args, method, device, step, restart, optimizer, model, *, world_size, out: Path, rank: int = 0) -> None:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    started = time.perf_counter()
    restarts = 0
    for i in range(1, args.steps + 1):
        step()
        if method == "relora" and i % args.restart_every == 0:
            restart()
            restarts += 1
    sync()
    elapsed = time.perf_counter() - started
    restart_seconds = 0.0
    if method == "relora":  # one more restart, timed alone
        sync()
        t = time.perf_counter()
        restart()
        sync()
        restart_seconds = time.perf_counter() - t
    state_bytes = torch.tensor([optimizer_state_bytes(optimizer)], dtype=torch.float64)
    if world_size > 1:  # on the device the backend serves (NCCL: CUDA only)
        state_bytes = sum_across_ranks(state_bytes, device)
    if rank == 0:
        tokens = args.steps * args.micro_batch * args.seq_len * world_size
        flops_per_token = relora.train_flops_per_token(model, args.seq_len)
        peak = relora.peak_flops(device, bf16=args.bf16)
        result = {
            "tokens_per_s": tokens / elapsed,
            "flops_per_token": flops_per_token,
            "mfu": relora.mfu(tokens / elapsed, flops_per_token, peak, world_size),
            "step_s": elapsed / args.steps,
            "peak_memory_mb": peak_memory_mb(device),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer_state_bytes": int(state_bytes.item()),
            "restarts_in_timing": restarts,
            "restart_s": restart_seconds,
        }
        out.write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(args) -> dict:
    results: dict = {}
    ctx = mp.get_context("spawn")  # a fresh process per run: clean peak memory, no shared state
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for method in METHODS:
                out = Path(tmp, f"{mode}-{method}.json")
                if mode == "plain":
                    p = ctx.Process(target=run_plain, args=(args, method, out))
                    p.start()
                    p.join()
                else:
                    mp.spawn(run_deepspeed, args=(args, method, free_port(), out), nprocs=args.workers, join=True)
                results[(mode, method)] = json.loads(out.read_text())
                print(f"  {mode:9s} {method:6s} {results[(mode, method)]['tokens_per_s']:9.0f} tokens/s", flush=True)
    return results


def table(args, results: dict) -> str:
    lines = [
        f"model {args.model}, rank {args.rank}, seq_len {args.seq_len}, micro-batch {args.micro_batch}, "
        f"{args.steps} timed steps (ReLoRA restarts every {args.restart_every}), "
        f"DeepSpeed ZeRO-{args.zero_stage} x {args.workers}, {'bf16' if args.bf16 else 'fp32'}",
        "",
        "| mode | method | tokens/s | vs full | s/step | peak MB | trainable params "
        "| optimizer state MB | vs full | restart / step | GFLOPs/token | MFU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in args.modes:
        full = results[(mode, "full")]
        for method in METHODS:
            r = results[(mode, method)]
            restart = f"{r['restart_s'] / r['step_s']:.2f}" if method == "relora" else ""
            utilisation = "none (no known peak)" if r["mfu"] is None else f"{r['mfu']:.1%}"
            lines.append(
                f"| {mode} | {method} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / full['tokens_per_s']:.2f}x "
                f"| {r['step_s']:.3f} | {r['peak_memory_mb']:.0f} | {r['trainable_params']:,} "
                f"| {r['optimizer_state_bytes'] / 2**20:.1f} "
                f"| {r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.0%} | {restart} "
                f"| {r['flops_per_token'] / 1e9:.3f} | {utilisation} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The paper's smallest model (hidden 512, 8 layers); rank = hidden / 8, as the paper's 350M.
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--restart-every", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2, choices=(1, 2))
    parser.add_argument("--modes", nargs="+", default=["plain", "deepspeed"], choices=("plain", "deepspeed"))
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (GPUs)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = time.perf_counter()
    results = run_all(args)
    print()
    print(table(args, results))
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
