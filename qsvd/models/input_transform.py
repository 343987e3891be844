"""What a linear layer does to its input before the matmul: an online rotation, then activation quantization.

`InputTransform` is the one place for both: it rotates x (a Hadamard transform, or a stored
orthogonal matrix where no Hadamard of that order is constructible), optionally only across
`size` blocks of the last dimension (the o_proj input: across heads), then fake-quantizes per
token (simulated quantization: rounded in floating point).
"""

from __future__ import annotations

import torch
from torch import nn

from qsvd.math.hadamard import hadamard_transform
from qsvd.math.quantize import quantize_per_token

ROTATION_KINDS = ("hadamard", "random")


class InputTransform(nn.Module):
    """x -> quantize_per_token(x · (R ⊗ I_block)): R of order `size`, acting on the (size, block) view of x."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.rotation_kind: str | None = None
        self.rotation_size = 0
        self.register_buffer("rotation", None, persistent=False)  # the stored matrix of a "random" rotation
        self.bits: int | None = None
        self.clip_ratio = 1.0

    def set_rotation(self, kind: str, size: int, matrix: torch.Tensor | None = None) -> None:
        """Rotate inputs online by an orthonormal matrix of order `size` (a Hadamard, or `matrix`)."""
        if kind not in ROTATION_KINDS:
            raise ValueError(f"rotation kind must be one of {ROTATION_KINDS}, got {kind!r}")
        if self.features % size:
            raise ValueError(f"a rotation of order {size} does not divide {self.features} input features")
        if (kind == "random") != (matrix is not None) or (matrix is not None and matrix.shape != (size, size)):
            raise ValueError(f"a {kind!r} rotation of order {size} needs {'a' if kind == 'random' else 'no'} {size}x{size} matrix")
        self.rotation_kind, self.rotation_size, self.rotation = kind, size, matrix

    def set_quantization(self, bits: int | None, clip_ratio: float = 1.0) -> None:
        if bits is not None and not 2 <= bits <= 16:
            raise ValueError(f"activation bits must be in [2, 16], got {bits}")
        if not 0 < clip_ratio <= 1:
            raise ValueError(f"activation clip ratio must be in (0, 1], got {clip_ratio}")
        self.bits, self.clip_ratio = bits, clip_ratio

    @property
    def active(self) -> bool:
        return self.rotation_kind is not None or self.bits is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation_kind is not None:
            x = self.rotate(x)
        if self.bits is not None:
            x = quantize_per_token(x, self.bits, self.clip_ratio)
        return x

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x · (R ⊗ I_block), without the quantization."""
        size = self.rotation_size
        blocks = x.reshape(*x.shape[:-1], size, self.features // size).transpose(-1, -2)
        if self.rotation_kind == "hadamard":
            blocks = hadamard_transform(blocks)
        else:
            blocks = blocks @ self.rotation.to(x.dtype)
        return blocks.transpose(-1, -2).reshape(x.shape)

    def extra_repr(self) -> str:
        rotation = f"rotation={self.rotation_kind}({self.rotation_size})" if self.rotation_kind else "rotation=None"
        return f"{rotation}, bits={self.bits}, clip_ratio={self.clip_ratio}"
