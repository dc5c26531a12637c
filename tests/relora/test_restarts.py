"""relora.restart and relora.make_optimizer in a plain PyTorch loop (DeepSpeed: test_zero.py)."""

import pytest
import torch

import relora


def _trained(tiny_llama, token_batch, steps: int = 3):
    relora.wrap(tiny_llama, rank=4, alpha=8)
    cfg = relora.ReLoRAConfig(rank=4, alpha=8, restart_every=10, restart_warmup_steps=2)
    optimizer, scheduler = relora.make_optimizer(tiny_llama, cfg, lr=1e-2, total_steps=40, warmup_steps=2)
    for _ in range(steps):
        tiny_llama(input_ids=token_batch, labels=token_batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return optimizer, scheduler


def test_a_restart_merges_redraws_and_prunes_without_changing_the_output(tiny_llama, token_batch):
    optimizer, _ = _trained(tiny_llama, token_batch)
    with torch.no_grad():
        before = tiny_llama(input_ids=token_batch).logits
    a_before = [p.clone() for n, p in tiny_llama.named_parameters() if n.endswith("lora_A")]
    result = relora.restart(tiny_llama, optimizer, reset_ratio=0.9, generator=torch.Generator().manual_seed(1))
    assert result.merged_layers == 14 and not result.synced_fp32_masters
    assert result.reset_fraction == pytest.approx(0.9, abs=0.01)
    with torch.no_grad():
        assert torch.allclose(tiny_llama(input_ids=token_batch).logits, before, atol=1e-5)
    a_after = [p for n, p in tiny_llama.named_parameters() if n.endswith("lora_A")]
    assert not any(torch.equal(a, b) for a, b in zip(a_after, a_before, strict=True)), "A is re-drawn"
    assert all(float(p.abs().max()) == 0 for n, p in tiny_llama.named_parameters() if n.endswith("lora_B"))


def test_make_optimizer_positions_the_schedule_and_groups_the_adapters(tiny_llama):
    relora.wrap(tiny_llama, rank=4, alpha=8)
    cfg = relora.ReLoRAConfig(rank=4, alpha=8, restart_every=10, restart_warmup_steps=2)
    kwargs = dict(lr=1e-2, total_steps=40, warmup_steps=2, betas=(0.9, 0.95), weight_decay=0.1)
    optimizer, scheduler = relora.make_optimizer(tiny_llama, cfg, step=10, **kwargs)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "adapters"]
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[2]["weight_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert scheduler.get_last_lr()[0] == 0.0  # step 10 is a restart: the LR starts from zero there
    fresh, fresh_scheduler = relora.make_optimizer(tiny_llama, cfg, step=0, **kwargs)
    assert fresh_scheduler.get_last_lr()[0] == 0.0 and fresh.param_groups[0]["lr"] == 0.0  # warmup from zero
    for _ in range(5):
        fresh_scheduler.step()
    assert fresh_scheduler.get_last_lr()[0] == pytest.approx(
        1e-2
        * relora.jagged_cosine(
            5, total_steps=40, warmup_steps=2, jags=cfg.jag_steps(40), restart_warmup_steps=2, min_lr_ratio=0.1
        )
    )


def test_a_bad_reset_is_refused_before_any_weight_changes(tiny_llama, token_batch):
    optimizer, _ = _trained(tiny_llama, token_batch)
    weights = {n: p.clone() for n, p in tiny_llama.named_parameters()}
    for bad in ({"reset_ratio": 1.5}, {"reset_ratio": 0.5, "reset_method": "largest"}):
        with pytest.raises(ValueError, match="reset_ratio|reset_method"):
            relora.restart(tiny_llama, optimizer, **bad)
    assert all(torch.equal(p, weights[n]) for n, p in tiny_llama.named_parameters()), "nothing merged"


def test_a_random_reset_draws_from_the_given_generator(tiny_llama, token_batch):
    optimizer, _ = _trained(tiny_llama, token_batch)
    adapters = relora.adapter_parameters(tiny_llama)
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in adapters}
    kept = []
    for _ in range(2):
        for p in relora.adapter_parameters(tiny_llama):
            for key, value in state[id(p)].items():
                optimizer.state[p][key].copy_(value)
        torch.manual_seed(len(kept))  # the global RNG differs between the two restarts
        relora.restart(
            tiny_llama, optimizer, reset_ratio=0.5, reset_method="random", generator=torch.Generator().manual_seed(7)
        )
        kept.append([optimizer.state[p]["exp_avg"] != 0 for p in relora.adapter_parameters(tiny_llama)])
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True)), "the same entries are pruned"
