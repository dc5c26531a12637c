"""The paper's ablation at small scale: does each part of ReLoRA earn its place?

    python benchmarks/ablation.py                     # both corpora, 3 seeds: ~26 min on 2 CPU cores
    python benchmarks/ablation.py --corpus shakespeare --seeds 0 --jobs 1   # one corpus, one seed
    python benchmarks/ablation.py --scale paper       # llama-130m on C4 (GPU; days on one card)

Seven variants train the same model on the same tokens for the same number of steps:
full-rank, LoRA (no warm start), LoRA + warm start, ReLoRA, and ReLoRA without its
optimizer reset, its jagged schedule or its warm start. Each run is the plain loop
that `relora` is made for (no Ray, no DeepSpeed: nothing here but the method), one
process per run, ``--jobs`` at once. The data is the orchestrator's prepared Arrow
blocks; the final validation perplexity is over the whole validation split.

Prints a table of final validation perplexity (mean ± std over seeds) per corpus, and
writes `ablation.json` and `ablation.png` (validation curves, mean over seeds) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import relora

# Where the project's machines keep tinyshakespeare (beside the checkout); elsewhere, download
# https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
# and pass --shakespeare PATH.
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

# Name -> overrides of the base ReLoRAConfig (the same variants as search_spaces/ablation.yaml).
VARIANTS: dict[str, dict] = {
    "full-rank": {"method": "full", "warm_start_steps": 0},
    "lora": {"method": "lora", "warm_start_steps": 0},
    "lora+warm-start": {"method": "lora"},
    "relora": {},
    "relora-no-reset": {"reset_ratio": 0.0},
    "relora-no-jagged": {"jagged": False},
    "relora-no-warm-start": {"warm_start_steps": 0},
}


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything that sizes the experiment; the variants differ only in their ReLoRAConfig."""

    model: str
    seq_len: int
    batch_size: int  # sequences per optimizer step
    micro_batch: int
    steps: int
    lr: float
    warmup_steps: int
    rank: int
    warm_start_steps: int
    restart_every: int
    restart_warmup_steps: int
    eval_every: int
    eval_blocks: int  # validation blocks for the curves (the final figure uses them all)
    tokenizer: str = "bpe"
    vocab_size: int = 4096


SCALES = {
    # hidden 128, 4 layers; rank 16 = hidden / 8; a 1024-token BPE, so that the transformer
    # layers hold 3/4 of the parameters as in the paper's models (at 4096 tokens the
    # full-rank embeddings and lm_head are half the model and LoRA trains most of it).
    # 400 steps x 8 x 128 tokens (about one epoch of tinyshakespeare), in the paper's
    # proportions: a quarter warm start, then a restart every quarter.
    "cpu": Scale("llama-mini", 128, 8, 8, 400, 3e-3, 20, 16, 100, 100, 10, 50, 64, vocab_size=1024),
    # The paper's ablation model and schedule (Table 4: 130M, restarts every 5k, 99% reset).
    "paper": Scale(
        "llama-130m", 512, 512, 32, 20_000, 1e-3, 500, 128, 5_000, 5_000, 100, 1_000, 256, "t5-base", 32_000
    ),
}


def corpus_config(corpus: str, scale: Scale, cache_dir: str, shakespeare: Path = SHAKESPEARE):
    from orchestrator.config import DataConfig

    common = {"seq_len": scale.seq_len, "cache_dir": cache_dir, "tokenizer": scale.tokenizer}
    if scale.tokenizer == "bpe":
        common["vocab_size"] = scale.vocab_size
    if corpus == "shakespeare":
        return DataConfig(source="file", paths=[str(shakespeare)], **common)
    if corpus == "c4":
        return DataConfig(
            source="hub", hub_path="allenai/c4", hub_name="en", streaming=True, max_documents=2_000_000, **common
        )
    return DataConfig(source="builtin", **common)


def relora_config(variant: str, scale: Scale) -> relora.ReLoRAConfig:
    base = relora.ReLoRAConfig(
        method="relora",
        rank=scale.rank,
        alpha=2 * scale.rank,
        warm_start_steps=scale.warm_start_steps,
        restart_every=scale.restart_every,
        restart_warmup_steps=scale.restart_warmup_steps,
        reset_ratio=0.99,
    )
    return dataclasses.replace(base, **VARIANTS[variant])


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, micro_batch: int, device: torch.device) -> float:
    """Mean next-token loss over ``blocks``."""
    model.eval()
    total, count = 0.0, 0
    for ids in blocks.split(micro_batch):
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train()
    return total / count


