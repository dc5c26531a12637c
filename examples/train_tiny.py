"""ReLoRA in a plain PyTorch loop: a tiny LLaMA on the CPU, in about a minute.

    python examples/train_tiny.py --method relora

The text is the prose documentation that ships inside every CPython
(``pydoc_data.topics``), read byte by byte, so the script needs no network and no
tokenizer. Everything ReLoRA-specific is the handful of ``relora.*`` calls below.
"""

from __future__ import annotations

import argparse
import math
from pydoc_data.topics import topics

import torch

import relora


def byte_corpus() -> torch.Tensor:
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batches(tokens: torch.Tensor, *, batch_size: int, seq_len: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, step: int):
    """AdamW (adapters in their own group) and the LR schedule positioned at ``step``; the
    optimizer is rebuilt when the adapters go in."""
    return relora.make_optimizer(
        model,
        args.cfg,
        lr=args.lr,
        total_steps=args.steps,
        warmup_steps=args.warmup_steps,
        weight_decay=0.01,
        step=step,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int) -> float:
    model.eval()
    blocks = tokens[: (len(tokens) - 1) // seq_len * seq_len + 1]
    inputs = blocks[:-1].view(-1, seq_len)[:32]
    targets = blocks[1:].view(-1, seq_len)[:32]
    logits = model(inputs).logits
    model.train()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=relora.METHODS, default="relora")
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warm-start-steps", type=int, default=100)
    parser.add_argument("--restart-every", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.cfg = relora.ReLoRAConfig(
        method=args.method,
        rank=args.rank,
        alpha=2 * args.rank,
        warm_start_steps=args.warm_start_steps if args.method != "full" else 0,
        restart_every=args.restart_every,
        restart_warmup_steps=10,
        reset_ratio=0.99,
    )

    torch.manual_seed(args.seed)
    tokens = byte_corpus()
    split = int(0.95 * len(tokens))
    train_tokens, val_tokens = tokens[:split], tokens[split:]
    model = relora.build_model(args.model, vocab_size=256, max_position_embeddings=args.seq_len)
    optimizer, scheduler = make_optimizer(model, args, step=0)
    data = batches(
        train_tokens,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        generator=torch.Generator().manual_seed(args.seed),
    )
    # Seeded the same on every rank in data-parallel training, so re-initialised adapters agree.
    adapter_rng = torch.Generator().manual_seed(args.seed + 1)
    print(f"{args.method}: {args.model}, {args.steps} steps, restarts at {args.cfg.restart_steps(args.steps)}")
    print(f"step {0:5d}  val loss {evaluate(model, val_tokens, args.seq_len):.3f}")

    for step in range(args.steps):
        if args.cfg.wraps_at(step):
            relora.wrap(model, rank=args.cfg.rank, alpha=args.cfg.alpha, target_modules=args.cfg.target_modules)
            start_weights = relora.effective_weights(model)
            optimizer, scheduler = make_optimizer(model, args, step)  # new parameter set: new optimizer
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"step {step:5d}  switched to {args.method}: {trainable:,} trainable parameters")
        elif args.cfg.restarts_at(step):
            done = relora.restart(
                model,
                optimizer,
                reset_ratio=args.cfg.reset_ratio,
                reset_method=args.cfg.reset_method,
                generator=adapter_rng,
            )
            print(
                f"step {step:5d}  restart: merged {done.merged_layers} layers, "
                f"pruned {done.reset_fraction:.0%} of their Adam moments"
            )

        batch = next(data)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if (step + 1) % 25 == 0:
            print(f"step {step + 1:5d}  train loss {loss.item():.3f}  lr {scheduler.get_last_lr()[0]:.2e}")

    val_loss = evaluate(model, val_tokens, args.seq_len)
    print(f"step {args.steps:5d}  val loss {val_loss:.3f}  val ppl {math.exp(val_loss):.2f}")
    if args.cfg.low_rank:
        ranks = relora.update_ranks(model, start_weights)
        print(
            f"update rank since the switch: max {max(ranks.values())} across {len(ranks)} layers "
            f"(adapter rank {args.cfg.rank})"
        )


if __name__ == "__main__":
    main()
