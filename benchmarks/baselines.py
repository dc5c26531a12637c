"""search_spaces/baselines.yaml at CPU scale: full rank, LoRA + warm start, ReLoRA and GaLore at
one token budget, each at its own LRs, on one engine (DDP), through the real sweep.

    python benchmarks/baselines.py                        # ~12 min on 2 CPU cores
    python benchmarks/baselines.py --out /tmp/baselines   # where the MLflow store and runs go

The shipped file's search block is kept as it is (its variants and LR grids); what sizes the
run is replaced: llama-mini on tinyshakespeare (or the built-in corpus), 1 worker per trial,
400 steps of 8 x 128 tokens, a quarter of them the warm start, a restart every quarter, GaLore
re-projecting every 50 steps at rank 16 (its paper's rank is a quarter of the hidden size at
60M; here 1/8, as ReLoRA's). It prints the sweep's own summary table (val ppl, tokens/s, one
worker's memory) and writes `baselines.json` with every trial's numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def cpu_spec(out: Path, corpus: Path | None) -> dict:
    spec = yaml.safe_load((ROOT / "search_spaces" / "baselines.yaml").read_text())
    data = {"source": "builtin"} if corpus is None else {"source": "file", "paths": [str(corpus)]}
    spec.update(
        model={"name": "llama-mini"},
        data={**data, "tokenizer": "bpe", "vocab_size": 1024, "seq_len": 128, "cache_dir": str(out / "cache")},
        optim={"lr": 0.003, "warmup_steps": 20},
        train={
            "total_steps": 400,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "eval_every": 50,
            "eval_blocks": 64,
            "checkpoint_every": 100,
            "engine": "ddp",
        },
        deepspeed={"precision": "fp32"},
        run={"name": "baselines-cpu", "storage_path": str(out / "runs"), "max_failures": 0},
    )
    spec["relora"].update(rank=16, warm_start_steps=100, restart_every=100, restart_warmup_steps=10, update_proj_gap=50)
    spec["search"]["variants"]["galore"]["relora.rank"] = 16
    spec["search"]["variants"]["galore"]["optim.lr"] = {"grid": [0.01, 0.003]}  # two, not three: CPU time
    spec["search"]["variants"]["full-rank"]["optim.lr"] = {"grid": [0.003, 0.001]}
    spec["search"].update(max_concurrent_trials=2, resources={"num_workers": 1})
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the store and runs (default: a temp dir)")
    parser.add_argument("--builtin", action="store_true", help="the built-in corpus, not tinyshakespeare")
    args = parser.parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="baselines-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = None if args.builtin or not SHAKESPEARE.is_file() else SHAKESPEARE
    spec = cpu_spec(out, corpus)
    path = out / "baselines-cpu.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))

    sys.path.insert(0, str(ROOT))
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import main as sweep

    tracking = f"sqlite:///{out / 'mlflow.db'}"
    code = sweep([str(path), "--tracking-uri", tracking])
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("baselines-cpu")
    results = {}
    for run in client.search_runs([experiment.experiment_id]):
        if "variant" in run.data.params:
            keep = ("val_ppl", "tokens_per_s", "memory_total_bytes", "memory_optimizer_bytes", "memory_grads_bytes")
            results[run.data.params["variant"]] = {k: run.data.metrics.get(k) for k in keep}
    (out / "baselines.json").write_text(json.dumps({"corpus": str(corpus or "builtin"), "trials": results}, indent=1))
    print(f"wrote {out / 'baselines.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
