"""How long one trial's end holds up Tune's event loop, and so every other trial's reports.

    python benchmarks/trial_end_blocking.py [--model llama-350m] [--work /tmp/relora-trial-end]

Tune runs its callbacks on the loop that also takes every trial's reports. This writes a merged
checkpoint as a trial's end does (`save_pretrained` of a randomly initialised model plus a
tokenizer), then, in a fresh process per implementation, drives the MLflow callback as Tune
does at a trial's end (its last result with the checkpoint, then `on_trial_complete`) on a
SQLite store, and times:
  - loop_blocked_s: the hooks' wall time, which is how long Tune's loop (every trial's next
    report) waits;
  - next_report_s: one report of another trial right after;
  - background_s: the time until the record is written (`flush`), which no trial waits on;
  - peak_rss_mb: the driver process's peak memory ("before" loaded the model there to log it
    as a `transformers` model; "after" uploads the files rank 0 saved, streamed).
Each row of VERSIONS is `orchestrator/tracking.py` as of a commit, read from git, or this
checkout's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (row, commit of orchestrator/tracking.py or None for this checkout, merged/ layout it reads)
VERSIONS = (
    ("on the loop", "d4bc3ec", "plain"),  # the last callback that logged on Tune's loop
    ("recorder thread, model loaded on the driver", "e1661ed", "plain"),
    ("recorder thread, rank 0 saves the model", None, "mlflow"),  # this checkout
)

DRIVER = r"""
import importlib.util, json, resource, sys, time
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
tracking_file, checkpoint, store = sys.argv[2], sys.argv[3], sys.argv[4]
spec = importlib.util.spec_from_file_location("tracking_under_test", tracking_file)
tracking = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tracking  # its dataclasses look themselves up there
spec.loader.exec_module(tracking)
tracker = tracking.SweepTracker(f"sqlite:///{store}/mlflow.db", experiment="bench", sweep_name="s")
callback = tracking.MlflowTuneCallback(tracker, lambda trial: {"relora": {"rank": 8}}, metric="val_ppl", mode="min")
ending, other = SimpleNamespace(trial_id="ending", error_msg=""), SimpleNamespace(trial_id="other", error_msg="")
for trial in (ending, other):
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"step": 10, "val_ppl": 50.0, "train_loss": 4.0})
callback.flush()
started = time.perf_counter()
callback.on_trial_result(0, [], ending, {"step": 20, "event": "done", "val_ppl": 40.0, "checkpoint_path": checkpoint})
callback.on_trial_complete(0, [], ending)
blocked = time.perf_counter() - started
started = time.perf_counter()
callback.on_trial_result(0, [], other, {"step": 20, "val_ppl": 45.0, "train_loss": 3.5})
next_report = time.perf_counter() - started
callback.flush()
background = time.perf_counter() - started
run = tracker.client.get_run(callback.run_ids["ending"])
assert run.data.tags.get("status") == "completed", run.data.tags
print(json.dumps({
    "loop_blocked_s": blocked,
    "next_report_s": next_report,
    "background_s": background,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "model_logged": "logged_model_id" in run.data.tags,
}))
"""


def write_checkpoint(folder: Path, model_name: str, layout: str) -> int:
    """A final checkpoint as `Worker.finish` writes it: history.jsonl and merged/ (model and
    tokenizer), in the ``layout`` of the callback under test: "plain" (a Hugging Face folder,
    as before) or "mlflow" (an MLflow `transformers` model saved by rank 0, as now)."""
    sys.path.insert(0, str(ROOT))
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    import relora
    from orchestrator.tracking import save_merged_model

    merged = folder / "merged"
    if not (merged / "config.json").is_file() and not (merged / "MLmodel").is_file():
        model = relora.build_model(model_name, vocab_size=32_000, max_position_embeddings=1024)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<|endoftext|>")
        if layout == "plain":
            model.save_pretrained(merged, safe_serialization=True)
            tokenizer.save_pretrained(merged)
        else:
            save_merged_model(model, tokenizer, merged)
    (folder / "history.jsonl").write_text(json.dumps({"step": 20, "val_ppl": 40.0}) + "\n")
    return sum(f.stat().st_size for f in merged.rglob("*") if f.is_file())


def measure(tracking_file: Path, checkpoint: Path) -> dict:
    with tempfile.TemporaryDirectory() as store:
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, str(ROOT), str(tracking_file), str(checkpoint), store],
            cwd=store,  # the store's artifacts (./mlruns) go with it
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-350m")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "relora-trial-end"))
    parser.add_argument("--write-checkpoint", nargs=2, metavar=("FOLDER", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_checkpoint:  # in a process of its own: a driver forked from one holding the model
        folder, layout = args.write_checkpoint  # would start with its memory in ru_maxrss
        print(write_checkpoint(Path(folder), args.model, layout))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, commit, layout in VERSIONS:
        tracking = ROOT / "orchestrator" / "tracking.py"
        if commit:
            tracking = work / f"tracking_{commit}.py"
            tracking.write_text(subprocess.run(["git", "show", f"{commit}:orchestrator/tracking.py"], cwd=ROOT,
                                               capture_output=True, text=True, check=True).stdout)  # fmt: skip
        checkpoint = work / f"checkpoint-{args.model}-{layout}"
        command = [sys.executable, __file__, "--model", args.model, "--write-checkpoint", str(checkpoint), layout]
        size = int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])
        print(f"merged checkpoint of {args.model} ({layout}): {size / 1e9:.2f} GB", flush=True)
        rows[name] = measure(tracking, checkpoint)
    print("| callback | loop blocked (s) | next report (s) | written after (s) | driver peak RSS (MB) | model logged |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, row in rows.items():
        print(
            f"| {name} | {row['loop_blocked_s']:.3f} | {row['next_report_s']:.4f} | "
            f"{row['background_s']:.1f} | {row['peak_rss_mb']:.0f} | {row['model_logged']} |"
        )


if __name__ == "__main__":
    main()
