"""The end of a sweep: a summary table, plots on the parent run, the best model registered;
and the per-layer update ranks of a run as a table and a heatmap.

Each row puts a trial's cost beside its result: its mean training throughput and the memory
one of its workers held (parameters, gradients and optimizer state; on GPUs also the device's
peak) as its last engine measured it: a ReLoRA trial's low-rank phase, not its warm start.
So methods compare on all three.

Everything is read back from MLflow, so a resumed sweep reports on all its trials,
including those that finished before the interruption.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator.tracking import SWEEP_TAG, TRIAL_ID_TAG  # noqa: E402

# The cost columns: (MLflow metric, header, how a trial's values reduce to one).
COSTS = (
    ("tokens_per_s", "tokens/s", "mean"),
    ("memory_total_bytes", "memory/worker", "last"),
    ("memory_optimizer_bytes", "optimizer state", "last"),
    ("memory_device_peak_bytes", "device peak", "last"),
)


def trial_rows(
    client: MlflowClient, experiment_id: str, sweep_name: str, swept: list[str], metric: str, mode: str = "min"
) -> list[dict]:
    """One row per child run: trial id, swept values, status, best metric (by ``mode``) and its curve."""
    pick = min if mode == "min" else max
    runs = client.search_runs([experiment_id], filter_string=f"tags.{SWEEP_TAG} = '{sweep_name}'", max_results=10_000)
    rows = []
    for run in runs:
        if TRIAL_ID_TAG not in run.data.tags:
            continue
        curve = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        values = [v for _, v in curve if math.isfinite(v)]
        costs = {}
        for name, _, reduce in COSTS:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
            measured = [v for _, v in history if math.isfinite(v)]
            if measured:
                costs[name] = sum(measured) / len(measured) if reduce == "mean" else measured[-1]
        rows.append(
            {
                "trial": run.data.tags[TRIAL_ID_TAG],
                "run_id": run.info.run_id,
                "params": {p: run.data.params.get(p) for p in swept},
                "status": run.data.tags.get("status", "unknown"),
                "reason": run.data.tags.get("stop_reason", ""),
                "best": pick(values) if values else math.nan,
                "curve": curve,
                "costs": costs,
            }
        )
    return sorted(rows, key=lambda r: r["trial"])


def readable_bytes(count: float) -> str:
    """Decimal units, as nvidia-smi and MLflow's own sizes are read: 1.3 GB is 1.3e9 bytes."""
    for unit in ("B", "KB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def _cost_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """The cost columns some trial has a value for."""
    return [(name, header) for name, header, _ in COSTS if any(name in r.get("costs", {}) for r in rows)]


def _cost_cell(row: dict, name: str) -> str:
    value = row.get("costs", {}).get(name)
    if value is None:
        return "-"
    return f"{value:,.0f}" if name == "tokens_per_s" else readable_bytes(value)


def summary_table(rows: list[dict], swept: list[str], metric: str) -> str:
    costs = _cost_columns(rows)
    header = ["trial", *swept, f"best {metric}", *(h for _, h in costs), "status"]
    lines = [header]
    lines += [
        [
            r["trial"],
            *(str(r["params"][p]) for p in swept),
            f"{r['best']:.3f}",
            *(_cost_cell(r, name) for name, _ in costs),
            r["status"],
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _number(value: str | None) -> float | str | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def log_plots(client: MlflowClient, parent_id: str, rows: list[dict], swept: list[str], metric: str) -> list[str]:
    """Curves of all trials on one chart, and the best metric against each swept parameter."""
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in rows:
            if r["curve"]:
                steps, values = zip(*r["curve"], strict=True)
                label = ", ".join(f"{p.rsplit('.', 1)[-1]}={r['params'][p]}" for p in swept) or r["trial"]
                ax.plot(steps, values, marker="o", markersize=3, label=f"{label} ({r['status']})")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        if all(v > 0 for r in rows for _, v in r["curve"]):
            ax.set_yscale("log")
        ax.set_title(f"{metric} of every trial")
        ax.legend(fontsize=7)
        fig.tight_layout()
        names.append(f"{metric}_curves.png")
        fig.savefig(Path(tmp, names[-1]), dpi=120)
        plt.close(fig)
        for param in swept:
            fig, ax = plt.subplots(figsize=(6, 4))
            points = [(_number(r["params"][param]), r["best"], r["status"]) for r in rows if math.isfinite(r["best"])]
            for status, marker in (("completed", "o"), ("early-stopped", "x"), ("errored", "s")):
                chosen = [(x, y) for x, y, s in points if s == status]
                if chosen:
                    ax.scatter(*zip(*chosen, strict=True), marker=marker, label=status)
            ax.set_xlabel(param)
            ax.set_ylabel(f"best {metric}")
            if param.endswith("lr"):
                ax.set_xscale("log")
            ax.legend(fontsize=7)
            fig.tight_layout()
            names.append(f"{metric}_vs_{param}.png")
            fig.savefig(Path(tmp, names[-1]), dpi=120)
            plt.close(fig)
        client.log_artifacts(parent_id, tmp, "plots")
    return names


def log_summary(client: MlflowClient, parent_id: str, rows: list[dict], swept: list[str], metric: str, mode: str):
    """The sweep's result on its parent run: the table as `summary.txt` and `summary.csv`, and
    the best trial's metric (`best_<metric>`) and identity (tags `best_trial`, `best_run_id`)."""
    import csv
    import io

    client.log_text(parent_id, summary_table(rows, swept, metric) + "\n", "summary.txt")
    out = io.StringIO()
    writer = csv.writer(out)
    costs = [name for name, _ in _cost_columns(rows)]
    writer.writerow(["trial", "run_id", *swept, f"best_{metric}", *costs, "status", "stop_reason"])
    for r in rows:
        cells = [r.get("costs", {}).get(name, "") for name in costs]
        writer.writerow(
            [r["trial"], r["run_id"], *(r["params"][p] for p in swept), r["best"], *cells, r["status"], r["reason"]]
        )
    client.log_text(parent_id, out.getvalue(), "summary.csv")
    finished = [r for r in rows if math.isfinite(r["best"])]
    if finished:
        best = (min if mode == "min" else max)(finished, key=lambda r: r["best"])
        client.log_metric(parent_id, f"best_{metric}", best["best"])
        client.set_tag(parent_id, "best_trial", best["trial"])
        client.set_tag(parent_id, "best_run_id", best["run_id"])


def write_rank_artifacts(ranks: dict[int, dict[str, int]], folder: Path) -> list[Path]:
    """Per-layer update ranks (rank of W_now - W_start) at each restart: `update_ranks.csv`, one row
    per layer and one column per restart step, and `update_ranks.png`, the same as a heatmap."""
    steps = sorted(ranks)
    layers = sorted({layer for by_layer in ranks.values() for layer in by_layer})
    table = folder / "update_ranks.csv"
    lines = ["layer," + ",".join(f"step_{s}" for s in steps)]
    lines += [f"{layer}," + ",".join(str(ranks[s].get(layer, "")) for s in steps) for layer in layers]
    table.write_text("\n".join(lines) + "\n")
    values = [[ranks[s].get(layer, math.nan) for s in steps] for layer in layers]
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * len(steps), 1.2 + 0.22 * len(layers)))
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_yticks(range(len(layers)), [layer.removeprefix("model.") for layer in layers], fontsize=6)
    ax.set_xlabel("restart at step")
    ax.set_title("update rank per layer", fontsize=9)
    if len(steps) * len(layers) <= 400:
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if math.isfinite(value):
                    ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize=5, color="w")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    heatmap = folder / "update_ranks.png"
    fig.savefig(heatmap, dpi=120)
    plt.close(fig)
    return [table, heatmap]


