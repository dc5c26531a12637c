"""reset_optimizer_state on real DeepSpeed ZeRO engines: 2 ranks on the CPU over gloo."""

import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

import relora
from relora.restarts import fastest_adamw

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leave() -> None:
    """End a rank once its report is written. CI saw 3 ranks of ZeRO-3 cases die of SIGABRT at
    the end (never here, alone or under load): gloo aborts a process whose group is still open
    when a peer's sockets close, and a rank's teardown (destroy_process_group, then the
    interpreter's) is such a window. So the ranks pass a barrier and exit at once, all teardown
    skipped: nothing after the report is under test."""
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _flat_partitions(zero_optimizer):
    """(params, flat fp32 partition) per group, read straight from DeepSpeed's attributes."""
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):
        return list(zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups, strict=True))
    return list(zip(zero_optimizer.fp16_groups, zero_optimizer.fp32_partitioned_groups_flat, strict=True))


def _tiny_zero_engine(rank: int, world_size: int, stage: int, lr: float):
    """llama-tiny with rank-4 adapters under a real DeepSpeed ZeRO engine, on this rank of a gloo group."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size)
    )
    import deepspeed

    from orchestrator.collectives import init_deepspeed_comm

    init_deepspeed_comm()
    torch.manual_seed(0)
    model = relora.wrap(relora.build_model("llama-tiny", vocab_size=256, max_position_embeddings=32), rank=4, alpha=8)
    groups = relora.param_groups(model)
    optimizer = torch.optim.AdamW(groups, lr=lr, **fastest_adamw(groups))  # fused, as the trials run it
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return model, engine, zero_optimizer


# (ZeRO stage, reset ratio, reset method): each case a fresh engine, all in one pair of ranks.
RESET_CASES = [(2, 0.9, "magnitude"), (2, 0.5, "random"), (1, 0.99, "magnitude"), (3, 0.9, "magnitude")]


def _reset_case(rank: int, world_size: int, stage: int, ratio: float, method: str) -> dict:
    model, engine, zero_optimizer = _tiny_zero_engine(rank, world_size, stage, lr=1e-3)
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        ids = torch.randint(0, 256, (2, 16), generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    adapter_ids = {id(p) for p in relora.adapter_parameters(model)}
    partitions = _flat_partitions(zero_optimizer)
    state = zero_optimizer.optimizer.state
    before = [{k: state[flat][k].clone() for k in ("exp_avg", "exp_avg_sq")} for _, flat in partitions]
    returned = relora.reset_optimizer_state(
        zero_optimizer, relora.adapter_parameters(model), ratio=ratio, method=method
    )

    report = {
        "returned": returned,
        "adapter_groups": 0,
        "zero_before": 0,
        "zero_after": 0,
        "numel": 0,
        "other_groups": 0,
        "others_identical": True,
    }
    for (params, flat), saved in zip(partitions, before, strict=True):
        if {id(p) for p in params} <= adapter_ids:
            report["adapter_groups"] += 1
            for key in ("exp_avg", "exp_avg_sq"):
                report["zero_before"] += int((saved[key] == 0).sum())
                report["zero_after"] += int((state[flat][key] == 0).sum())
                report["numel"] += state[flat][key].numel()
        else:
            report["other_groups"] += 1
            report["others_identical"] &= all(torch.equal(state[flat][k], saved[k]) for k in saved)
    # The partitioned state must still drive a normal step.
    ids = torch.randint(0, 256, (2, 16), generator=generator)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.destroy()
    return report


def _reset_worker(rank: int, world_size: int, out_dir: str) -> None:
    reports = [_reset_case(rank, world_size, *case) for case in RESET_CASES]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(reports, f)
    _leave()


@pytest.fixture(scope="module")
def reset_reports(tmp_path_factory) -> list[list[dict]]:
    """Every reset case on one pair of ranks (a pair per case spent most of its time starting
    Python and DeepSpeed): per case, each rank's report."""
    out = tmp_path_factory.mktemp("resets")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DS_ACCELERATOR", "cpu")
        env.setenv("MASTER_ADDR", "127.0.0.1")
        env.setenv("MASTER_PORT", str(_free_port()))
        mp.spawn(_reset_worker, args=(2, str(out)), nprocs=2, join=True)
    by_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return [list(reports) for reports in zip(*by_rank, strict=True)]


@pytest.mark.parametrize(("stage", "ratio", "method"), RESET_CASES)
def test_reset_on_zero_partitions(reset_reports, stage, ratio, method):
    reports = reset_reports[RESET_CASES.index((stage, ratio, method))]
    for report in reports:
        assert report["adapter_groups"] >= 1 and report["other_groups"] >= 1
        assert report["zero_before"] / report["numel"] < 0.05, "the adapters' moments should be live before the reset"
        assert abs(report["zero_after"] / report["numel"] - ratio) <= 0.02
        assert report["returned"] == pytest.approx(report["zero_after"] / report["numel"])
        assert report["others_identical"], "a reset must not touch the other groups' moments"
    total = sum(r["zero_after"] for r in reports) / sum(r["numel"] for r in reports)
    assert abs(total - ratio) <= 0.02


