"""Collectives on the backend's device, and host reads only when a worker reports.

Why these exist: on GPUs Ray Train's process group is NCCL alone, which serves CUDA tensors
only, and the worker once all-reduced CPU tensors (evaluation totals, the loss mean, the reset
share, the weight checksum): every GPU trial would have died at its first evaluation while CI,
on gloo (which serves CPU and CUDA), passed. A CPU machine has one device, so no run here can
put a tensor on the wrong one. What can be checked here, and is:
- no code in orchestrator/ or benchmarks/ calls a torch.distributed collective except through
  orchestrator/collectives.py, whose functions take the worker's device (read as source, and
  at run time by a real 2-rank DeepSpeed worker);
- the helper refuses a device its group has no backend for, with a message naming both: shown
  on a gloo group registered for CUDA only, which refuses CPU tensors exactly as NCCL does;
- a worker reads its loss back to the host only on the steps that report (a read per step
  would make the host wait for the GPU at every step).
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "orchestrator" / "collectives.py"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "gather",
    "gather_object", "scatter", "scatter_object_list", "barrier", "monitored_barrier", "send", "recv", "isend",
    "irecv", "batch_isend_irecv",
}  # fmt: skip


def direct_collectives(source: str) -> list[str]:
    """`module.function` of every torch.distributed collective called in ``source``, however imported."""
    tree = ast.parse(source)
    modules = {"torch.distributed"}  # names bound to the module
    functions: set[str] = set()  # collectives imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            modules |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            functions |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES and ast.unparse(func.value) in modules:
            found.append(f"{ast.unparse(func)} (line {node.lineno})")
        elif isinstance(func, ast.Name) and func.id in functions:
            found.append(f"{func.id} (line {node.lineno})")
    return found


def test_the_scan_finds_collectives_however_they_are_imported():
    source = """
import torch
import torch.distributed as dist
from torch import distributed as d2
from torch.distributed import all_gather_object as ago
dist.all_reduce(t); torch.distributed.barrier(); d2.broadcast(t, 0); ago(out, obj)
dist.get_rank(); other.all_reduce(t)
"""
    found = direct_collectives(source)
    assert [f.split(" ")[0] for f in found] == [
        "dist.all_reduce", "torch.distributed.barrier", "d2.broadcast", "ago"
    ], found  # fmt: skip


def test_every_collective_goes_through_the_device_helper():
    offenders = {
        str(path.relative_to(ROOT)): found
        for folder in ("orchestrator", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != HELPER and (found := direct_collectives(path.read_text()))
    }
    assert not offenders, f"collectives outside orchestrator/collectives.py (NCCL: the worker's device): {offenders}"
    assert direct_collectives(HELPER.read_text()), "the helper itself must hold the collectives"


# --- the helper, on real gloo groups -------------------------------------------------------


def _helper_ranks(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from orchestrator import collectives

    cpu = torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    result = {
        "sum": collectives.sum_across_ranks([rank + 1.0, 10.0], cpu).tolist(),
        "sum_of_tensor": collectives.sum_across_ranks(torch.tensor([rank], dtype=torch.int32), cpu).tolist(),
        "gathered": collectives.gather_across_ranks(torch.tensor([rank, -rank]), cpu).tolist(),
        "objects": collectives.gather_objects({"rank": rank}, cpu),
    }
    collectives.barrier(cpu)
    dist.destroy_process_group()
    # A backend for CUDA tensors only, like NCCL: CPU tensors are refused.
    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{port + 1}", rank=rank, world_size=world_size)
    for name, call in {
        "torch": lambda: dist.all_reduce(torch.ones(1)),
        "helper": lambda: collectives.sum_across_ranks([1.0], cpu),
    }.items():
        try:
            call()
            result[name] = None
        except RuntimeError as error:
            result[name] = str(error)
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_the_helper_runs_collectives_on_the_given_device_and_refuses_one_the_backend_does_not_serve(tmp_path):
    # Imported here, not at the top: the spawned ranks import this module, and in a whole-suite
    # run the `conftest` first on their sys.path is tests/conftest.py, which has none of these.
    from conftest import free_port

    port = free_port()
    mp.spawn(_helper_ranks, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["sum"] == [3.0, 20.0] and result["sum_of_tensor"] == [1.0]
        assert result["gathered"] == [[0, 0], [1, -1]]
        assert result["objects"] == [{"rank": 0}, {"rank": 1}]
        # The failure every GPU trial would have hit, and the helper's clearer word for it.
        assert "No backend type associated with device type cpu" in result["torch"]
        assert "serves ['cuda'] tensors, not cpu" in result["helper"] and "cuda:gloo" in result["helper"]


# --- a real worker, audited -----------------------------------------------------------------


def _audited_worker(rank: int, world_size: int, port: int, trial: dict, out: str) -> None:
    """Run a real Worker (DeepSpeed ZeRO-2, gloo) and record, in order: each step's start, each
    report, each read of a tensor to the host by orchestrator code, and each collective with
    the file that called it and its tensors' devices."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import shutil

    import pyarrow.fs
    import torch.distributed as dist

    from orchestrator.collectives import init_deepspeed_comm
    from orchestrator.config import config_from_dict
    from orchestrator.data import cached_data
    from orchestrator.worker import Worker

    init_deepspeed_comm()
    orchestrator = str(ROOT / "orchestrator")
    log: list = []

    def caller(depth: int) -> str:
        frame = sys._getframe(depth)
        while frame and "/torch/" in frame.f_code.co_filename:  # past torch's own wrappers
            frame = frame.f_back
        return frame.f_code.co_filename if frame else ""

    def audit_collective(name, original):
        def call(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            log.append(["collective", name, caller(2), sorted({t.device.type for t in tensors})])
            return original(*args, **kwargs)

        return call

    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier"):
        setattr(dist, name, audit_collective(name, getattr(dist, name)))

    def audit_read(name, original):
        def read(self, *args, **kwargs):
            where = sys._getframe(1)
            if where.f_code.co_filename.startswith(orchestrator):
                log.append(["read", name, where.f_code.co_name])
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
        setattr(torch.Tensor, name, audit_read(name, getattr(torch.Tensor, name)))

    cfg = config_from_dict(trial)
    data = cached_data(cfg.data, None, 0)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        log.append(["report", metrics["step"]])
        if checkpoint_dir:  # the report function owns the folder
            shutil.rmtree(checkpoint_dir)

    run_storage = (pyarrow.fs.LocalFileSystem(), str(Path(out, "run")))
    worker = Worker(cfg, data, report, device=torch.device("cpu"), run_storage=run_storage)
    advance = worker.advance

    def audited_advance(end: int) -> bool:
        log.append(["step", worker.step + 1])  # its event (switch, restart) comes first
        return advance(end)

    worker.advance = audited_advance
    worker.run(None)
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"log": log}))