def train(job: dict) -> dict:
    """One variant, one seed, one corpus: the plain loop of examples/train_tiny.py."""
    from orchestrator.data import TRAIN, VALIDATION, PreparedData, ShardSampler, load_blocks

    torch.set_num_threads(job["threads"])
    scale, cfg, seed = Scale(**job["scale"]), relora_config(job["variant"], Scale(**job["scale"])), job["seed"]
    data = PreparedData(**job["data"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    blocks = load_blocks(data.path)
    train_blocks, val_blocks = blocks[TRAIN][:], blocks[VALIDATION][:]
    sampler = ShardSampler(len(train_blocks), rank=0, world_size=1, seed=seed)
    torch.manual_seed(seed)
    model = relora.build_model(scale.model, vocab_size=data.vocab_size, max_position_embeddings=scale.seq_len)
    model = model.to(device)
    adapter_rng = torch.Generator(device=device).manual_seed(seed + 1)

    def make_optimizer(step: int):
        return relora.make_optimizer(
            model,
            cfg,
            lr=scale.lr,
            total_steps=scale.steps,
            warmup_steps=scale.warmup_steps,
            betas=(0.9, 0.95),
            step=step,
        )

    optimizer, scheduler = make_optimizer(0)
    curve = [(0, evaluate(model, val_blocks[: scale.eval_blocks], scale.micro_batch, device))]
    train_curve = []
    started = time.perf_counter()
    for step in range(scale.steps):
        if cfg.wraps_at(step):
            relora.wrap(model, rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules)
            optimizer, scheduler = make_optimizer(step)
        elif cfg.restarts_at(step):
            relora.restart(
                model, optimizer, reset_ratio=cfg.reset_ratio, reset_method=cfg.reset_method, generator=adapter_rng
            )
        batch = train_blocks[sampler.indices(step * scale.batch_size, scale.batch_size)]
        loss_sum = 0.0
        for ids in batch.split(scale.micro_batch):
            ids = ids.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss * len(ids) / len(batch)
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_curve.append((step + 1, loss_sum))
        if (step + 1) % scale.eval_every == 0 and step + 1 < scale.steps:
            curve.append((step + 1, evaluate(model, val_blocks[: scale.eval_blocks], scale.micro_batch, device)))
    final = evaluate(model, val_blocks, scale.micro_batch, device)
    curve.append((scale.steps, final))
    return {
        **{k: job[k] for k in ("corpus", "variant", "seed")},
        "final_val_loss": final,
        "final_val_ppl": math.exp(final),
        "val_curve": curve,
        "train_curve": train_curve[:: max(1, scale.steps // 200)],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "seconds": time.perf_counter() - started,
    }


def summary(results: list[dict], corpora: list[str]) -> str:
    lines = []
    for corpus in corpora:
        mine = [r for r in results if r["corpus"] == corpus]
        full = statistics.mean(r["final_val_ppl"] for r in mine if r["variant"] == "full-rank")
        lines += [f"\n{corpus}: final validation perplexity over {len(mine) // len(VARIANTS)} seeds", ""]
        lines += ["| variant | val ppl (mean ± std) | vs full-rank | seeds |", "| --- | ---: | ---: | --- |"]
        for variant in VARIANTS:
            ppl = [r["final_val_ppl"] for r in mine if r["variant"] == variant]
            std = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            seeds = ", ".join(f"{p:.2f}" for p in ppl)
            mean = statistics.mean(ppl)
            lines.append(f"| {variant} | {mean:.2f} ± {std:.2f} | {mean / full:.3f} | {seeds} |")
    return "\n".join(lines)


def plot(results: list[dict], corpora: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(corpora), figsize=(7 * len(corpora), 5), squeeze=False)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        for variant in VARIANTS:
            runs = [r for r in results if r["corpus"] == corpus and r["variant"] == variant]
            steps = [s for s, _ in runs[0]["val_curve"]]
            mean = [statistics.mean(math.exp(r["val_curve"][i][1]) for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, label=variant, linestyle="-" if variant.startswith("relora") else "--")
        ax.set(title=f"{corpus}: validation perplexity (mean of seeds)", xlabel="step", ylabel="val ppl", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--corpus", nargs="+", default=None, help="shakespeare, builtin and/or c4")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lr", type=float, help="peak learning rate for every variant (default: the scale's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one CPU thread each on CPU)")
    parser.add_argument("--cache-dir", default="~/.cache/relora-sweeps/data")
    parser.add_argument("--shakespeare", type=Path, default=SHAKESPEARE, help="tinyshakespeare's input.txt")
    parser.add_argument("--out", help="where the table's data and curves go (default: benchmarks/results/lr<LR>)")
    args = parser.parse_args()
    scale = SCALES[args.scale]
    if args.lr:
        scale = dataclasses.replace(scale, lr=args.lr)
    corpora = args.corpus or (["c4"] if args.scale == "paper" else ["shakespeare", "builtin"])
    if "shakespeare" in corpora and not args.shakespeare.is_file():
        parser.error(f"--shakespeare: {args.shakespeare} is missing (pass its path, or use --corpus builtin)")

    import ray

    from orchestrator.data import prepare_data

    ray.init(include_dashboard=False)  # Ray Data prepares the corpora; the jobs below need no Ray
    data = {
        c: dataclasses.asdict(prepare_data(corpus_config(c, scale, args.cache_dir, args.shakespeare))) for c in corpora
    }
    ray.shutdown()
    jobs = [
        {"corpus": c, "variant": v, "seed": s, "scale": dataclasses.asdict(scale), "data": data[c], "threads": 1}
        for c in corpora
        for s in args.seeds
        for v in args.variants
    ]
    if args.jobs == 1:
        for job in jobs:
            job["threads"] = torch.get_num_threads()
    out = Path(args.out or f"benchmarks/results/lr{scale.lr:g}")
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{len(jobs)} runs of {scale.model}, {scale.steps} steps x {scale.batch_size} x {scale.seq_len} tokens, "
        f"peak LR {scale.lr}"
    )
    started = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(train, jobs):
            results.append(result)
            print(
                f"  [{len(results)}/{len(jobs)} {time.perf_counter() - started:5.0f} s] {result['corpus']:11s} "
                f"{result['variant']:21s} seed {result['seed']}: val ppl {result['final_val_ppl']:.2f}",
                flush=True,
            )
    args.variants = list(VARIANTS) if set(args.variants) == set(VARIANTS) else args.variants
    (out / "ablation.json").write_text(json.dumps({"scale": dataclasses.asdict(scale), "results": results}))
    if set(args.variants) == set(VARIANTS):
        print(summary(results, corpora))
        plot(results, corpora, out / "ablation.png")
        print(f"\ncurves: {out / 'ablation.png'}")
    print(f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