@contextlib.contextmanager
def default_tracking_uri(uri: str):
    """The process's default MLflow tracking URI set to ``uri`` for a while, then put back
    (MLflow 3 also mirrors it into MLFLOW_TRACKING_URI)."""
    from mlflow.tracking._tracking_service import utils as tracking_state  # what set_tracking_uri sets

    before_uri, before_env = tracking_state._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before_uri)  # None: unset, as it was
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def register_best(client: MlflowClient, rows: list[dict], name: str, mode: str) -> tuple[dict, int] | None:
    """Register the best completed trial's merged model as a new version of ``name``: its logged
    MLflow model (checkpoints on a disk, uploaded once), or by reference the model in its
    checkpoint on object storage (`model_uri` tag). A trial recorded before models were
    saved in checkpoints is registered from its plain `merged/` folder."""
    from orchestrator.tracking import MODEL_URI_TAG

    completed = [r for r in rows if r["status"] == "completed" and math.isfinite(r["best"])]
    if not completed:
        return None
    best = (min if mode == "min" else max)(completed, key=lambda r: r["best"])
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description="The best merged ReLoRA checkpoint of a sweep")
    run = client.get_run(best["run_id"])
    model_id, model_uri = run.data.tags.get("logged_model_id"), run.data.tags.get(MODEL_URI_TAG)
    if model_id:
        # MLflow's SQL store looks a `models:/<id>` source up through the process's default
        # tracking URI, not this client's (its own TODO in `create_model_version`).
        with default_tracking_uri(client.tracking_uri):
            version = client.create_model_version(
                name, source=f"models:/{model_id}", run_id=best["run_id"], model_id=model_id
            )
    elif model_uri:
        version = client.create_model_version(name, source=model_uri, run_id=best["run_id"])
    else:
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}/merged", run_id=best["run_id"])
    return best, int(version.version)
