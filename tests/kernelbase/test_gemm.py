"""kernelbase.gemm: which tensors the tensor-descriptor (TMA) loads of `tile_matmul` can read."""

import torch

from kernelbase.gemm import GemmConfig, b_descriptor, matmul_descriptors, tma_descriptor

CONFIG = GemmConfig(block_m=16, block_n=32, block_k=16)


def test_descriptors_of_row_major_and_transposed_operands():
    a, b = torch.randn(40, 64), torch.randn(64, 48)
    a_desc, b_desc, b_kn = matmul_descriptors(a, b, CONFIG)
    # B is described as a stack of one matrix.
    assert b_kn and a_desc.block_shape == [16, 16] and b_desc.block_shape == [1, 16, 32]
    assert list(a_desc.shape) == [40, 64] and list(b_desc.shape) == [1, 64, 48]
    assert list(b_desc.strides)[1:] == [48, 1]
    weight = torch.randn(48, 64)  # [N, K]: b = weight^T is read as weight, tiles transposed
    _, b_desc, b_kn = matmul_descriptors(a, weight.mT, CONFIG)
    assert not b_kn and list(b_desc.shape) == [1, 48, 64] and b_desc.block_shape == [1, 32, 16]


def test_descriptors_of_weight_stacks():
    w13 = torch.randn(5, 80, 48)  # [E, 2F, d]: B = w13[e]^T [d, 2F] for the up-projection
    desc, b_kn = b_descriptor(w13.mT, 16, 32)
    assert not b_kn and list(desc.shape) == [5, 80, 48] and desc.block_shape == [1, 32, 16]
    desc, b_kn = b_descriptor(w13, 16, 32)  # B = w13[e] [2F, d] for the input gradient
    assert b_kn and list(desc.shape) == [5, 80, 48] and desc.block_shape == [1, 16, 32]
    assert b_descriptor(torch.randn(5, 80, 47), 16, 32) is None  # 188-byte rows
    # DUAL's second block F = 6 columns on: 24 bytes into a row of a B_KN descriptor (a block
    # must start 16-byte aligned), or 6 rows on in a B^T one.
    assert b_descriptor(torch.randn(5, 48, 80), 16, 32, second_n=6) is None
    assert b_descriptor(torch.randn(5, 48, 80), 16, 32, second_n=8) is not None
    assert b_descriptor(w13.mT, 16, 32, second_n=6) is not None
    assert b_descriptor(torch.randn(5, 48, 80)[:, :, ::2], 16, 32) is None  # no unit stride


def test_tensors_the_copy_engine_cannot_read_get_no_descriptor():
    assert tma_descriptor(torch.randn(8, 17), (16, 16)) is None  # 68-byte rows
    assert tma_descriptor(torch.randn(9, 16)[1:], (16, 16)) is not None  # 64-byte offset
    assert tma_descriptor(torch.randn(9 * 16 + 1)[1:].view(9, 16), (16, 16)) is None  # 4-byte
    assert tma_descriptor(torch.randn(16, 8)[:, ::2], (16, 4)) is None  # strided along rows
    assert tma_descriptor(torch.randn(16, 4, dtype=torch.bfloat16), (16, 4)) is None  # 8-byte block
    assert tma_descriptor(torch.randn(0, 16), (16, 16)) is None  # empty
    stack = torch.randn(64, dtype=torch.bfloat16).as_strided((3, 2, 8), (20, 8, 1))
    assert tma_descriptor(stack, (1, 2, 8)) is None  # matrices 40 bytes apart
    assert tma_descriptor(torch.randn(1, 4, 8).expand(3, 4, 8), (1, 4, 8)) is None  # broadcast
    assert matmul_descriptors(torch.randn(8, 16), torch.randn(16, 17), CONFIG) is None
