"""Low-rank attention: one shared down-projection per group of projections, one up-projection per output.

The attention module keeps calling `q_proj(x)`, `k_proj(x)`, `v_proj(x)` on the same hidden
states; the `LatentUpProjection`s of a group (all three for joint QKV) share one
`SharedDownProjection`, registered as `<group>_down` (`qkv_down`), that computes the latent
C = B x once per input and hands it to each (the published code multiplies by B three times).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from qsvd.math.quantize import per_token_codes
from qsvd.models.input_transform import InputTransform

DOWN_SUFFIX = "_down"


class SharedDownProjection(nn.Module):
    """C = B x, memoised on the identity of x so q, k and v share one computation.

    `input_transform` (on x) and `latent_transform` (on C: the cache precision) are identities
    until the quantization stage sets them.
    """

    def __init__(self, in_features: int, rank: int, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features = in_features
        self.rank = rank
        self.weight = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self._last_input: weakref.ref | None = None
        self._last_latent: torch.Tensor | None = None
        self._last_version = -1
        self.last_codes: tuple[torch.Tensor, torch.Tensor] | None = None  # of the memoised latent
        self.latent_computations = 0
        self.input_transform = InputTransform(in_features)
        self.latent_transform = InputTransform(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last_input() if self._last_input is not None else None
        if last is x and self._last_latent is not None and _version(last) == self._last_version:
            return self._last_latent
        latent, self.last_codes = self.compute_latent(x)
        self._last_input, self._last_version, self._last_latent = weakref.ref(x), _version(x), latent
        self.latent_computations += 1
        return latent

    def compute_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(C, its (int8 codes, per-token scale) when the latent is quantized, else None); C = codes · scale."""
        pre = self.project_down(x)
        transform = self.latent_transform
        differentiable = torch.is_grad_enabled() and pre.requires_grad
        if transform.bits is not None and transform.rotation_kind is None and transform.bits <= 8 and not differentiable:
            codes, scale = per_token_codes(pre, transform.bits, transform.clip_ratio)
            return codes.to(pre.dtype) * scale, (codes, scale)
        return transform(pre), None

    def project_down(self, x: torch.Tensor) -> torch.Tensor:
        """B x, after the input transform (the latent before its quantization)."""
        return nn.functional.linear(self.input_transform(x), self.weight)

    def release(self) -> None:
        """Drop the memoised latent (called after each attention forward)."""
        self._last_input = self._last_latent = self.last_codes = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}"


def _version(x: torch.Tensor) -> int | None:
    """x's in-place version counter; None for an inference-mode tensor, which has none (the memo then trusts the
    tensor's identity: released after every attention forward, it only spans one layer's q/k/v projections)."""
    return None if x.is_inference() else x._version


class LatentUpProjection(nn.Module):
    """y = A (B x) + b, reading the latent from the layer's shared down-projection."""

    def __init__(
        self,
        down: SharedDownProjection,
        out_features: int,
        bias: bool,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        # A plain attribute, not a submodule: B is owned (and saved) once, by the attention module.
        object.__setattr__(self, "down", down)
        self.in_features = down.in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, down.rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.down(x))

    def project(self, latent: torch.Tensor) -> torch.Tensor:
        """A C + b for a latent C (the latent cache rebuilds K from its cached latents with this)."""
        return nn.functional.linear(latent, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"rank={self.down.rank}, out_features={self.out_features}, bias={self.bias is not None}"


def install_lowrank_group(
    attention: nn.Module,
    group: str,
    projections: tuple[nn.Module, ...],
    set_projection,
    rank: int,
    in_features: int,
    biases: tuple[bool, ...],
    dtype: torch.dtype | None = None,
    device=None,
) -> tuple[SharedDownProjection, list[LatentUpProjection]]:
    """Replace the projections named by `group` ("qkv", "k", ...) by empty low-rank shells of `rank`.

    `projections` are the current modules, in the group's order (their output sizes are kept), and
    `set_projection(which, module)` swaps one of them in place. Weights are filled or loaded later.
    """
    down = SharedDownProjection(in_features, rank, dtype=dtype, device=device)
    attention.add_module(group + DOWN_SUFFIX, down)
    ups = []
    for which, old, bias in zip(group, projections, biases, strict=True):
        up = LatentUpProjection(down, old.out_features, bias, dtype=dtype, device=device)
        set_projection(which, up)
        ups.append(up)
    # by name: a packed model swaps the down-projection module later
    attention.register_forward_hook(lambda module, args, output: getattr(module, group + DOWN_SUFFIX).release())
    return down, ups
