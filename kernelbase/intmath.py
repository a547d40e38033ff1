"""Integer helpers for launch grids and block sizes, on the host.

`triton.cdiv` and `triton.next_power_of_2` are `ConstexprFunction` objects since Triton 3.6, so
that kernels can call them too; from the host each call costs ~3 us (measured on a CPU), which
a launcher computing a grid pays on every op. These are the same integers in plain arithmetic.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
