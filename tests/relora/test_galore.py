"""GaLore through relora.make_optimizer: its groups, its training, and an exact resume of its state."""

import io

import pytest
import torch

import relora
from relora.galore import load_optimizer_state, optimizer_state

GALORE = relora.ReLoRAConfig(method="galore", rank=4, update_proj_gap=3, galore_scale=0.5)


def _galore(model):
    return relora.make_optimizer(model, GALORE, lr=1e-2, total_steps=40, warmup_steps=2)


def _steps(model, optimizer, scheduler, batch, count: int) -> list[float]:
    losses = []
    for _ in range(count):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_galore_projects_the_target_layers_and_trains_the_rest_plainly(tiny_llama, token_batch):
    optimizer, _ = _galore(tiny_llama)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert type(optimizer).__module__.startswith("galore_torch")
    assert groups["galore"]["rank"] == 4 and groups["galore"]["update_proj_gap"] == 3
    assert groups["galore"]["scale"] == 0.5 and groups["galore"]["proj_type"] == "std"
    assert len(groups["galore"]["params"]) == 14  # 7 target linears in each of the tiny model's 2 layers
    assert not list(relora.relora_layers(tiny_llama)), "GaLore wraps nothing"
    assert all(p.requires_grad for p in tiny_llama.parameters()), "every weight trains, full-rank"


def test_galore_moments_are_rank_sized_and_the_loss_falls(tiny_llama, token_batch):
    optimizer, scheduler = _galore(tiny_llama)
    losses = _steps(tiny_llama, optimizer, scheduler, token_batch, 12)
    assert losses[-1] < losses[0] - 0.5
    for weight in optimizer.param_groups[-1]["params"]:
        state = optimizer.state[weight]
        assert 4 in state["exp_avg"].shape and state["exp_avg"].numel() < weight.numel() / 2
        projection = state["projector"].ortho_matrix
        assert 4 in projection.shape
        # its own r x d storage, not a view that keeps the whole SVD factor alive
        assert projection.untyped_storage().nbytes() == projection.numel() * projection.element_size()


def test_a_resumed_galore_run_continues_exactly(token_batch):
    """The optimizer state through `optimizer_state`, a weights-only torch.save and back: the same
    projections, moments and steps, so the resumed run matches the uninterrupted one bit for bit.
    Resuming at step 4 with a projection gap of 3 crosses a projection update at step 6."""

    def model():
        torch.manual_seed(0)
        return relora.build_model("llama-tiny", vocab_size=256, max_position_embeddings=64)

    reference = model()
    optimizer, scheduler = _galore(reference)
    _steps(reference, optimizer, scheduler, token_batch, 8)

    first = model()
    optimizer, scheduler = _galore(first)
    _steps(first, optimizer, scheduler, token_batch, 4)
    saved = {"model": first.state_dict(), "optimizer": optimizer_state(optimizer), "scheduler": scheduler.state_dict()}
    path = io.BytesIO()
    torch.save(saved, path)
    path.seek(0)
    loaded = torch.load(path, weights_only=True)  # no pickled projector objects

    resumed = model()
    resumed.load_state_dict(loaded["model"])
    optimizer, scheduler = _galore(resumed)
    load_optimizer_state(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    _steps(resumed, optimizer, scheduler, token_batch, 4)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_galore_refuses_a_warm_start():
    with pytest.raises(relora.HyperparameterError, match="warm_start_steps"):
        relora.ReLoRAConfig(method="galore", warm_start_steps=10)
    with pytest.raises(relora.HyperparameterError, match="update_proj_gap"):
        relora.ReLoRAConfig(method="galore", update_proj_gap=0)
