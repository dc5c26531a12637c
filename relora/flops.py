"""FLOPs of a training step and model FLOPs utilisation (MFU).

MFU = (tokens per second x FLOPs per token) / (devices x the device's peak). The FLOPs
are those the step must do, counted from the model as it is wrapped:

- every linear layer: ``2·in·out`` per token forward and the same again for its input
  gradient, plus ``2·in·out`` for its weight gradient when that weight trains. A ReLoRA
  layer's frozen ``W`` gets no weight gradient; its adapter (``A``: r x in, ``B``: out x r)
  trains, at ``6·r·(in + out)``;
- attention scores and their use, ``QK^T`` and ``softmax·V``: ``4·T·d`` per token and
  layer forward, twice that backward (the PaLM paper's count, which ignores the causal
  mask);
- norms, activations, the softmax and the optimizer are left out (each is O(d) a token).

The peaks are dense bf16 tensor-core figures from NVIDIA's datasheets. A device not in
the table, or a run in another precision, has no MFU rather than a guessed one; set
``RELORA_PEAK_TFLOPS`` to give a device's peak yourself.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn

from relora.layers import ReLoRALinear

# Dense bf16 tensor-core TFLOPS, most specific name first (torch.cuda.get_device_name()).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A40", 149.7),
    ("L4", 121.0),
)
PEAK_ENV = "RELORA_PEAK_TFLOPS"


def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward plus backward FLOPs per token of one training step of ``model`` (a Hugging Face
    causal LM, wrapped or not) on sequences of ``seq_len`` tokens."""
    total = 0.0
    for module in model.modules():
        if isinstance(module, ReLoRALinear):
            matmul = 2.0 * module.in_features * module.out_features
            total += 2 * matmul + (matmul if module.weight.requires_grad else 0.0)
            total += 6.0 * module.rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Linear):
            matmul = 2.0 * module.in_features * module.out_features
            total += 2 * matmul + (matmul if module.weight.requires_grad else 0.0)
    config = model.config
    total += 3 * 4.0 * seq_len * config.hidden_size * config.num_hidden_layers
    return total


def peak_flops(device: torch.device, *, bf16: bool) -> float | None:
    """The device's peak FLOP/s for this run, or None where it is not known (CPUs, other precisions)."""
    if os.environ.get(PEAK_ENV):
        try:
            tflops = float(os.environ[PEAK_ENV])
        except ValueError:
            tflops = math.nan
        if math.isfinite(tflops) and tflops > 0:
            return tflops * 1e12
        warnings.warn(f"{PEAK_ENV}={os.environ[PEAK_ENV]!r} is not a positive number of TFLOPS: no MFU", stacklevel=2)
        return None
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * devices)
