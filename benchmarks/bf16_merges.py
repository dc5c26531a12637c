"""What bf16 merges lose, and what it costs in perplexity: fp32 against bf16, before and after
the compensated merge (relora.layers' module docstring).

    python benchmarks/bf16_merges.py                  # llama-mini, built-in corpus: ~10 min on 2 CPU cores

Three runs of the same ReLoRA trial on one real DeepSpeed ZeRO-2 engine (one rank, gloo;
DeepSpeed's CPU accelerator on a CPU): fp32; bf16 with plain merges (each merge rounds
``W + s·B·A`` back to bf16, as the reference code and every peer do: "before"); bf16 with
compensated merges (the default: "after"). Restarts come often and late in a cosine that
ends low, where updates are smallest next to ``W``: the case the issue measured. Prints,
per run, the lost share of each merge (norm(W_after - W_before - dW) / norm(dW)) and the
final validation perplexity over the whole validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

import relora

RUNS = {"fp32": (False, True), "bf16-plain-merges": (True, False), "bf16-compensated": (True, True)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank: int, args, name: str, port: int, out: str) -> None:
    """One run: warm start, then restarts every ``restart_every`` steps; writes its figures to ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed

    from orchestrator.collectives import init_deepspeed_comm
    from orchestrator.data import TRAIN, VALIDATION, PreparedData, ShardSampler, load_blocks

    bf16, compensate = RUNS[name]
    torch.set_num_threads(args.threads)
    init_deepspeed_comm()
    data = PreparedData(**json.loads(args.data))
    blocks = load_blocks(data.path)
    train_blocks, val_blocks = blocks[TRAIN][:], blocks[VALIDATION][:]
    sampler = ShardSampler(len(train_blocks), rank=0, world_size=1, seed=0)
    cfg = relora.ReLoRAConfig(
        rank=args.rank,
        alpha=2 * args.rank,
        warm_start_steps=args.warm_start,
        restart_every=args.restart_every,
        restart_warmup_steps=args.restart_every // 4,
    )
    torch.manual_seed(0)
    model = relora.build_model(args.model, vocab_size=data.vocab_size, max_position_embeddings=data.seq_len)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": bf16},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }

    def engine_at(step: int):
        optimizer, scheduler = relora.make_optimizer(
            model, cfg, lr=args.lr, total_steps=args.steps, warmup_steps=10, min_lr_ratio=0.01, step=step
        )
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        return engine

    engine = engine_at(0)
    generator = torch.Generator().manual_seed(1)
    lost = []
    for step in range(args.steps):
        if cfg.wraps_at(step):
            engine.destroy()
            for hook in ("module_forward_pre_hook", "module_forward_post_hook"):  # destroy() leaves them
                if getattr(engine, hook, None) is not None:
                    getattr(engine, hook).remove()
            relora.wrap(model, rank=cfg.rank, alpha=cfg.alpha)
            engine = engine_at(step)
        elif cfg.restarts_at(step):
            done = relora.restart(model, engine, reset_ratio=0.99, generator=generator, compensate=compensate)
            lost.append(done.lost_share)
        ids = train_blocks[sampler.indices(step * args.batch, args.batch)]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for ids in val_blocks.split(args.batch):
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            count += ids[:, 1:].numel()
    val_loss = float(total / count)
    with open(out, "w") as f:
        json.dump({"lost_shares": lost, "val_loss": val_loss, "val_ppl": math.exp(val_loss)}, f)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-mini")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warm-start", type=int, default=50)
    parser.add_argument("--restart-every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from orchestrator.config import DataConfig
    from orchestrator.data import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(DataConfig(source="builtin", seq_len=128, vocab_size=1024, cache_dir=f"{tmp}/cache"))
        args.data = json.dumps(data.__dict__)
        results = {}
        for name in RUNS:
            started = time.perf_counter()
            out = f"{tmp}/{name}.json"
            mp.spawn(run, args=(args, name, free_port(), out), nprocs=1, join=True)
            results[name] = json.loads(open(out).read())
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    print(
        f"\n{args.model}, rank {args.rank}, {args.steps} steps, warm start {args.warm_start}, restart every "
        f"{args.restart_every}, batch {args.batch} x 128 tokens, lr {args.lr} (cosine to 1%), built-in corpus\n"
    )
    print("| run | lost share per merge (first, median, last) | final val ppl |")
    print("| --- | --- | ---: |")
    for name, r in results.items():
        shares = r["lost_shares"]
        median = sorted(shares)[len(shares) // 2]
        print(f"| {name} | {shares[0]:.2e}, {median:.2e}, {shares[-1]:.2e} | {r['val_ppl']:.2f} |")


if __name__ == "__main__":
    main()
