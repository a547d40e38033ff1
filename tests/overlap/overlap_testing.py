"""Helpers shared by the overlap tests: tolerances and random inputs (never zeros).

Comparisons go through the suite's one tolerance helper, tests/tolerance.py.
"""

import torch

# Relative norm error allowed against a float64 reference, per kernel dtype (bf16 results are
# held to tolerance.assert_bf16_close instead).
RTOL = {torch.float32: 1e-5}


def randn(*shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)
