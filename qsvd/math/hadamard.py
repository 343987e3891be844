"""Hadamard matrices and transforms of any order K·2^m with a known construction (method §3).

Orders come from Sylvester (2^m), Paley I (q + 1, q prime ≡ 3 mod 4), Paley II (2(q + 1), q prime
≡ 1 mod 4), and the Kronecker product of one Paley matrix with a Sylvester one: 12, 20, 28, 36, 44,
60, 108, 140, ... times any 2^m.
Where no construction is known here (e.g. SigLIP-so400m's 4304 = 16·269), callers use a
seeded random orthogonal matrix instead (`make_rotation`). `mean_preserving_rotation` builds a
rotation that fixes the all-ones vector, so that it commutes with LayerNorm's mean-centring. Transforms are pure PyTorch;
`fast-hadamard-transform` is used for the 2^m factor on CUDA tensors when it is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

try:  # optional CUDA accelerator; never required
    from fast_hadamard_transform import hadamard_transform as _cuda_power_of_two_transform
except ImportError:  # pragma: no cover - depends on the machine
    _cuda_power_of_two_transform = None
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernel's; float64 stays in PyTorch
# Up to this order the 2^m factor is one matmul with the ±1 matrix, not log2(m) butterfly passes: each pass is a
# Python-level stack of the whole tensor (measured on one CPU thread, 512 tokens × 1536 = 12·128: 25 ms against 62).
# Above it, H_2^m = H_2^a ⊗ H_2^b (Sylvester's matrices are Kronecker powers of H_2): two matmuls of orders 2^a, 2^b
# (LLaVA-7B's 4096 = 64·64: its 32000 embedding rows in float64 in 4.3 s on one thread, against 20 s by butterflies).
DENSE_SYLVESTER_MAX = 2048
BROADCAST_FACTOR_MAX = 64  # odd factors up to this order (12, 20, 36: SmolLM2, LLaVA-13B, SigLIP) multiply each row's block
# A Paley I factor above it (LLaVA-7B's 11008 = 5504·2) is applied through its circulant core by FFT, O(k log k) per
# column instead of k² (measured on one thread: LLaVA-7B's down_proj weight, 4096 × 11008 in float64, 5.0 s against
# 11.2 s by one GEMM; the online rotation of 512 tokens in float32 0.23 s against 0.68 s, of one token 1.0 ms against 13.8).


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _legendre_table(q: int) -> torch.Tensor:
    """χ(a) for a in 0..q-1: 0 at 0, +1 on quadratic residues, -1 elsewhere (q an odd prime)."""
    chi = -torch.ones(q, dtype=torch.float64)
    chi[0] = 0
    chi[sorted({(a * a) % q for a in range(1, q)})] = 1
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    index = torch.arange(q)
    return _legendre_table(q)[(index[None, :] - index[:, None]) % q]


def _paley_one(q: int) -> torch.Tensor:
    """Order q + 1 (q prime, q ≡ 3 mod 4): H = I + S with S the skew conference matrix."""
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + skew


def _paley_two(q: int) -> torch.Tensor:
    """Order 2(q + 1) (q prime, q ≡ 1 mod 4) from the symmetric conference matrix C."""
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:] = 1
    conference[1:, 0] = 1
    conference[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _odd_construction(k: int) -> torch.Tensor | None:
    """A Hadamard matrix of order k from one Paley construction, or None."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return _paley_one(k - 1)
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return _paley_two(k // 2 - 1)
    return None


@lru_cache(maxsize=None)
def hadamard_factorisation(n: int) -> tuple[int, int] | None:
    """(K, 2^m) with n = K·2^m, K the smallest order with a Paley construction; None if there is none."""
    if n < 1:
        raise ValueError(f"a Hadamard order must be positive, got {n}")
    power = 1 << ((n & -n).bit_length() - 1)  # the largest power of two dividing n
    while power >= 1:
        if _odd_construction(n // power) is not None:
            return n // power, power
        power //= 2
    return None


def has_hadamard(n: int) -> bool:
    return hadamard_factorisation(n) is not None


@lru_cache(maxsize=None)
def _sylvester(order: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


@lru_cache(maxsize=None)
def _odd_factor(k: int) -> torch.Tensor:
    matrix = _odd_construction(k)
    assert matrix is not None
    return matrix


def hadamard_matrix(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order n (float64, H Hᵀ = n I) that `hadamard_transform` applies."""
    factors = hadamard_factorisation(n)
    if factors is None:
        raise ValueError(f"no Hadamard construction of order {n} here; use make_rotation({n}, seed) instead")
    k, power = factors
    return torch.kron(_odd_factor(k), _sylvester(power)).clone()


def _sylvester_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n (unnormalised Sylvester, n a power of two) along the last dimension: one matmul up to
    DENSE_SYLVESTER_MAX, else x viewed as (2^a, 2^b) multiplied by H_2^b on the right and H_2^a on the left
    (both symmetric)."""
    n = x.shape[-1]
    if n <= DENSE_SYLVESTER_MAX:
        return x @ _matrix_as(_sylvester, n, x.dtype, x.device)
    outer = 1 << ((n.bit_length() - 1) // 2)
    inner = n // outer
    blocks = x.reshape(*x.shape[:-1], outer, inner) @ _matrix_as(_sylvester, inner, x.dtype, x.device)
    blocks = (blocks.transpose(-1, -2) @ _matrix_as(_sylvester, outer, x.dtype, x.device)).transpose(-1, -2)
    return blocks.reshape(x.shape)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n / √n along the last dimension (orthonormal; H_n = `hadamard_matrix(n)`)."""
    n = x.shape[-1]
    factors = hadamard_factorisation(n)
    if factors is None:
        raise ValueError(f"no Hadamard construction of order {n} here; use make_rotation({n}, seed) instead")
    k, power = factors
    lead = x.shape[:-1]
    blocks = x.reshape(*lead, k, power)
    if power > 1:
        if _cuda_power_of_two_transform is not None and x.is_cuda and x.dtype in _CUDA_DTYPES:
            blocks = _cuda_power_of_two_transform(blocks.contiguous())
        else:
            blocks = _sylvester_transform(blocks)
    if k > BROADCAST_FACTOR_MAX and _is_paley_one(k):
        blocks = _paley_one_transform(blocks, k)
    elif k > 1:
        # (A ⊗ B) on rows: x @ (A ⊗ B) = vec(Aᵀ X B) with X the (k, power) view of x.
        factor = _matrix_as(_odd_factor, k, x.dtype, x.device)
        if k <= BROADCAST_FACTOR_MAX:
            blocks = factor.T @ blocks
        else:  # one GEMM over all rows (a Paley II factor above 64): the broadcast form makes CPU matmul copy A per row
            rows = blocks.transpose(-1, -2).reshape(-1, k) @ factor
            blocks = rows.reshape(*lead, power, k).transpose(-1, -2)
    return blocks.reshape(*lead, n) / math.sqrt(n)


def _is_paley_one(k: int) -> bool:
    return _is_prime(k - 1) and (k - 1) % 4 == 3  # the branch `_odd_construction` takes first


@lru_cache(maxsize=16)
def _legendre_spectrum(q: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.fft.rfft(_legendre_table(q).to(dtype=dtype, device=device))


def _paley_one_transform(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Y with Y[..., j, :] = Σ_i H[i, j] X[..., i, :] for H = `_paley_one(k - 1)` = I + S: row 0 of S is +1 and its
    column 0 is −1 below it, and its core is the Jacobsthal matrix χ(j − i), a circulant, so X's rows 1..q meet it
    in one circular convolution (FFT in float64 for float64 inputs, else float32)."""
    q = k - 1
    compute = torch.float64 if blocks.dtype == torch.float64 else torch.float32
    x = blocks.to(compute)
    head, rest = x[..., :1, :], x[..., 1:, :]
    spectrum = _legendre_spectrum(q, compute, x.device)
    core = torch.fft.irfft(torch.fft.rfft(rest, dim=-2) * spectrum[:, None], n=q, dim=-2)
    first = head - rest.sum(dim=-2, keepdim=True)
    return torch.cat([first, rest + head + core], dim=-2).to(blocks.dtype)


@lru_cache(maxsize=64)
def _matrix_as(build, order: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ±1 factor matrix in the activations' dtype and device, made once (an online rotation runs every step)."""
    return build(order).to(dtype=dtype, device=device)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random n×n orthogonal matrix (float64) from a seeded generator: QR with sign fix."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()  # QR returns column-major storage


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n seeded ±1 values (float64)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


@dataclass(frozen=True)
class Rotation:
    """An orthonormal n×n Q that applies itself to rows, x ↦ x·Q along the last dimension: by the Hadamard
    transform where Q is H/√n ("hadamard") or D·H/√n with D = diag(signs) ("randomized-hadamard"), in
    O(n log n) per row, else by its dense float64 matrix ("random", "mean-preserving")."""

    size: int
    kind: str
    signs: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def matrix(self) -> torch.Tensor:
        """Q as a dense float64 matrix."""
        if self.dense is not None:
            return self.dense
        matrix = hadamard_matrix(self.size) / math.sqrt(self.size)
        return matrix if self.signs is None else self.signs[:, None] * matrix

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return x @ self.dense.to(x.device)
        if self.signs is not None:
            x = x * self.signs.to(device=x.device, dtype=x.dtype)
        return hadamard_transform(x)


def make_rotation(n: int, seed: int, randomized: bool = False) -> Rotation:
    """The normalised Hadamard rotation of order n where one is constructible ("hadamard"), with `randomized`
    QuaRot's D·H with seeded random signs D ("randomized-hadamard"), else a seeded random orthogonal matrix
    ("random")."""
    if not has_hadamard(n):
        return Rotation(n, "random", dense=random_orthogonal(n, seed))
    if randomized:
        return Rotation(n, "randomized-hadamard", signs=random_signs(n, seed))
    return Rotation(n, "hadamard")


def mean_preserving_rotation(n: int, seed: int) -> torch.Tensor:
    """An orthonormal n×n Q (float64) with Q·1 = 1: Q = P·diag(1, R)·P, P the Householder reflection swapping e1
    and 1/√n, R = `make_rotation(n - 1, seed, randomized=True)`. Then mean(xQ) = mean(x), so centring commutes
    with Q and an affine-free LayerNorm satisfies LN(xQ) = LN(x)·Q."""
    if n < 2:
        raise ValueError(f"a mean-preserving rotation needs order >= 2, got {n}")
    ones = torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64)
    direction = -ones
    direction[0] += 1
    direction /= direction.norm()
    reflection = torch.eye(n, dtype=torch.float64) - 2 * torch.outer(direction, direction)
    rest = make_rotation(n - 1, seed, randomized=True).matrix
    return (reflection @ torch.block_diag(torch.ones(1, 1, dtype=torch.float64), rest) @ reflection).contiguous()
