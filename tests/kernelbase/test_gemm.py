"""kernelbase.gemm: which matrices the tensor-descriptor (TMA) main loop can read."""

import torch

from kernelbase.gemm import GemmConfig, matmul_descriptors, tma_descriptor

CONFIG = GemmConfig(block_m=16, block_n=32, block_k=16)


def test_descriptors_of_row_major_and_transposed_operands():
    a, b = torch.randn(40, 64), torch.randn(64, 48)
    a_desc, b_desc, b_kn = matmul_descriptors(a, b, CONFIG)
    assert b_kn and a_desc.block_shape == [16, 16] and b_desc.block_shape == [16, 32]
    assert list(a_desc.shape) == [40, 64] and list(b_desc.strides) == [48, 1]
    weight = torch.randn(48, 64)  # [N, K]: b = weight^T is read as weight, tiles transposed
    _, b_desc, b_kn = matmul_descriptors(a, weight.mT, CONFIG)
    assert not b_kn and list(b_desc.shape) == [48, 64] and b_desc.block_shape == [32, 16]


def test_matrices_the_copy_engine_cannot_read_get_no_descriptor():
    assert tma_descriptor(torch.randn(8, 17), (16, 16)) is None  # 68-byte rows
    assert tma_descriptor(torch.randn(9, 16)[1:], (16, 16)) is not None  # 64-byte offset
    assert tma_descriptor(torch.randn(9 * 16 + 1)[1:].view(9, 16), (16, 16)) is None  # 4-byte
    assert tma_descriptor(torch.randn(16, 8)[:, ::2], (16, 4)) is None  # strided along rows
    assert tma_descriptor(torch.randn(16, 4, dtype=torch.bfloat16), (16, 4)) is None  # 8-byte block
    assert tma_descriptor(torch.randn(0, 16), (16, 16)) is None  # empty
    assert matmul_descriptors(torch.randn(8, 16), torch.randn(16, 17), CONFIG) is None
