import pytest
import torch
from torch import nn

import relora


def _trained_optimizer(model, batch, steps=3):
    optimizer = torch.optim.AdamW(relora.param_groups(model), lr=1e-3)
    for _ in range(steps):
        logits = model(batch[:, :-1]).logits
        nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.fixture
def wrapped(tiny_llama, token_batch):
    relora.wrap(tiny_llama, rank=8, alpha=16)
    return tiny_llama, _trained_optimizer(tiny_llama, token_batch)


def _snapshot(optimizer, params):
    return {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_zeroed_fraction_matches_ratio(wrapped, method, ratio):
    model, optimizer = wrapped
    adapters = relora.adapter_parameters(model)
    fraction = relora.reset_optimizer_state(optimizer, adapters, ratio=ratio, method=method)
    zeros = sum(int((optimizer.state[p][k] == 0).sum()) for p in adapters for k in ("exp_avg", "exp_avg_sq"))
    total = sum(optimizer.state[p][k].numel() for p in adapters for k in ("exp_avg", "exp_avg_sq"))
    assert abs(zeros / total - ratio) <= 0.02
    assert fraction == pytest.approx(zeros / total)


def test_magnitude_pruning_removes_the_smallest_entries(wrapped):
    model, optimizer = wrapped
    param = relora.adapter_parameters(model)[1]  # a lora_B
    before = optimizer.state[param]["exp_avg"].clone()
    relora.reset_optimizer_state(optimizer, [param], ratio=0.5, method="magnitude")
    after = optimizer.state[param]["exp_avg"]
    pruned = (after == 0) & (before != 0)
    assert before[pruned].abs().max() <= before[after != 0].abs().min()
    assert torch.equal(after[after != 0], before[after != 0]), "kept entries must not change"


def test_other_state_is_bit_identical(wrapped):
    model, optimizer = wrapped
    adapters = relora.adapter_parameters(model)
    adapter_ids = {id(p) for p in adapters}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    before = _snapshot(optimizer, others)
    steps_before = {id(p): optimizer.state[p]["step"].clone() for p in adapters}
    relora.reset_optimizer_state(optimizer, adapters, ratio=1.0)
    after = _snapshot(optimizer, others)
    for pid, state in before.items():
        for key, value in state.items():
            assert torch.equal(after[pid][key], value), key
    for p in adapters:
        assert torch.all(optimizer.state[p]["exp_avg"] == 0) and torch.all(optimizer.state[p]["exp_avg_sq"] == 0)
        assert torch.equal(optimizer.state[p]["step"], steps_before[id(p)])


def test_param_groups_isolate_the_adapters(tiny_llama):
    relora.wrap(tiny_llama, rank=4, alpha=8)
    groups = relora.param_groups(tiny_llama, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["adapters"]["params"]} == {id(p) for p in relora.adapter_parameters(tiny_llama)}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["adapters"]["weight_decay"] == 0.0
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in tiny_llama.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"ratio": 1.5}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": 0.5, "method": "topk"}, "method")],
)
def test_bad_arguments(wrapped, kwargs, name):
    model, optimizer = wrapped
    with pytest.raises(ValueError, match=name):
        relora.reset_optimizer_state(optimizer, relora.adapter_parameters(model), **kwargs)


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_both_moments_are_pruned_at_the_same_entries(wrapped, method):
    # A surviving exp_avg over a zeroed exp_avg_sq makes Adam take a huge step.
    model, optimizer = wrapped
    adapters = relora.adapter_parameters(model)
    relora.reset_optimizer_state(optimizer, adapters, ratio=0.9, method=method)
    for p in adapters:
        m, v = optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]
        assert torch.equal(m == 0, v == 0)


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_a_reset_on_bf16_moments(tiny_llama, token_batch, method):
    relora.wrap(tiny_llama.to(torch.bfloat16), rank=8, alpha=16)
    optimizer = _trained_optimizer(tiny_llama, token_batch)
    adapters = relora.adapter_parameters(tiny_llama)
    assert optimizer.state[adapters[0]]["exp_avg"].dtype == torch.bfloat16
    fraction = relora.reset_optimizer_state(optimizer, adapters, ratio=0.9, method=method)
    assert fraction == pytest.approx(0.9, abs=0.02)
    for p in adapters:
        state = optimizer.state[p]
        assert torch.equal(state["exp_avg"] == 0, state["exp_avg_sq"] == 0), "one mask for both moments"
