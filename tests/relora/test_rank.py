import pytest
import torch
from torch import nn

import relora


def test_update_rank_counts_singular_values_above_threshold():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(40, 5, generator=g) @ torch.randn(5, 30, generator=g)
    assert relora.update_rank(delta) == 5
    assert relora.update_rank(torch.zeros(8, 8)) == 0
    assert relora.update_rank(torch.diag(torch.tensor([1.0, 0.5, 0.05]))) == 2
    assert relora.update_rank(torch.diag(torch.tensor([1.0, 0.5, 0.05])), threshold=0.01) == 3
    with pytest.raises(ValueError, match="delta"):
        relora.update_rank(torch.zeros(3))


def _regression_run(method: str, *, rank=4, restarts=5, steps_per_cycle=150, seed=0) -> int:
    """Fit y = x @ W*.T with a wrapped linear; return update_rank(W_T - W_0)."""
    torch.manual_seed(seed)
    dim = 32
    target = torch.randn(dim, dim)  # full rank: the low-rank path alone cannot reach it
    model = nn.Sequential(nn.Linear(dim, dim, bias=False))
    relora.wrap(model, rank=rank, alpha=rank, target_modules=["0"])
    start = relora.effective_weights(model)
    optimizer = torch.optim.Adam(relora.param_groups(model), lr=3e-2)
    for step in range(restarts * steps_per_cycle):
        if method == "relora" and step > 0 and step % steps_per_cycle == 0:
            relora.merge_and_reinit(model)
            relora.reset_optimizer_state(optimizer, relora.adapter_parameters(model), ratio=0.99)
        x = torch.randn(64, dim)
        loss = nn.functional.mse_loss(model(x), x @ target.T)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return max(relora.update_ranks(model, start).values())


def test_relora_escapes_the_adapter_rank_and_lora_does_not():
    assert _regression_run("relora") > 4
    assert _regression_run("lora") <= 4


def test_update_ranks_reports_every_wrapped_layer(tiny_llama):
    relora.wrap(tiny_llama, rank=2, alpha=2)
    start = relora.effective_weights(tiny_llama)
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.lora_B.normal_()
    ranks = relora.update_ranks(tiny_llama, start)
    assert len(ranks) == 14
    assert ranks["model.layers.0.mlp.up_proj"] == 2
    assert sum(ranks.values()) == 2
