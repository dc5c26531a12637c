#!/usr/bin/env bash
# The GPU path in one script, for a CUDA machine with this checkout installed without the CPU
# constraint (python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]'):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the relora unit tests, tests/relora/test_cuda.py among them (bf16 layer, exact merges, reset,
#    fused AdamW and SDPA on the device), and the orchestrator's collectives on NCCL
#    (tests/orchestrator/test_collectives.py: NCCL serves CUDA tensors only);
# 2. one llama-60m ReLoRA trial in bf16 on every visible GPU (ZeRO-2 over NCCL), 300 steps, two
#    restarts; its MFU per step is in the output and in runs/;
# 3. benchmarks/throughput.py, full-rank against LoRA and ReLoRA, plain and ZeRO-2, bf16, with MFU.
# Records what it printed in OUT_DIR (default gpu-check/); copy the figures, with the card's name,
# into benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
mkdir -p "$out"
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
[ "$gpus" -gt 0 ] || { echo "no CUDA device" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.csv"

python -m pytest -q -p no:cacheprovider tests/relora tests/orchestrator/test_collectives.py 2>&1 | tee "$out/unit-tests.txt"

python -m orchestrator.train benchmarks/gpu_trial.yaml --fresh --storage "$PWD/$out/runs" \
  --set scaling.num_workers="$gpus" --set train.global_batch_size=$((64 * gpus)) 2>&1 | tee "$out/trial.txt"
python - "$out" << 'PY' | tee "$out/trial-summary.txt"
import json, pathlib, sys
history = sorted(pathlib.Path(sys.argv[1], "runs").glob("gpu-check*/checkpoint_*/history.jsonl"))[-1]
rows = [json.loads(line) for line in history.read_text().splitlines()]
restarts = [r for r in rows if r.get("event") == "restart"]
mfu = [r["mfu"] for r in rows if "mfu" in r]
print("restarts at", [r["at_step"] for r in restarts], "lost share", [round(r["merge_lost_share"], 5) for r in restarts])
print("weights in sync", all(r["weights_in_sync"] for r in restarts), "final val ppl", rows[-1].get("final_val_ppl"))
print("tokens/s (last)", round(rows[-1].get("tokens_per_s") or rows[-2]["tokens_per_s"]), "MFU median", sorted(mfu)[len(mfu) // 2] if mfu else None)
PY

python benchmarks/throughput.py --model llama-130m --rank 96 --seq-len 512 --micro-batch 8 --steps 30 \
  --restart-every 15 --workers "$gpus" --bf16 2>&1 | tee "$out/throughput.txt"
