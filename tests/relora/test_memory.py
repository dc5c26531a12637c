"""relora.memory_breakdown: bytes of parameters, gradients and optimizer state, per method."""

import torch

import relora


def _one_step_then_backward(model, config, batch):
    """Optimizer state from one step, and the gradients of the next, not yet applied."""
    optimizer, _ = relora.make_optimizer(model, config, lr=1e-3, total_steps=10, warmup_steps=1)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        if _ == 0:
            optimizer.step()
    return optimizer


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def test_full_rank_counts_every_weight_gradient_and_two_moments(tiny_llama, token_batch):
    optimizer = _one_step_then_backward(tiny_llama, relora.ReLoRAConfig(method="full"), token_batch)
    usage = relora.memory_breakdown(tiny_llama, optimizer)
    weights = _numel(tiny_llama.parameters()) * 4
    buffers = sum(b.numel() * b.element_size() for b in tiny_llama.buffers())
    assert usage["params_bytes"] == weights + buffers
    assert usage["grads_bytes"] == weights
    # exp_avg and exp_avg_sq of every weight, plus a scalar step per tensor
    steps = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert usage["optimizer_bytes"] == 2 * weights + steps


def test_relora_and_galore_hold_less_optimizer_state_than_full_rank(token_batch):
    def usage(method: str) -> dict:
        torch.manual_seed(0)
        model = relora.build_model("llama-tiny", vocab_size=256, max_position_embeddings=64)
        config = relora.ReLoRAConfig(method=method, rank=4, alpha=8, restart_every=10, restart_warmup_steps=2)
        if config.low_rank:
            relora.wrap(model, rank=4, alpha=8)
        return relora.memory_breakdown(model, _one_step_then_backward(model, config, token_batch))

    full, adapters, galore = usage("full"), usage("relora"), usage("galore")
    assert adapters["grads_bytes"] < full["grads_bytes"] / 2, "frozen weights have no gradient"
    assert galore["grads_bytes"] == full["grads_bytes"], "GaLore's gradients are full-size"
    assert adapters["optimizer_bytes"] < full["optimizer_bytes"] / 2
    # GaLore's projected moments plus its r x d projection matrices (inside the projector objects),
    # copied out of the SVD factors they are views of (relora.galore._compact_projections)
    assert full["optimizer_bytes"] / 2 > galore["optimizer_bytes"] > adapters["optimizer_bytes"] / 2
