"""Byte counts of resident tensors (qsvd.measure)."""

import torch
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

from qsvd.measure import module_bytes


def test_module_bytes_counts_shared_tensors_once_and_looks_inside_wrapper_subclasses():
    """torchao's quantized weights are wrapper tensor subclasses held as nn.Parameter: their inner tensors count (a
    subclass has no storage of its own to read)."""
    layer = nn.Linear(16, 8)
    tied = nn.Linear(16, 8)
    tied.weight = layer.weight
    assert module_bytes([layer, tied]) == (8 * 16 + 8 + 8) * 4  # one weight, two biases
    layer.weight = nn.Parameter(TwoTensor(torch.zeros(8, 16), torch.zeros(8, 16)), requires_grad=False)
    assert module_bytes([layer]) == 2 * 8 * 16 * 4 + 8 * 4
