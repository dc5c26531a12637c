"""reset_optimizer_state on real DeepSpeed ZeRO engines: 2 ranks on the CPU over gloo."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import relora

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat_partitions(zero_optimizer):
    """(params, flat fp32 partition) per group, read straight from DeepSpeed's attributes."""
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):
        return list(zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups, strict=True))
    return list(zip(zero_optimizer.fp16_groups, zero_optimizer.fp32_partitioned_groups_flat, strict=True))


def _worker(rank: int, world_size: int, stage: int, ratio: float, method: str, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size)
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = relora.wrap(relora.build_model("llama-tiny", vocab_size=256, max_position_embeddings=32), rank=4, alpha=8)
    optimizer = torch.optim.AdamW(relora.param_groups(model), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
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
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


@pytest.mark.parametrize(
    ("stage", "ratio", "method"),
    [(2, 0.9, "magnitude"), (2, 0.5, "random"), (1, 0.99, "magnitude"), (3, 0.9, "magnitude")],
)
def test_reset_on_zero_partitions(tmp_path, monkeypatch, stage, ratio, method):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    mp.spawn(_worker, args=(2, stage, ratio, method, str(tmp_path)), nprocs=2, join=True)

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["adapter_groups"] >= 1 and report["other_groups"] >= 1
        assert report["zero_before"] / report["numel"] < 0.05, "the adapters' moments should be live before the reset"
        assert abs(report["zero_after"] / report["numel"] - ratio) <= 0.02
        assert report["returned"] == pytest.approx(report["zero_after"] / report["numel"])
        assert report["others_identical"], "a reset must not touch the other groups' moments"
    total = sum(r["zero_after"] for r in reports) / sum(r["numel"] for r in reports)
    assert abs(total - ratio) <= 0.02