def test_a_worker_runs_every_collective_through_the_helper_and_reads_the_device_only_when_it_reports(
    data_cache, tmp_path
):
    from conftest import free_port, trial_dict

    trial = trial_dict(tmp_path, data_cache)
    trial["relora"].update(warm_start_steps=4, restart_every=4, restart_warmup_steps=2)
    trial["optim"]["warmup_steps"] = 2
    trial["train"].update(total_steps=12, eval_every=6, checkpoint_every=6, log_every=3, eval_blocks=8)
    mp.spawn(_audited_worker, args=(2, free_port(), trial, str(tmp_path)), nprocs=2, join=True)

    for rank in range(2):
        log = json.loads((tmp_path / f"rank{rank}.json").read_text())["log"]
        ours = [entry for entry in log if entry[0] == "collective" and entry[2].startswith(str(ROOT / "orchestrator"))]
        assert ours, "the audit saw none of the worker's collectives"
        assert {entry[2] for entry in ours} == {str(HELPER)}, ours
        assert all(entry[3] in ([], ["cpu"]) for entry in ours), ours  # the worker's device
        # Split the log at each step: a step that reads the device must report.
        steps: dict[int, list] = {}
        for entry in log:
            if entry[0] == "step":
                steps[entry[1]] = []
            elif steps:
                steps[max(steps)].append(entry)
        assert sorted(steps) == list(range(1, 13))
        silent = {step for step, entries in steps.items() if not any(e[0] == "report" for e in entries)}
        assert silent == {1, 2, 4, 7, 8, 10, 11}, silent  # log every 3, switch at 4 and restart at 8 report the next
        reads = {step: [e for e in steps[step] if e[0] == "read"] for step in silent}
        assert not any(reads.values()), f"steps that waited for the device without reporting: {reads}"


def _nccl_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from orchestrator import collectives

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    result = {
        "sum": collectives.sum_across_ranks([1.5, 2.0], device).tolist(),
        "gathered": collectives.gather_across_ranks(torch.arange(3, device=device), device).tolist(),
        "objects": collectives.gather_objects("node", device),
    }
    collectives.barrier(device)
    try:
        collectives.sum_across_ranks([1.0], torch.device("cpu"))
    except RuntimeError as error:
        result["cpu"] = str(error)
    dist.destroy_process_group()
    Path(out, "nccl.json").write_text(json.dumps(result))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh runs it)")
def test_the_helper_runs_on_nccl(tmp_path):
    from conftest import free_port

    mp.spawn(_nccl_rank, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    result = json.loads((tmp_path / "nccl.json").read_text())
    assert result["sum"] == [1.5, 2.0] and result["gathered"] == [[0, 1, 2]] and result["objects"] == ["node"]
    assert "not cpu" in result["cpu"]


# --- DeepSpeed's process group on CPUs ------------------------------------------------------


def _deepspeed_rank(rank: int, port: int, extensions: str, out: str) -> None:
    """A ZeRO-2 engine's first step on CPU, with torch's JIT extension cache pointed at ``extensions``."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=extensions)
    import deepspeed
    import deepspeed.comm.comm

    import relora
    from orchestrator.collectives import init_deepspeed_comm

    init_deepspeed_comm()
    model = relora.build_model("llama-tiny", vocab_size=256, max_position_embeddings=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(0, 256, (2, 16))
    engine.backward(model(input_ids=ids, labels=ids).loss)
    engine.step()
    Path(out).write_text(json.dumps({"shm_op": deepspeed.comm.comm.cdb.shm_comm_op is not None}))


def test_deepspeed_on_cpu_compiles_no_op_before_the_first_step(tmp_path):
    """DeepSpeed's CPU shared-memory all-reduce op serves tensor-parallel inference only, and its
    JIT build cost each fresh machine 35-50 s before a trial's first step: it is switched off."""
    from conftest import free_port

    extensions, out = tmp_path / "torch_extensions", tmp_path / "rank0.json"
    mp.spawn(_deepspeed_rank, args=(free_port(), str(extensions), str(out)), nprocs=1, join=True)
    assert json.loads(out.read_text()) == {"shm_op": False}
    assert not extensions.exists() or not any(extensions.rglob("*.so")), sorted(extensions.rglob("*"))
