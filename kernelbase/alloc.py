"""Output allocation for the launchers, with a switch that poisons fresh outputs for tests.

With `poison = True`, every output a launcher allocates is filled with NaN (floating) or a
large negative value (integer) before a kernel writes it, so an element no kernel wrote shows up
in the comparison against the reference instead of passing by luck on zeroed memory.
"""

import torch

poison = False


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison:
        out.fill_(float("nan") if dtype.is_floating_point else -(2**30))
    return out
