"""The library on a CUDA device (skipped without one; benchmarks/gpu_check.sh runs it on a GPU):
the adapter layer, merges, the reset and a plain-loop restart in bf16, with fused AdamW and SDPA."""

import pytest
import torch

import relora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = relora.build_model("llama-tiny", vocab_size=256, max_position_embeddings=64).to(CUDA, dtype)
    return relora.wrap(model, rank=4, alpha=8)


def _batch():
    return torch.randint(0, 256, (4, 32), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))


def test_a_bf16_step_matches_fp32_and_merges_exactly():
    ids = _batch()
    full, half = _model(), _model(torch.bfloat16)
    losses = [m(input_ids=ids, labels=ids).loss for m in (full, half)]
    assert abs(losses[0].item() - losses[1].item()) < 0.05 * losses[0].item()
    for model in (full, half):
        with torch.no_grad():
            for _, layer in relora.relora_layers(model):
                layer.lora_B.normal_(std=1e-3)
    merged = relora.merge(half, torch.Generator(CUDA).manual_seed(2))
    assert merged.layers == 14 and merged.lost_share < 0.01
    plain = relora.merge(_model(torch.bfloat16), torch.Generator(CUDA).manual_seed(2), compensate=False)
    assert plain.layers == 14


def test_a_plain_loop_restart_with_fused_adamw_on_cuda():
    model, ids = _model(), _batch()
    cfg = relora.ReLoRAConfig(rank=4, alpha=8, restart_every=5, restart_warmup_steps=1)
    optimizer, scheduler = relora.make_optimizer(model, cfg, lr=1e-2, total_steps=20, warmup_steps=1)
    assert optimizer.defaults["fused"] is True
    assert model.config._attn_implementation == "sdpa"
    for step in range(12):
        if cfg.restarts_at(step):
            done = relora.restart(model, optimizer, reset_ratio=0.9, generator=torch.Generator(CUDA).manual_seed(step))
            assert done.merged_layers == 14 and done.reset_fraction == pytest.approx(0.9, abs=0.02)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_the_peak_of_this_device_is_known_or_none():
    peak = relora.peak_flops(CUDA, bf16=True)
    name = torch.cuda.get_device_name(CUDA)
    assert peak is None or peak > 1e13, name
