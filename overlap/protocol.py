"""Host side of the flag protocol: chunks and their walk, raising flags, the wait budget, status
words and the timeout error. The device side is overlap.kernels.flags.

# W ranks, m rows per rank shard, CH rows per chunk

How a producer raises a flag (after the chunk's copy, on the same stream; `raise_flags` raises a
run of them in one operation, as a LocalWorld's producer does after one copy of all the rows):

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

from kernelbase.backend import interpreting
from kernelbase.intmath import cdiv
from overlap.kernels.flags import HEADER_WORDS as _HEADER_WORDS
from overlap.kernels.flags import SLOT_WORDS as _SLOT_WORDS
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


# int32 words of a rank's header: two slots [epoch, signature(...)], call e in slot e % 2
# (overlap.kernels.flags).
HEADER_WORDS = _HEADER_WORDS.value
SLOT_WORDS = _SLOT_WORDS.value
# The calls a header can describe, and the dtypes (1-based: a zero header describes nothing).
OPS = ("all_gather_matmul", "matmul_reduce_scatter")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DIMS = {"all_gather_matmul": ("m", "K", "n"), "matmul_reduce_scatter": ("M", "k", "N")}


def signature(
    op: str, dims: tuple[int, int, int], dtype: torch.dtype, chunk_m: int, world_size: int
) -> tuple[int, ...]:
    """The call a rank publishes in its header (SLOT_WORDS - 1 int32 words): what every rank
    of a DistWorld must agree on before any of them reads another's memory."""
    return (OPS.index(op) + 1, *dims, DTYPES.index(dtype) + 1, chunk_m, world_size)


def header_slot(header: torch.Tensor, epoch: int) -> torch.Tensor:
    """The [SLOT_WORDS] slot of `header [HEADER_WORDS]` where call `epoch` is published."""
    first = (epoch % 2) * SLOT_WORDS
    return header[first : first + SLOT_WORDS]


def describe_signature(words) -> str:
    """`signature(...)` in words, for error messages."""
    op, d0, d1, d2, dtype, chunk_m, world_size = (int(w) for w in words)
    if not 1 <= op <= len(OPS) or not 1 <= dtype <= len(DTYPES):
        return "no call of this epoch"
    dims = ", ".join(f"{n}={v}" for n, v in zip(DIMS[OPS[op - 1]], (d0, d1, d2), strict=True))
    dtype_name = str(DTYPES[dtype - 1]).removeprefix("torch.")
    return f"{OPS[op - 1]}({dims}, {dtype_name}, chunk_m={chunk_m}, world_size={world_size})"


class OverlapMismatchError(ValueError):
    """Ranks of a world made different calls (op, shapes, dtype, chunking, world size).

    Attributes: op, rank (this rank), peer (the first rank found to differ), mine, theirs (the
    calls as `describe_signature` words; theirs is None where it could not be read).
    """

    def __init__(
        self, op: str, rank: int, peer: int, mine: str, theirs: str | None, detail: str = ""
    ):
        self.op, self.rank, self.peer, self.mine, self.theirs = op, rank, peer, mine, theirs
        what = f"rank {peer} {theirs}" if theirs else detail or f"rank {peer}'s call is unknown"
        super().__init__(
            f"{op}: rank {rank} and rank {peer} made different calls: rank {rank} {mine}, "
            f"{what}. Every rank of a world must make the same calls with the same shapes, "
            f"dtype and chunking, in the same order; nothing laid out for another call was read "
            f"from rank {peer}'s memory."
        )


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
        return cdiv(self.m, self.chunk_m)

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
    mine: tuple[int, ...] = (),
    theirs=None,
) -> None:
    """Raise what a kernel recorded in `status` (then clear it): OverlapTimeoutError, or
    OverlapMismatchError when a peer made a different call.

    status[0] = 1 + flag index (peer_or_dest * chunks + chunk) for a timeout, MISMATCH (-1) for
    a different call; status[1] = the peer rank. `mine` is this rank's signature, `theirs(peer)`
    reads the peer's (or None). Reading the status synchronises with the device on CUDA.
    """
    code, peer = (int(v) for v in status.tolist())
    if code == 0:
        return
    status.zero_()
    if code < 0:
        peer_call = theirs(peer) if theirs is not None else None
        theirs_text = describe_signature(peer_call) if peer_call is not None else None
        raise OverlapMismatchError(op, rank, peer, describe_signature(mine), theirs_text)
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


def raise_flags(flags: torch.Tensor, epoch: int) -> None:
    """Set every flag of `flags` (a contiguous run) to `epoch` after the work already queued on
    the current stream, in one operation: a stream memset (`memset32_`) where torch has the
    stream memory ops, else a fill kernel."""
    if flags.numel() == 0:
        return
    ops = _stream_write_ops() if flags.device.type == "cuda" else None
    if ops is None:
        flags.fill_(epoch)
    else:
        ops[1](flags.view(torch.uint32), 0, epoch, flags.numel())


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
