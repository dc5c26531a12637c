"""LoRA adapters that can be merged into their base weight and restarted.

A ``ReLoRALinear`` computes ``x @ W.T + b + s * (dropout(x) @ A.T) @ B.T`` with the
base ``W`` (and ``b``) frozen and ``A`` (r x in), ``B`` (out x r) trainable. A restart
folds ``s * B @ A`` into ``W`` and starts a fresh adapter, so that a sequence of rank-r
updates adds up to a high-rank one (Lialin et al., 2024).

Two details that peer implementations get wrong and that silently ruin training:
``A`` is random and ``B`` is zero (never both zero, else no adapter learns), and the
merge includes the scale ``s`` (else the merged model is not the trained one).

A third that every peer gets wrong: under bf16 (DeepSpeed's, say) the frozen ``W`` is stored
in bf16, and rounding ``W + s·B·A`` back to bf16 drops most of a small update (84% of its
norm at ``|dW|/|W| = 8e-4``). A merge into a low-precision weight therefore keeps what the
rounding left out in ``weight_residual``, a buffer of the weight's own dtype, and adds it
back at the next merge (compensated, "Kahan", summation): ``W + residual`` holds the base
weight to about 2^-18 of ``|W|``. We chose this over an fp32 copy of every frozen weight
because it costs half the memory (2 bytes a weight, not 4: 2.4 GB rather than 4.8 GB per
rank for a 1.3B model) and leaves the forward untouched (it reads the bf16 ``W``, the
value an fp32 copy would round to anyway), and over stochastic rounding because that
keeps the update only on average. fp32 weights get no residual: it is never created.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Attention and MLP projections of a Hugging Face Llama. Embeddings, norms and
# lm_head are left alone and keep training full-rank, as in the paper.
LLAMA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class ReLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``s * B @ A``.

    ``weight`` and ``bias`` keep the names ``nn.Linear`` gives them, so state dicts
    and DeepSpeed see the same base parameters before and after wrapping.
    With ``trainable_scaling`` the scale ``s`` is a learned scalar, initialised to
    ``alpha / rank``; merges leave it as it is, so its gradient never dies.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = True,
        trainable_scaling: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_adapter_args(rank=rank, alpha=alpha, dropout=dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = alpha
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        # No dropout module at all when p == 0: nn.Dropout(0) would still copy x.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / rank  # the fixed scale, as a number for the fused forward
        if trainable_scaling:
            self.scaling = nn.Parameter(torch.tensor(alpha / rank, **factory))
        else:
            self.register_buffer("scaling", torch.tensor(alpha / rank, **factory), persistent=False)
        # What merges into a low-precision W left out; created by the first such merge.
        self.register_buffer("weight_residual", None)
        self.reset_base()
        self.reset_adapter()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        trainable_scaling: bool = False,
    ) -> ReLoRALinear:
        """Wrap ``linear``, sharing its weight and bias tensors (no copy)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            bias=linear.bias is not None,
            trainable_scaling=trainable_scaling,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        layer.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return layer

    @torch.no_grad()
    def reset_base(self) -> None:
        """Initialise W and b as ``nn.Linear`` does (``from_linear`` replaces them)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform (as ``nn.Linear`` and peft), B = 0: the update starts at zero
        but B's gradient does not, so the adapter learns from the first step."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
        self.lora_A.uniform_(-bound, bound, generator=generator)
        self.lora_B.zero_()

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in float32, with what earlier merges' rounding left out."""
        weight = self.weight.detach().float()
        return weight if self.weight_residual is None else weight + self.weight_residual.float()

    def delta_weight(self) -> torch.Tensor:
        """The update ``s * B @ A`` that a merge would add to ``weight``, in float32."""
        # The fixed scale as the forward uses it (a Python float): a bf16 buffer would round
        # alpha / rank, and the merge would no longer leave the output unchanged.
        scale = self.scaling.detach().float() if isinstance(self.scaling, nn.Parameter) else self.scale
        return scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merge_and_reinit(
        self, generator: torch.Generator | None = None, *, compensate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """W += s * B @ A, then restart the adapter. The layer's output is unchanged.

        The sum is formed in float32 and checked before it is written (a "safe merge"):
        a non-finite adapter raises instead of corrupting the base weight. Into a bf16 or
        fp16 weight, what rounding drops goes to ``weight_residual`` (module docstring),
        unless ``compensate=False``. Returns the squared norms of what the stored base
        weight lost of the update and of the update itself, as tensors (no host sync).
        """
        delta = self.delta_weight()
        merged = self.base_weight() + delta
        if not torch.isfinite(merged).all():
            raise ValueError("merge_and_reinit: the adapter holds NaN or inf; the base weight was left untouched")
        self.weight.copy_(merged)
        if compensate and self.weight.dtype in (torch.bfloat16, torch.float16):
            if self.weight_residual is None:
                self.weight_residual = torch.zeros_like(self.weight)
            self.weight_residual.copy_(merged - self.weight.float())
        elif self.weight_residual is not None:
            self.weight_residual.zero_()
        lost = (self.base_weight() - merged).square().sum()
        self.reset_adapter(generator)
        return lost, delta.square().sum()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint taken after a compensated merge holds a residual this layer has not made yet.
        saved = state_dict.get(prefix + "weight_residual")
        if saved is not None and self.weight_residual is None:
            self.weight_residual = torch.zeros(saved.shape, dtype=self.weight.dtype, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._plain_adapter(x):
            return _LowRankUpdate.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale)
        base = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return base + self.scaling * update

    def _plain_adapter(self, x: torch.Tensor) -> bool:
        """The common case the hand-written backward covers: frozen base, fixed scale, no
        dropout, no autocast (which the autograd path handles by itself)."""
        return (
            isinstance(self.lora_dropout, nn.Identity)
            and not isinstance(self.scaling, nn.Parameter)
            and not self.weight.requires_grad
            and (self.bias is None or not self.bias.requires_grad)
            and not torch.is_autocast_enabled(x.device.type)
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


class _LowRankUpdate(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` with W and b frozen, in as few full-size passes as
    autograd's own graph would need: the update is added into the base output by one
    ``addmm``, the two input-gradient terms are summed in place, and no weight gradient
    is formed for W. benchmarks/adapter_layer.py measures what this buys."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ lora_a.t()
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scale, ctx.input_shape = scale, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_xa = (g @ lora_b).mul_(ctx.scale)
        grad_b = (g.t() @ xa).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        grad_a = grad_xa.t() @ x2 if ctx.needs_input_grad[3] else None
        grad_x = (g @ weight).addmm_(grad_xa, lora_a).view(ctx.input_shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_a, grad_b, None


class HyperparameterError(ValueError):
    """A bad hyperparameter; ``field`` names it, so a config loader can report its own path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


def _check_adapter_args(*, rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or rank <= 0:
        raise HyperparameterError("rank", f"must be a positive integer, got {rank!r}")
    if alpha <= 0:
        raise HyperparameterError("alpha", f"must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise HyperparameterError("dropout", f"must lie in [0, 1), got {dropout!r}")


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def wrap(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] = LLAMA_TARGET_MODULES,
    trainable_scaling: bool = False,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose name ends with one of ``target_modules``.

    Only the adapters train inside the wrapped layers; every other parameter keeps its
    ``requires_grad`` (embeddings, norms and lm_head stay trainable). Returns ``model``,
    which computes exactly what it did before.
    """
    _check_adapter_args(rank=rank, alpha=alpha, dropout=dropout)
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, target_modules)
    ]
    if not found:
        raise ValueError(f"target_modules {list(target_modules)} matched no nn.Linear in {type(model).__name__}")
    for name, linear in found:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = ReLoRALinear.from_linear(
            linear, rank=rank, alpha=alpha, dropout=dropout, trainable_scaling=trainable_scaling
        )
        setattr(parent, child_name, layer)
    return model


def relora_layers(model: nn.Module) -> Iterator[tuple[str, ReLoRALinear]]:
    """The wrapped layers of ``model``, with their names."""
    for name, module in model.named_modules():
        if isinstance(module, ReLoRALinear):
            yield name, module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A, B and any trainable scale): the ones a restart resets."""
    params: list[nn.Parameter] = []
    for _, layer in relora_layers(model):
        params += [layer.lora_A, layer.lora_B]
        if isinstance(layer.scaling, nn.Parameter):
            params.append(layer.scaling)
    return params


@dataclass(frozen=True)
class MergeResult:
    layers: int  # adapter layers merged into their base weights
    lost_share: float  # norm(W_after - W_before - dW) / norm(dW) over all layers: 0 for an exact merge


def merge(model: nn.Module, generator: torch.Generator | None = None, *, compensate: bool = True) -> MergeResult:
    """Merge every adapter into its base weight and restart it, measuring what the stored
    weights lost of the update (``compensate=False``: plain rounding, for comparison)."""
    lost, total, count = [], [], 0
    for _, layer in relora_layers(model):
        layer_lost, layer_total = layer.merge_and_reinit(generator, compensate=compensate)
        lost.append(layer_lost)
        total.append(layer_total)
        count += 1
    if not count:
        return MergeResult(0, 0.0)
    lost_sq, total_sq = torch.stack([torch.stack(lost).sum(), torch.stack(total).sum()]).tolist()  # one host sync
    return MergeResult(count, math.sqrt(lost_sq / total_sq) if total_sq > 0 else 0.0)


def merge_and_reinit(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Merge every adapter into its base weight and restart it; returns how many layers merged.

    In data-parallel training pass a ``generator`` seeded the same on every rank, so that
    the new ``A`` matrices, and thus the weights, stay identical across ranks.
    """
    return merge(model, generator).layers


@torch.no_grad()
def unwrap(model: nn.Module) -> nn.Module:
    """Merge the adapters and put plain ``nn.Linear`` layers back, in place.

    The result is a model of its original class with no trace of ``relora``: its state
    dict has the original keys, so ``save_pretrained`` writes a standard checkpoint.
    """
    for name, layer in list(relora_layers(model)):
        linear = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        linear.weight.copy_(layer.base_weight() + layer.delta_weight())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, linear)
    return model
