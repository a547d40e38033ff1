"""Worlds: the ranks of a tensor-parallel group and the way bytes move between them.

# W ranks, m rows per rank shard, M = W*m rows, K inner (AG), n local columns (AG),
# k local inner (RS), N columns (RS), CH rows per chunk

Every world has the same interface, used by `overlap.ops`:

    world.all_gather_matmul(a_shard, b)      -> (c, gathered)   c = AllGather(a_shard) @ b
    world.matmul_reduce_scatter(a, b)        -> c_shard          ReduceScatter_rows(a @ b)
    world.all_reduce(x)                      -> sum over ranks (plain collective, no overlap)

and runs each call with one of three schedules (`Mode`), chosen per call: the one given to the
constructor, or, with `mode=None`, `SERIAL` below `OverlapConfig.min_overlap_flops` (overlap
costs more than it saves on small GEMMs) and the world's overlapped schedule above it (FUSED
where the world can run it, else PIPELINED).

    SERIAL     the collective, then one GEMM (the baseline)
    PIPELINED  rows cut into chunks; the collective of one chunk overlaps the GEMM of another
               (stream-level overlap, as PyTorch's async TP decomposes it)
    FUSED      one persistent Triton GEMM per rank that walks its tiles in chunk-arrival order
               and waits on per-chunk flags (overlap.kernels)

The worlds (`overlap.local_world.LocalWorld`, `overlap.dist_world.DistWorld`) subclass `World`,
which holds what their fused schedules share: the tile config, the wait budget, the side stream,
the call epochs, the persistent grid sizes and the status words.

On the CPU the kernels run under the Triton interpreter, which runs a launch's programs one after
another: there a producer in the same process finishes before its consumer is launched.
"""

import abc
import contextlib
import dataclasses
import enum
import itertools
import weakref

import torch
import triton

from moeblaze._profiling import profile_range
from overlap.flags import (
    EPOCH_LIMIT,
    FALLBACK_FREE_SMS,
    ChunkLayout,
    check_status,
    has_stream_write,
    max_spins_for,
    raise_flag,
)
from overlap.kernels.common import TileConfig, default_tile_config

# Per-rank GEMM FLOPs (2 * rows * inner * columns) below which mode=None runs SERIAL.
# Placeholder until measured on a GPU: PyTorch's async-TP benchmark has the decomposed overlap
# slower than none at M=2048 on 8xH100 (354 vs 301 us), i.e. near 2*2048*8192*3584 = 1.2e11.
OVERLAP_MIN_FLOPS = 1e11
# Rows per chunk when OverlapConfig.chunk_m is None. Placeholder, not measured: 512 rows of a
# K=8192 bf16 shard are 8 MiB, a few microseconds of copy, well above per-copy overheads.
DEFAULT_CHUNK_ROWS = 512
# Programs of the RS reduction on CUDA, which the RS GEMM leaves free. Placeholder.
DEFAULT_COMM_PROGRAMS = 16
# Reduction tile (rows x columns): GPU placeholder; CPU small so the interpreter stays quick.
GPU_REDUCE_BLOCK = (32, 256)
CPU_REDUCE_BLOCK = (16, 16)


class Mode(enum.Enum):
    SERIAL = "serial"
    PIPELINED = "pipelined"
    FUSED = "fused"


@dataclasses.dataclass(frozen=True)
class OverlapConfig:
    """Knobs of a world. Defaults are placeholders until measured on a GPU (bench/overlap.py)."""

    chunk_m: int | None = None  # rows per chunk of a rank's shard; None: DEFAULT_CHUNK_ROWS
    tile: TileConfig | None = None  # GEMM tiles; None: overlap.kernels.default_tile_config
    timeout_s: float = 10.0  # bound on every flag wait of the fused kernels
    # Read the kernels' status words after every fused call. On CUDA that synchronises the
    # host with the device; with False, call `world.check_status()` yourself.
    sync_status: bool = True
    free_sms: int | None = None  # SMs the AG consumer leaves free; None: 0 with stream writes
    comm_programs: int | None = None  # programs of the RS reduction; None: see DEFAULT_*
    min_overlap_flops: float = OVERLAP_MIN_FLOPS
    count_tiles: bool = False  # fused path: count computations per output tile (tests)

    def __post_init__(self):
        if self.chunk_m is not None and self.chunk_m < 1:
            raise ValueError(f"chunk_m must be >= 1 or None, got {self.chunk_m}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in ("free_sms", "comm_programs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")


_WORLDS: "weakref.WeakValueDictionary[int, World]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def world_from_handle(handle: int) -> "World":
    """The world registered under `handle` (how the torch.library ops find their world)."""
    try:
        return _WORLDS[handle]
    except KeyError:
        raise RuntimeError(
            f"no live overlap world has handle {handle}; keep a reference to the world for as "
            f"long as ops or layers use it"
        ) from None


def _parse_mode(mode) -> Mode | None:
    if mode is None or isinstance(mode, Mode):
        return mode
    try:
        return Mode(mode)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in Mode)
        raise ValueError(f"mode must be None or one of {choices}, got {mode!r}") from None


