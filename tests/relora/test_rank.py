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
    """Fit y = x @ W*.T with a wrapped linear (scale alpha / rank = 2); return update_rank(W_T - W_0).

    At every restart, check what each part of it must do: the merge leaves the output as it
    was (the scale included), A is re-drawn and B zeroed, and 99% of the adapters' moments go."""
    torch.manual_seed(seed)
    dim = 32
    target = torch.randn(dim, dim)  # full rank: the low-rank path alone cannot reach it
    model = nn.Sequential(nn.Linear(dim, dim, bias=False))
    relora.wrap(model, rank=rank, alpha=2 * rank, target_modules=["0"])
    layer = model[0]
    start = relora.effective_weights(model)
    optimizer = torch.optim.Adam(relora.param_groups(model), lr=3e-2)
    probe = torch.randn(8, dim)
    for step in range(restarts * steps_per_cycle):
        if method == "relora" and step > 0 and step % steps_per_cycle == 0:
            with torch.no_grad():
                before, a_before = model(probe), layer.lora_A.clone()
            relora.restart(model, optimizer, reset_ratio=0.99)
            with torch.no_grad():
                torch.testing.assert_close(model(probe), before, rtol=1e-5, atol=1e-5)  # the scale is merged
            assert not torch.equal(layer.lora_A, a_before) and not layer.lora_B.any(), "A re-drawn, B zeroed"
            moments = [optimizer.state[p]["exp_avg"] for p in relora.adapter_parameters(model)]
            zeroed = sum(int((m == 0).sum()) for m in moments) / sum(m.numel() for m in moments)
            assert zeroed >= 0.98, "the adapters' moments are pruned"
        x = torch.randn(64, dim)
        loss = nn.functional.mse_loss(model(x), x @ target.T)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return max(relora.update_ranks(model, start).values())


def test_relora_escapes_the_adapter_rank_and_lora_does_not():
    assert _regression_run("relora") > 4
    assert _regression_run("lora") <= 4


def test_the_update_rank_threshold_is_absolute():
    # Largest singular value 10: a threshold relative to it (1.0) would count one, not two.
    assert relora.update_rank(torch.diag(torch.tensor([10.0, 0.5, 0.05])), threshold=0.1) == 2


def test_update_ranks_reports_every_wrapped_layer(tiny_llama):
    relora.wrap(tiny_llama, rank=2, alpha=2)
    start = relora.effective_weights(tiny_llama)
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.lora_B.normal_()
    ranks = relora.update_ranks(tiny_llama, start)
    assert len(ranks) == 14
    assert ranks["model.layers.0.mlp.up_proj"] == 2
    assert sum(ranks.values()) == 2
