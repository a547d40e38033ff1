"""The gather-sum kernel (the combine of expert parallelism) against its torch reference and a
float64 loop: the same bits as the reference (bfloat16 under the interpreter, which rounds
float32 to it toward zero: within one unit in the last place), with -1 entries, one column, one
pick per output, no output, no row at all.

# T outputs, k picks per output, P rows, c columns
"""

import pytest
import torch

from kernelbase.backend import INTERPRETER_ON as INTERPRETING
from moeblaze.kernels.gather_sum import launch_gather_sum
from moeblaze.reference import gather_sum_torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _case(num_out, top_k, num_rows, num_cols, dtype, seed, dropped=0.25):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_rows, num_cols, generator=g).to(dtype)
    index = torch.randint(0, max(num_rows, 1), (num_out, top_k), generator=g, dtype=torch.int32)
    index[torch.rand(index.shape, generator=g) < dropped] = -1
    if num_rows == 0:
        index.fill_(-1)
    return rows, index


def _loop(rows, index):
    """float64, one output at a time."""
    out = torch.zeros(index.shape[0], rows.shape[1], dtype=torch.float64)
    for t in range(index.shape[0]):
        for r in index[t].tolist():
            if r >= 0:
                out[t] += rows[r].double()
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "num_out, top_k, num_rows, num_cols",
    [
        (37, 4, 90, 200),  # 200 columns in a block of 256: a masked tail
        (600, 1, 600, 1),  # one column (routing weights), one pick: many outputs per program
        (5, 8, 3, 24),  # rows picked more than once
        (0, 2, 7, 16),  # no output
        (6, 3, 0, 40),  # no row: every pick is -1
    ],
)
def test_matches_the_reference_bit_for_bit(num_out, top_k, num_rows, num_cols, dtype):
    rows, index = _case(num_out, top_k, num_rows, num_cols, DTYPES[dtype], seed=num_out + top_k)
    out = launch_gather_sum(rows, index)
    expected = gather_sum_torch(rows, index)
    assert out.dtype == rows.dtype and out.shape == (num_out, num_cols)
    if rows.dtype == torch.bfloat16 and INTERPRETING:  # it truncates fp32 -> bf16: 1 ulp
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, expected)  # NaN-poisoned output: every element written
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[rows.dtype]
    torch.testing.assert_close(out.double(), _loop(rows, index), rtol=tolerance, atol=tolerance)


def test_int64_index_and_strided_rows():
    """An int64 index, and rows that are a column slice of a wider tensor (row stride != c)."""
    rows, index = _case(19, 3, 25, 48, torch.float32, seed=3)
    wide = torch.randn(25, 80)
    wide[:, 16:64] = rows
    strided = wide[:, 16:64]
    assert strided.stride(0) == 80
    out = launch_gather_sum(strided, index.long())
    assert torch.equal(out, gather_sum_torch(rows, index))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cuda_matches_the_reference_bit_for_bit(dtype):
    """Compiled for the GPU, at expert parallelism's shape (qwen3: T = 16384 tokens, k = 8,
    d = 2048, a quarter of the slots dropped) and for the routing weights' one column."""
    for num_out, top_k, num_cols in ((16384, 8, 2048), (131072, 1, 1)):
        rows, index = _case(num_out, top_k, num_out * top_k, num_cols, DTYPES[dtype], seed=5)
        rows, index = rows.cuda(), index.cuda()
        out = launch_gather_sum(rows, index)
        assert torch.equal(out, gather_sum_torch(rows, index)), (num_out, top_k, num_cols)
