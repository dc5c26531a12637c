"""FLOPs per token and MFU: counted from the model as it is wrapped, none without a known peak."""

import pytest
import torch

import relora

SEQ = 64


def _linear_params(model) -> int:
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_a_full_rank_step_is_six_flops_per_weight_plus_attention(tiny_llama):
    c = tiny_llama.config
    attention = 12 * SEQ * c.hidden_size * c.num_hidden_layers
    assert relora.train_flops_per_token(tiny_llama, SEQ) == 6 * _linear_params(tiny_llama) + attention


def test_frozen_weights_cost_no_weight_gradient_and_adapters_cost_theirs(tiny_llama):
    full = relora.train_flops_per_token(tiny_llama, SEQ)
    relora.wrap(tiny_llama, rank=4, alpha=8)
    layers = [layer for _, layer in relora.relora_layers(tiny_llama)]
    frozen = sum(2 * layer.in_features * layer.out_features for layer in layers)
    adapters = sum(6 * 4 * (layer.in_features + layer.out_features) for layer in layers)
    assert relora.train_flops_per_token(tiny_llama, SEQ) == full - frozen + adapters


def test_mfu_needs_a_known_peak(monkeypatch):
    monkeypatch.delenv(relora.flops.PEAK_ENV, raising=False)
    assert relora.peak_flops(torch.device("cpu"), bf16=True) is None  # never a made-up CPU peak
    assert relora.mfu(1e5, 1e9, None) is None
    monkeypatch.setenv(relora.flops.PEAK_ENV, "100")
    peak = relora.peak_flops(torch.device("cpu"), bf16=False)
    assert peak == 1e14 and relora.mfu(1e5, 1e9, peak, devices=2) == pytest.approx(0.5)
    for bad in ("nan", "-5", "fast"):
        monkeypatch.setenv(relora.flops.PEAK_ENV, bad)
        with pytest.warns(UserWarning, match=relora.flops.PEAK_ENV):
            assert relora.peak_flops(torch.device("cpu"), bf16=True) is None


@pytest.mark.parametrize(
    ("name", "tflops"), [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA L40S", 362.0)]
)
def test_the_peak_table_matches_names_most_specific_first(name, tflops):
    assert next(t for key, t in relora.flops.BF16_PEAK_TFLOPS if key in name) == tflops


def test_attention_is_pytorch_sdpa(tiny_llama):
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_adamw_is_fused_where_the_device_has_it(tiny_llama):
    cfg = relora.ReLoRAConfig(rank=4, alpha=8, restart_every=10, restart_warmup_steps=2)
    optimizer, _ = relora.make_optimizer(tiny_llama, cfg, lr=1e-3, total_steps=20, warmup_steps=2)
    assert optimizer.defaults["fused"] is True  # PyTorch >= 2.4 has a fused AdamW on CPUs too