def _restart_worker(rank: int, world_size: int, sync: bool, out_dir: str) -> None:
    """Train, restart, then take one more step at LR 0: the adapters must be what the restart drew."""
    model, engine, _ = _tiny_zero_engine(rank, world_size, stage=2, lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)

    def step() -> None:
        ids = torch.randint(0, 256, (2, 16), generator=data)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    for _ in range(STEPS):
        step()
    generator = torch.Generator().manual_seed(7)  # alike on every rank
    if sync:
        result = relora.restart(model, engine, reset_ratio=0.99, generator=generator)
        assert result.synced_fp32_masters and result.merged_layers == 14
    else:  # the trap: merge and re-init the model alone, leaving DeepSpeed's fp32 masters as they were
        with torch.no_grad():
            relora.merge_and_reinit(model, generator=generator)
    drawn = [p.detach().clone() for p in relora.adapter_parameters(model)]
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0  # the jagged schedule's LR at a restart: the step itself changes nothing
    step()
    after = relora.adapter_parameters(model)
    report = {
        "kept": all(torch.equal(a, d) for a, d in zip(after, drawn, strict=True)),
        "b_zero": all(float(p.abs().max()) == 0.0 for n, p in model.named_parameters() if n.endswith("lora_B")),
        "checksum": sum(float(p.detach().double().abs().sum()) for p in model.parameters()),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    _leave()


@pytest.mark.parametrize("sync", [True, False])
def test_reinitialised_adapters_survive_the_next_zero2_step(tmp_path, monkeypatch, sync):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    mp.spawn(_restart_worker, args=(2, sync, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    if sync:  # relora.restart: the new adapters are what trains next, identically on both ranks
        assert all(r["kept"] and r["b_zero"] for r in reports)
        assert reports[0]["checksum"] == reports[1]["checksum"]
    else:  # without the fp32-master sync, DeepSpeed's step writes the old adapters back
        assert not any(r["kept"] or r["b_zero"] for r in reports)


def _pruned_entries_worker(rank: int, world_size: int, stage: int, method: str, out_dir: str) -> None:
    """Give every adapter the same moments whatever the world size (DeepSpeed's own full-state
    setters), reset, and record which entries of each tensor were zeroed."""
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    model, engine, zero_optimizer = _tiny_zero_engine(rank, world_size, stage, lr=1e-3)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()  # the optimizer now has state
    if stage < 3:  # DeepSpeed links each tensor to its state after the first group's step, when the
        # later groups have none yet (0.19.8): link again, so that its full-state getters and setters work.
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    adapters = relora.adapter_parameters(model)
    for i, p in enumerate(adapters):
        values = torch.randn(p.ds_shape if stage == 3 else p.shape, generator=torch.Generator().manual_seed(i))
        safe_set_full_optimizer_state(p, values, "exp_avg")
        safe_set_full_optimizer_state(p, values.abs() + 1.0, "exp_avg_sq")
    relora.reset_optimizer_state(
        zero_optimizer, adapters, ratio=0.9, method=method, generator=torch.Generator().manual_seed(5)
    )
    report = []
    for p in adapters:
        exp_avg = safe_get_full_optimizer_state(p, "exp_avg").flatten()
        exp_avg_sq = safe_get_full_optimizer_state(p, "exp_avg_sq").flatten()
        report.append(
            {
                "zeroed": (exp_avg == 0).nonzero().flatten().tolist(),
                "same": bool(torch.equal(exp_avg == 0, exp_avg_sq == 0)),
            }
        )
    if rank == 0:
        with open(os.path.join(out_dir, f"world{world_size}.json"), "w") as f:
            json.dump(report, f)
    _leave()


@pytest.mark.parametrize(
    ("stage", "method", "world_sizes"), [(2, "magnitude", (1, 2, 4)), (1, "random", (1, 2)), (3, "magnitude", (1, 2))]
)
def test_the_pruned_entries_do_not_depend_on_the_number_of_workers(tmp_path, monkeypatch, stage, method, world_sizes):
    """Per tensor, 90% of each adapter's moment entries, the same ones with 1, 2 and 4 workers
    (with 4 ranks, layer 0's gate_proj B spans two ranks' partitions of the adapter group)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    reports = {}
    for world_size in world_sizes:
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        mp.spawn(_pruned_entries_worker, args=(world_size, stage, method, str(tmp_path)), nprocs=world_size, join=True)
        reports[world_size] = json.loads((tmp_path / f"world{world_size}.json").read_text())
    shapes = [
        p.numel()
        for p in relora.adapter_parameters(
            relora.wrap(relora.build_model("llama-tiny", vocab_size=256, max_position_embeddings=32), rank=4, alpha=8)
        )
    ]
    for tensor, numel in enumerate(shapes):
        assert len(reports[1][tensor]["zeroed"]) == round(0.9 * numel), "ratio of each tensor, not of a pool"
        assert all(reports[w][tensor]["same"] for w in reports), "one mask for both moments"
        assert all(reports[w][tensor]["zeroed"] == reports[1][tensor]["zeroed"] for w in world_sizes)
