"""Host side of the flag protocol: chunks and their walk, raising flags, the wait budget, status
words and the timeout error. The device side is overlap.kernels.flags.

# W ranks, m rows per rank shard, CH rows per chunk

How a producer raises a flag (after the chunk's copy, on the same stream):

- CPU (kernels under the Triton interpreter): a plain store; the producer has finished before the
  consumer kernel is launched, because the interpreter runs a launch's programs one by one.
- CUDA: `torch.ops.symm_mem.stream_write_value32_`, PyTorch's wrapper of the driver's
  `cuStreamWriteValue32` (the op PyTorch's own async-TP matmul uses for its chunk signals). A
  stream memory write needs no SM, so it cannot be starved by a persistent consumer occupying
  every SM, and the driver orders it after the preceding copy with a memory barrier. While a
  CUDA graph is being captured, `memset32_` (a memset node) is used instead, as PyTorch does.
  Where those ops are missing (a torch without distributed support), a one-program Triton kernel
  raises the flag; it needs an SM, so then the worlds keep `FALLBACK_FREE_SMS` SMs free of the
  persistent consumer (see `OverlapConfig.free_sms`).

The wait budget: compiled kernels read the GPU's nanosecond clock (`%globaltimer`), so a wait
ends after `timeout_s` of real time, `wait_budget = timeout_s * 1e9`; the interpreter has no
clock and counts polls, `wait_budget = timeout_s * INTERPRETER_POLLS_PER_SECOND`.
"""

import dataclasses
import functools
from collections.abc import Iterator

import torch
import triton

from kernelbase.backend import interpreting
from overlap.kernels.flags import launch_raise_flag

# Polls per second of `wait_flag` under the interpreter: measured on the development CPU (4000
# polls of a never-raised flag took 1.16 s).
INTERPRETER_POLLS_PER_SECOND = 3_500
# SMs left free of the persistent consumer when flags are raised by a kernel (no stream write).
FALLBACK_FREE_SMS = 2
EPOCH_LIMIT = 2**31 - 1
# Rows per chunk when OverlapConfig.chunk_m is None. Placeholder, not measured: 512 rows of a
# K=8192 bf16 shard are 8 MiB, a few microseconds of copy, well above per-copy overheads.
DEFAULT_CHUNK_ROWS = 512


class OverlapTimeoutError(RuntimeError):
    """A fused kernel waited on a chunk's flag longer than the world's timeout.

    Attributes: op, rank (the waiting rank), peer (the rank the chunk comes from), chunk (its
    index among that peer's chunks for this rank) and rows (its half-open row range).
    """

    def __init__(
        self,
        op: str,
        rank: int,
        peer: int,
        chunk: int,
        rows: tuple[int, int],
        timeout_s: float,
        wait_budget: int,
    ):
        self.op, self.rank, self.peer, self.chunk, self.rows = op, rank, peer, chunk, rows
        super().__init__(
            f"{op}: rank {rank} timed out waiting for chunk {chunk} (rows {rows[0]}..{rows[1]}) "
            f"from rank {peer}: its flag was not raised within {timeout_s:g} s "
            f"(wait budget {wait_budget}). The producer of that chunk failed or "
            f"is starved; raise OverlapConfig.timeout_s only if the producer is merely slow."
        )


def wait_budget_for(timeout_s: float) -> int:
    """The `wait_budget` of the flag waits (overlap.kernels.flags.wait_flag) for `timeout_s`."""
    if interpreting():
        return max(1, min(2**31 - 1, int(timeout_s * INTERPRETER_POLLS_PER_SECOND)))
    return max(1, min(2**62, int(timeout_s * 1e9)))


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How one rank's m rows are cut into chunks of `chunk_m` rows (the last may be shorter)."""

    m: int
    chunk_m: int

    @classmethod
    def of(cls, m: int, chunk_m: int | None) -> "ChunkLayout":
        """m rows in chunks of `chunk_m` rows (None: DEFAULT_CHUNK_ROWS), at least 1, at most m."""
        return cls(m, max(1, min(chunk_m or DEFAULT_CHUNK_ROWS, m)))

    @property
    def count(self) -> int:
        return triton.cdiv(self.m, self.chunk_m)

    def rows(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_m, min((chunk + 1) * self.chunk_m, self.m)


def peer_chunks(rank: int, world_size: int, layout: ChunkLayout) -> Iterator[tuple[int, int]]:
    """(src, chunk) of every peer's chunk in arrival order: the peers in rotated order
    (rank + 1, rank + 2, ...), each peer's chunks first to last. The fused AG-GEMM walks its
    tiles in this order, the producers bring chunks in it."""
    for step in range(1, world_size):
        src = (rank + step) % world_size
        for chunk in range(layout.count):
            yield src, chunk


def check_status(
    status: torch.Tensor,
    *,
    op: str,
    rank: int,
    layout: ChunkLayout,
    timeout_s: float,
    wait_budget: int,
) -> None:
    """Raise OverlapTimeoutError if a kernel recorded a timeout in `status` (then clear it).

    status[0] = 1 + flag index (peer_or_dest * chunks + chunk), status[1] = the peer rank.
    Reading it synchronises with the device on CUDA.
    """
    code, peer = (int(v) for v in status.tolist())
    if code == 0:
        return
    status.zero_()
    chunk = (code - 1) % layout.count
    raise OverlapTimeoutError(op, rank, peer, chunk, layout.rows(chunk), timeout_s, wait_budget)


@functools.cache
def _stream_write_ops():
    """(stream_write_value32_, memset32_) from torch's symmetric-memory library, or None."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401  (registers torch.ops.symm_mem)

        ops = torch.ops.symm_mem
        return ops.stream_write_value32_, ops.memset32_
    except (ImportError, AttributeError, RuntimeError):
        return None


def has_stream_write(device: torch.device) -> bool:
    """True when flags on `device` are raised by stream memory writes (no SM needed)."""
    return device.type == "cuda" and _stream_write_ops() is not None


def raise_flag(flags: torch.Tensor, index: int, epoch: int) -> None:
    """Set flags[index] = epoch after the work already queued on the current stream."""
    if flags.device.type != "cuda":
        flags[index] = epoch
        return
    ops = _stream_write_ops()
    if ops is None:
        launch_raise_flag(flags, index, epoch)
    elif torch.cuda.is_current_stream_capturing():
        ops[1](flags.view(torch.uint32), index, epoch, 1)
    else:
        ops[0](flags.view(torch.uint32), index, epoch)