class World(abc.ABC):
    """A tensor-parallel group: see the module docstring for the interface and the modes."""

    #: True when per-rank tensors carry a leading [W] dim (all ranks in one process).
    stacked_ranks: bool
    #: True when this world can run the FUSED schedule (then mode=None picks it above the
    #: FLOP threshold, else PIPELINED).
    fused_available: bool

    def __init__(self, world_size: int, device: torch.device, mode, config: OverlapConfig | None):
        if config is not None and not isinstance(config, OverlapConfig):
            raise TypeError(f"config must be an OverlapConfig, got {type(config).__name__}")
        self.world_size = world_size
        self.device = device
        self.mode = _parse_mode(mode)
        self.config = config or OverlapConfig()
        self.handle = next(_HANDLES)
        _WORLDS[self.handle] = self
        # What the fused schedules share.
        self.tile = self.config.tile or default_tile_config(device)
        self.max_spins = max_spins_for(self.config.timeout_s, device)
        self._epoch = 0
        self._side = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        #: Per rank, int32 [2, tiles] of the last fused GEMM (config.count_tiles only): row 0
        #: how often each output tile was computed, row 1 its position in the rank's walk.
        self.last_tile_counts: list[torch.Tensor] = []
        # Producer hook: tests replace it to drop a flag and exercise the timeout.
        self._raise_flag = raise_flag
        self._last_op, self._last_layout = "overlap", ChunkLayout(1, 1)  # for status messages

    def __repr__(self) -> str:
        mode = self.mode.value if self.mode else "auto"
        return f"{type(self).__name__}(world_size={self.world_size}, device={self.device}, mode={mode})"

    # -- the interface -------------------------------------------------------------------------

    def all_gather_matmul(self, a_shard: torch.Tensor, b: torch.Tensor):
        """(c, gathered): c = AllGather(a_shard) @ b; gathered = AllGather(a_shard) [W*m, K]."""
        m, k, n = a_shard.shape[-2], a_shard.shape[-1], b.shape[-1]
        mode = self.mode_for(2 * self.world_size * m * k * n, m * k * n)
        with profile_range(f"overlap.all_gather_matmul.{mode.value}"):
            return self._schedule(mode)[0](a_shard.contiguous(), b)

    def matmul_reduce_scatter(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """c_shard = rows of this rank of the sum over ranks of a @ b."""
        M, k, N = a.shape[-2], a.shape[-1], b.shape[-1]
        mode = self.mode_for(2 * M * k * N, M * k * N)
        with profile_range(f"overlap.matmul_reduce_scatter.{mode.value}"):
            return self._schedule(mode)[1](a.contiguous(), b)

    @abc.abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, on every rank (a new tensor)."""

    def mode_for(self, flops: float, numel: int = 1) -> Mode:
        """The schedule of a call with `flops` per-rank GEMM FLOPs (numel 0: SERIAL)."""
        if numel == 0:
            return Mode.SERIAL
        if self.mode is not None:
            return self.mode
        return Mode.SERIAL if flops < self.config.min_overlap_flops else self._overlap_mode()

    def check_status(self) -> None:
        """Raise OverlapTimeoutError if a fused kernel of this world timed out since the last
        check. Needed only with `OverlapConfig(sync_status=False)` on CUDA."""
        for rank, status in self._status_words():
            check_status(status, op=self._last_op, rank=rank, layout=self._last_layout,
                         timeout_s=self.config.timeout_s, max_spins=self.max_spins)  # fmt: skip

    # -- implemented by each world ---------------------------------------------------------------

    def _overlap_mode(self) -> Mode:
        return Mode.FUSED if self.fused_available else Mode.PIPELINED

    def _schedule(self, mode: Mode):
        """(all_gather_matmul, matmul_reduce_scatter) implementations of `mode`: each world
        defines `_ag_<mode>` and `_rs_<mode>` for the three modes."""
        return getattr(self, f"_ag_{mode.value}"), getattr(self, f"_rs_{mode.value}")

    @abc.abstractmethod
    def _status_words(self) -> list[tuple[int, torch.Tensor]]:
        """(rank, int32 [2] status word) of every rank whose fused kernels run in this process."""

    @abc.abstractmethod
    def _zero_flags(self) -> None:
        """Set every flag this process owns to 0 (the epochs start over)."""

    def _chunk_layout(self, m: int) -> ChunkLayout:
        chunk_m = self.config.chunk_m or DEFAULT_CHUNK_ROWS
        return ChunkLayout(m, max(1, min(chunk_m, m)))

    # -- streams (no-ops on the CPU) -------------------------------------------------------------

    def _side_stream(self):
        return torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext()

    def _fork(self) -> None:
        """The side stream waits for the work queued so far on the current stream."""
        if self._side is not None:
            self._side.wait_stream(torch.cuda.current_stream(self.device))

    def _join(self) -> None:
        """The current stream waits for everything queued on the side stream."""
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)

    def _record(self, on_side: bool):
        """An event after the work queued so far on the side (or current) stream; None on CPU."""
        if self._side is None:
            return None
        event = torch.cuda.Event()
        event.record(self._side if on_side else torch.cuda.current_stream(self.device))
        return event

    def _wait(self, event, on_side: bool) -> None:
        if event is not None:
            (self._side if on_side else torch.cuda.current_stream(self.device)).wait_event(event)

    # -- fused: epochs, grids, status ------------------------------------------------------------

    def _pull_chunks(self, rank: int, shards, gathered: torch.Tensor, flags: torch.Tensor,
                     layout: ChunkLayout, epoch: int) -> None:  # fmt: skip
        """AG producer of `rank`: copy the peers' chunks into its gather buffer [W*m, K] in
        rotated order, raising each chunk's flag after its copy. `shards[p]` is rank p's
        [m, K] shard as this process sees it."""
        W, m = self.world_size, layout.m
        for step in range(1, W):
            src = (rank + step) % W
            for chunk in range(layout.count):
                lo, hi = layout.rows(chunk)
                gathered[src * m + lo : src * m + hi].copy_(shards[src][lo:hi])
                self._raise_flag(flags, src * layout.count + chunk, epoch)
        # The local rows: the kernel reads them from the shard; the copy is for backward.
        gathered[rank * m : (rank + 1) * m].copy_(shards[rank])

    def _next_epoch(self) -> int:
        if self._epoch + 1 >= EPOCH_LIMIT:  # start over: no flag may hold a future epoch
            self._zero_flags()
            self._epoch = 0
        self._epoch += 1
        return self._epoch

    def _programs(self, num_tiles: int, reserve: int) -> int:
        """Persistent grid: one program per SM left after `reserve` (CUDA), or per tile."""
        cap = num_tiles
        if self.device.type == "cuda":
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            cap = max(1, sms - reserve)
        if self.tile.max_programs is not None:
            cap = min(cap, self.tile.max_programs)
        return max(1, min(num_tiles, cap))

    def _free_sms(self) -> int:
        """SMs the AG consumer leaves free (for flag-raising kernels when there are no stream
        writes)."""
        if self.config.free_sms is not None:
            return self.config.free_sms
        return (
            0 if has_stream_write(self.device) or self.device.type != "cuda" else FALLBACK_FREE_SMS
        )

    def _reduce_plan(self, m: int, N: int) -> tuple[int, int, int, int]:
        """(programs, SMs the GEMM leaves them, BLOCK_R, BLOCK_N) of the RS reduction."""
        block_r, block_n = GPU_REDUCE_BLOCK if self.device.type == "cuda" else CPU_REDUCE_BLOCK
        items = triton.cdiv(m, block_r) * triton.cdiv(N, block_n)
        if self.device.type == "cuda":
            programs = min(items, self.config.comm_programs or DEFAULT_COMM_PROGRAMS)
            return programs, programs, block_r, block_n
        return min(items, self.tile.max_programs or items), 0, block_r, block_n

    def _tile_counts(self, ranks: int, num_tiles: int) -> list[torch.Tensor | None]:
        """Zeroed per-rank tile logs for `ranks` ranks when config.count_tiles, else Nones."""
        if not self.config.count_tiles:
            return [None] * ranks
        self.last_tile_counts = [
            torch.zeros(2, num_tiles, dtype=torch.int32, device=self.device) for _ in range(ranks)
        ]
        return self.last_tile_counts

    def _finish(self, op: str, layout: ChunkLayout) -> None:
        self._last_op, self._last_layout = op, layout
        if self.config.sync_status or self.device.type != "cuda":
            self.check_status()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions over ranks accumulate in."""
    return torch.float64 if dtype == torch.float64 else torch.float32
