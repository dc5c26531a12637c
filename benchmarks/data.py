"""Data preparation at scale: Ray Data against the old single-process path, driver memory flat.

    python benchmarks/data.py --sizes-mb 500 2000 --reference-mb 500 [--work /tmp/relora-data-bench]
    python benchmarks/data.py --sizes-mb 200 --two-nodes      # where the tasks ran, on a 2-node local cluster

It writes a corpus of the requested size from the built-in one (CPython's docs and
docstrings, each document stamped with its copy number so that no two are equal), as
64 MB `.txt` shards, never committed. Each preparation runs in a fresh driver process,
which reports its wall time, the tokens it wrote and its own peak RSS (`ru_maxrss`: the
driver only; Ray's workers are other processes). The reference is `prepare_data` as it
was before Ray Data (commit REFERENCE_COMMIT), which tokenizes and packs in the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_COMMIT = "8791b08"  # the last commit whose prepare_data ran in the driver alone
SHARD_BYTES = 64 << 20


def write_corpus(folder: Path, size_mb: int) -> list[str]:
    """``size_mb`` MB of distinct documents as .txt shards (blank lines separate documents)."""
    sys.path.insert(0, str(ROOT))
    from orchestrator.data import builtin_documents

    folder.mkdir(parents=True, exist_ok=True)
    paths = sorted(str(p) for p in folder.glob("*.txt"))
    if paths and sum(Path(p).stat().st_size for p in paths) >= size_mb << 20:
        return paths
    documents = [d.replace("\n\n", "\n") for d in builtin_documents()]
    written, copy, shard, out = 0, 0, 0, None
    while written < size_mb << 20:
        for document in documents:
            if out is None or out.tell() >= SHARD_BYTES:
                if out:
                    out.close()
                out = open(folder / f"shard-{shard:04}.txt", "w")
                shard += 1
            text = f"[copy {copy}] {document}\n\n"
            out.write(text)
            written += len(text)
        copy += 1
    out.close()
    return sorted(str(p) for p in folder.glob("*.txt"))


DRIVER = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import ray
from orchestrator.config import DataConfig
mode, paths, cache, address = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
cfg = DataConfig(source="file", paths=paths, seq_len=512, vocab_size=8192, cache_dir=cache)
started = time.perf_counter()
if mode == "reference":
    from reference_data import prepare_data
    prepared = prepare_data(cfg)
else:
    ray.init(address=address or None, include_dashboard=False)
    from orchestrator.data import prepare_data
    prepared = prepare_data(cfg)
seconds = time.perf_counter() - started
nodes, detail = [], {}
if mode == "ray" and address:
    from ray.util.state import list_actors, list_tasks
    # Finished ones too: they keep their node. Read tasks and the ShardWriter actors.
    actors = [a.node_id for a in list_actors(limit=10000) if "ShardWriter" in a.class_name]
    tasks = [t.node_id for t in list_tasks(limit=10000) if "Read" in t.name or "ShardWriter" in t.name]
    actors, tasks = [n for n in actors if n], [n for n in tasks if n]  # None: never scheduled
    nodes = sorted(set(actors) | set(tasks))
    detail = {"writer_nodes": len(set(actors)), "read_task_nodes": len(set(tasks))}
else:
    detail = {}
print(json.dumps({"seconds": seconds, "train_blocks": prepared.train_blocks,
                  "validation_blocks": prepared.validation_blocks,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "nodes": nodes,
                  **detail}))
"""


def run_driver(mode: str, paths: list[str], work: Path, address: str = "") -> dict:
    cache = tempfile.mkdtemp(dir=work, prefix=f"cache-{mode}-")
    env_path = str(work)  # reference_data.py lives there
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ROOT), mode, json.dumps(paths), cache, address],
        cwd=env_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{env_path}:{ROOT}"},
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-4000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["tokens"] = (result["train_blocks"] + result["validation_blocks"]) * 512
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def two_node_cluster(work: Path) -> tuple[str, list]:
    """A head and a worker node on this machine, as the cluster tests start them."""
    head = [
        "ray",
        "start",
        "--head",
        "--port=6390",
        "--num-cpus=1",
        "--include-dashboard=true",  # the state API, to list where the tasks ran
        "--dashboard-port=8275",
        f"--temp-dir={work}/ray-head",
        "--disable-usage-stats",
    ]
    # As the cluster tests: no token auth between nodes on one machine, a temp dir per node.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    subprocess.run(head, check=True, capture_output=True)
    worker = ["ray", "start", "--address=127.0.0.1:6390", "--num-cpus=2", "--disable-usage-stats"]
    subprocess.run([*worker, f"--temp-dir={work}/ray-worker"], check=True, capture_output=True)
    return "127.0.0.1:6390", [["ray", "stop", "--force"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--reference-mb", type=int, default=0, help="also run the old path on this size")
    parser.add_argument("--two-nodes", action="store_true", help="prepare on a local 2-node cluster")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "relora-data-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    reference = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{REFERENCE_COMMIT}:orchestrator/data.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (args.work / "reference_data.py").write_text(reference)

    address, cleanup = two_node_cluster(args.work) if args.two_nodes else ("", [])
    rows = []
    try:
        for size in args.sizes_mb:
            paths = write_corpus(args.work / f"corpus-{size}mb", size)
            rows.append(
                {
                    "path": "Ray Data" + (" (2 nodes)" if address else ""),
                    "size_mb": size,
                    **run_driver("ray", paths, args.work, address),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        if args.reference_mb:
            paths = write_corpus(args.work / f"corpus-{args.reference_mb}mb", args.reference_mb)
            rows.append(
                {
                    "path": "single process (reference)",
                    "size_mb": args.reference_mb,
                    **run_driver("reference", paths, args.work),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for command in cleanup:
            subprocess.run(command, capture_output=True)
    print("\n| path | corpus | seconds | tokens | tokens/s | driver peak RSS | nodes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['path']} | {r['size_mb']} MB | {r['seconds']:.0f} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} "
            f"| {r['peak_rss_mb']:.0f} MB | {len(r['nodes']) or '-'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
