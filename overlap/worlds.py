"""Worlds: the ranks of a tensor-parallel group and the way bytes move between them.

# W ranks, m rows per rank shard, M = W*m rows, K inner (AG), n local columns (AG),
# k local inner (RS), N columns (RS), CH rows per chunk

Every world has the same interface, used by `overlap.ops`:

    world.all_gather_matmul(a_shard, b)      -> (c, gathered)   c = AllGather(a_shard) @ b
    world.matmul_reduce_scatter(a, b)        -> c_shard          ReduceScatter_rows(a @ b)
    world.all_reduce(x)                      -> sum over ranks (plain collective, no overlap)

and runs each call with one of three schedules (`Mode`), chosen per call: the one given to the
constructor, or, with `mode=None`, `SERIAL` below `OverlapConfig.min_overlap_flops` (overlap
costs more than it saves on small GEMMs) and the world's overlapped schedule above it.

    SERIAL     the collective, then one GEMM (the baseline)
    PIPELINED  rows cut into chunks; the collective of one chunk overlaps the GEMM of another
               (stream-level overlap, as PyTorch's async TP decomposes it)
    FUSED      one persistent Triton GEMM per rank that walks its tiles in chunk-arrival order
               and waits on per-chunk flags (overlap.kernels)

`LocalWorld(W, device)`: W virtual ranks in one process on one device; every per-rank tensor
carries a leading [W] dim (a_shard [W, m, K], b [W, K, n] -> c [W, W*m, n]). Each rank's gather
buffer, flags, status word, partial-product buffer and tile counters are separate allocations,
reached only through that rank's own pointers (or, for peers, a table of their addresses), so
the fused path runs exactly the kernels and flag protocol a multi-GPU world would:

    AG  producer (side stream on CUDA): for each peer in rotated order, copy each chunk of the
        peer's shard into the rank's gather buffer, then raise the chunk's flag (a stream memory
        write: overlap.flags). Consumer: ag_gemm_kernel, launched without waiting for the copies.
    RS  producer: gemm_rs_kernel per rank (tiles for the next peer first; counters raise the
        chunk flags). Consumer (side stream on CUDA, `comm_programs` programs, the GEMM grid
        leaves those SMs free): rs_reduce_kernel per rank, reading the W partial buffers.

On the CPU the kernels run under the Triton interpreter, which runs a launch's programs one after
another: there every producer finishes before its consumer is launched, so the flags are all up
when the consumer polls them; the protocol (and its timeout) is still exercised.

`DistWorld(group)`: one rank per process over a torch.distributed group (gloo on CPU, NCCL on
GPUs); per-rank tensors have no rank dim. SERIAL and PIPELINED are implemented over the plain
collectives (`all_gather_single` / `reduce_scatter_single`), issued asynchronously on a side
stream. FUSED (copy-engine pulls from peers' symmetric-memory buffers, flags in symmetric memory,
the same kernels) is not implemented: it needs several GPUs on one node (NCCL and CUDA IPC refuse
two ranks on one GPU), which this code has never run on, and untested multi-GPU synchronisation
code is worse than none. Asking for it raises NotImplementedError; `mode=None` never picks it.
"""

import abc
import contextlib
import dataclasses
import enum
import itertools
import weakref

import torch
import torch.distributed as dist
import triton

from moeblaze._device import triton_runs_on
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
from overlap.kernels.ag_gemm import ag_gemm_tiles, launch_ag_gemm
from overlap.kernels.common import TileConfig, default_tile_config
from overlap.kernels.gemm_rs import gemm_rs_tiles, launch_gemm_rs, launch_rs_reduce

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

    def __init__(self, world_size: int, device: torch.device, mode, config: OverlapConfig | None):
        if config is not None and not isinstance(config, OverlapConfig):
            raise TypeError(f"config must be an OverlapConfig, got {type(config).__name__}")
        self.world_size = world_size
        self.device = device
        self.mode = _parse_mode(mode)
        self.config = config or OverlapConfig()
        self.handle = next(_HANDLES)
        _WORLDS[self.handle] = self

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

    @abc.abstractmethod
    def check_status(self) -> None:
        """Raise OverlapTimeoutError if a fused kernel of this world timed out since the last
        check. Needed only with `OverlapConfig(sync_status=False)` on CUDA."""

    # -- implemented by each world ---------------------------------------------------------------

    @abc.abstractmethod
    def _overlap_mode(self) -> Mode: ...

    @abc.abstractmethod
    def _schedule(self, mode: Mode):
        """(all_gather_matmul, matmul_reduce_scatter) implementations of `mode`."""

    def _chunk_layout(self, m: int) -> ChunkLayout:
        chunk_m = self.config.chunk_m or DEFAULT_CHUNK_ROWS
        return ChunkLayout(m, max(1, min(chunk_m, m)))


# ---------------------------------------------------------------------------------------------
# LocalWorld


@dataclasses.dataclass
class _RSWorkspace:
    """Per-rank buffers of the fused GEMM-RS, sized once per (M, N, dtype, chunks)."""

    key: tuple
    partials: list[torch.Tensor]  # W x [M, N], a's dtype
    counters: list[torch.Tensor]  # W x [W*cpr] int32
    flags: list[torch.Tensor]  # W x [W*cpr] int32
    partial_table: torch.Tensor  # [W] int64 addresses of partials
    flag_table: torch.Tensor  # [W] int64 addresses of flags


class LocalWorld(World):
    """W virtual ranks in one process on one device; per-rank tensors carry a leading [W] dim.

    Args:
        world_size: W >= 1.
        device: where the ranks live (default: the current CUDA device, else the CPU).
        mode: None (automatic), "fused", "pipelined" or "serial" (or a `Mode`). "fused" needs
            a CUDA device or the Triton interpreter (TRITON_INTERPRET=1) on the CPU.
        config: an `OverlapConfig`.
    """

    stacked_ranks = True

    def __init__(self, world_size: int, device=None, *, mode=None,
                 config: OverlapConfig | None = None):  # fmt: skip
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(world_size, device, mode, config)
        self.fused_available = triton_runs_on(device)
        if self.mode is Mode.FUSED and not self.fused_available:
            raise ValueError(
                f"mode='fused' needs a CUDA device or the Triton interpreter "
                f"(TRITON_INTERPRET=1 before importing overlap); device is {device}"
            )
        self.tile = self.config.tile or default_tile_config(device)
        self.max_spins = max_spins_for(self.config.timeout_s, device)
        self._epoch = 0
        self._status = [torch.zeros(2, dtype=torch.int32, device=device) for _ in range(world_size)]
        self._ag_flags: list[torch.Tensor] = []
        self._rs_workspace: _RSWorkspace | None = None
        self._side = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        #: Per rank, int32 [2, tiles] of the last fused GEMM (config.count_tiles only): row 0
        #: how often each output tile was computed, row 1 its position in the rank's walk.
        self.last_tile_counts: list[torch.Tensor] = []
        # Producer hook: tests replace it to drop a flag and exercise the timeout.
        self._raise_flag = raise_flag
        self._last_op, self._last_layout = "overlap", ChunkLayout(1, 1)  # for status messages

    def _overlap_mode(self) -> Mode:
        return Mode.FUSED if self.fused_available else Mode.PIPELINED

    def _schedule(self, mode: Mode):
        if mode is Mode.FUSED:
            return self._ag_fused, self._rs_fused
        if mode is Mode.PIPELINED:
            return self._ag_pipelined, self._rs_pipelined
        return self._ag_serial, self._rs_serial

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(0, dtype=_acc_dtype(x.dtype)).to(x.dtype)
        return total.unsqueeze(0).expand(x.shape).contiguous()

    def check_status(self) -> None:
        for rank, status in enumerate(self._status):
            check_status(status, op=self._last_op, rank=rank, layout=self._last_layout,
                         timeout_s=self.config.timeout_s, max_spins=self.max_spins)  # fmt: skip

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

    # -- fused ------------------------------------------------------------------------------------

    def _next_epoch(self) -> int:
        if self._epoch + 1 >= EPOCH_LIMIT:  # start over: no flag may hold a future epoch
            for flags in [*self._ag_flags, *self._rs_flags()]:
                flags.zero_()
            self._epoch = 0
        self._epoch += 1
        return self._epoch

    def _rs_flags(self) -> list[torch.Tensor]:
        return self._rs_workspace.flags if self._rs_workspace is not None else []

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
        if self.config.free_sms is not None:
            return self.config.free_sms
        return (
            0 if has_stream_write(self.device) or self.device.type != "cuda" else FALLBACK_FREE_SMS
        )

    def _tile_counts(self, num_tiles: int) -> list[torch.Tensor | None]:
        if not self.config.count_tiles:
            return [None] * self.world_size
        self.last_tile_counts = [
            torch.zeros(2, num_tiles, dtype=torch.int32, device=self.device)
            for _ in range(self.world_size)
        ]
        return self.last_tile_counts

    def _finish(self, op: str, layout: ChunkLayout) -> None:
        self._last_op, self._last_layout = op, layout
        if self.config.sync_status or self.device.type != "cuda":
            self.check_status()

    def _ag_fused(self, a_shard: torch.Tensor, b: torch.Tensor):
        W, m, K = a_shard.shape  # a_shard [W, m, K], b [W, K, n]
        n = b.shape[-1]
        layout = self._chunk_layout(m)
        epoch = self._next_epoch()
        if not self._ag_flags or self._ag_flags[0].numel() < W * layout.count:
            self._ag_flags = [
                torch.zeros(W * layout.count, dtype=torch.int32, device=self.device)
                for _ in range(W)
            ]
        out = torch.empty(W, W * m, n, dtype=a_shard.dtype, device=self.device)  # [W, M, n]
        gathered = [a_shard.new_empty(W * m, K) for _ in range(W)]  # W x [M, K]
        num_tiles = ag_gemm_tiles(m, n, W, self.tile)
        programs = self._programs(num_tiles, self._free_sms())
        counts = self._tile_counts(num_tiles)
        self._fork()
        for rank in range(W):
            with self._side_stream(), profile_range("overlap.ag.copy"):
                self._produce_ag(rank, a_shard, gathered[rank], self._ag_flags[rank], layout, epoch)
            with profile_range("overlap.ag.gemm"):
                launch_ag_gemm(
                    a_shard[rank], gathered[rank], b[rank], out[rank], self._ag_flags[rank],
                    self._status[rank], rank=rank, world_size=W, epoch=epoch,
                    max_spins=self.max_spins,
                    chunk_m=layout.chunk_m, config=self.tile, num_programs=programs,
                    tile_counts=counts[rank],
                )  # fmt: skip
        self._join()
        self._finish("all_gather_matmul", layout)
        return out, gathered[0]

    def _produce_ag(self, rank, a_shard, gathered, flags, layout: ChunkLayout, epoch) -> None:
        """Copy the peers' chunks into `rank`'s gather buffer in rotated order, flag each one."""
        W, m = self.world_size, layout.m
        for step in range(1, W):
            src = (rank + step) % W
            for chunk in range(layout.count):
                lo, hi = layout.rows(chunk)
                gathered[src * m + lo : src * m + hi].copy_(a_shard[src, lo:hi])
                self._raise_flag(flags, src * layout.count + chunk, epoch)
        # The local rows: the kernel reads them from the shard; the copy is for backward.
        gathered[rank * m : (rank + 1) * m].copy_(a_shard[rank])

    def _workspace_rs(self, M: int, N: int, dtype: torch.dtype, num_flags: int) -> _RSWorkspace:
        key = (M, N, dtype, num_flags)
        ws = self._rs_workspace
        if ws is not None and ws.key == key:
            return ws
        W, dev = self.world_size, self.device

        def table(tensors):
            return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=dev)

        partials = [torch.empty(M, N, dtype=dtype, device=dev) for _ in range(W)]
        counters = [torch.zeros(num_flags, dtype=torch.int32, device=dev) for _ in range(W)]
        flags = [torch.zeros(num_flags, dtype=torch.int32, device=dev) for _ in range(W)]
        self._rs_workspace = _RSWorkspace(key, partials, counters, flags, table(partials),
                                          table(flags))  # fmt: skip
        return self._rs_workspace

    def _reduce_plan(self, m: int, N: int) -> tuple[int, int, int, int]:
        """(programs, SMs the GEMM leaves them, BLOCK_R, BLOCK_N) of the RS reduction."""
        block_r, block_n = GPU_REDUCE_BLOCK if self.device.type == "cuda" else CPU_REDUCE_BLOCK
        items = triton.cdiv(m, block_r) * triton.cdiv(N, block_n)
        if self.device.type == "cuda":
            programs = min(items, self.config.comm_programs or DEFAULT_COMM_PROGRAMS)
            return programs, programs, block_r, block_n
        return min(items, self.tile.max_programs or items), 0, block_r, block_n

    def _rs_fused(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        W, M, _ = a.shape  # a [W, M, k], b [W, k, N]
        N, m = b.shape[-1], M // W
        layout = self._chunk_layout(m)
        ws = self._workspace_rs(M, N, a.dtype, W * layout.count)
        epoch = self._next_epoch()
        for counters in ws.counters:
            counters.zero_()
        out = torch.empty(W, m, N, dtype=a.dtype, device=self.device)  # [W, m, N]
        reduce_programs, reserve, block_r, block_n = self._reduce_plan(m, N)
        num_tiles = gemm_rs_tiles(m, N, W, self.tile)
        programs = self._programs(num_tiles, reserve)
        counts = self._tile_counts(num_tiles)
        self._fork()
        with profile_range("overlap.rs.gemm"):
            for rank in range(W):
                launch_gemm_rs(
                    a[rank], b[rank], ws.partials[rank], ws.counters[rank], ws.flags[rank],
                    rank=rank, world_size=W, epoch=epoch, chunk_m=layout.chunk_m,
                    config=self.tile, num_programs=programs, tile_counts=counts[rank],
                )  # fmt: skip
        # CPU: every producer above has finished. CUDA: the reductions run beside the GEMMs.
        with self._side_stream(), profile_range("overlap.rs.reduce"):
            for dest in range(W):
                launch_rs_reduce(
                    ws.partial_table, ws.flag_table, out[dest], self._status[dest], dest=dest,
                    world_size=W, row_stride=ws.partials[0].stride(0), epoch=epoch,
                    max_spins=self.max_spins, chunk_m=layout.chunk_m,
                    num_programs=reduce_programs, block_r=block_r, block_n=block_n,
                )  # fmt: skip
        self._join()
        self._finish("matmul_reduce_scatter", layout)
        return out

    # -- serial and pipelined (torch) ------------------------------------------------------------

    def _ag_serial(self, a_shard: torch.Tensor, b: torch.Tensor):
        W, m, K = a_shard.shape
        out = torch.empty(W, W * m, b.shape[-1], dtype=a_shard.dtype, device=self.device)
        gathered = []
        for rank in range(W):
            with profile_range("overlap.ag.copy"):
                buf = a_shard.new_empty(W * m, K)  # this rank's gather buffer
                buf.copy_(a_shard.view(W * m, K))
            with profile_range("overlap.ag.gemm"):
                torch.matmul(buf, b[rank], out=out[rank])
            gathered.append(buf)
        return out, gathered[0]

    def _rs_serial(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        W, M, _ = a.shape
        m = M // W
        acc = torch.zeros(W, m, b.shape[-1], dtype=_acc_dtype(a.dtype), device=self.device)
        for rank in range(W):
            with profile_range("overlap.rs.gemm"):
                partial = torch.matmul(a[rank], b[rank])  # [M, N], this rank's partial
            with profile_range("overlap.rs.reduce"):
                acc += partial.view(W, m, b.shape[-1])
        return acc.to(a.dtype)

    def _ag_pipelined(self, a_shard: torch.Tensor, b: torch.Tensor):
        W, m, K = a_shard.shape
        layout = self._chunk_layout(m)
        out = torch.empty(W, W * m, b.shape[-1], dtype=a_shard.dtype, device=self.device)
        gathered = [a_shard.new_empty(W * m, K) for _ in range(W)]
        self._fork()
        for rank in range(W):
            torch.matmul(a_shard[rank], b[rank], out=out[rank, rank * m : (rank + 1) * m])
            for step in range(1, W):
                src = (rank + step) % W
                for chunk in range(layout.count):
                    lo, hi = layout.rows(chunk)
                    rows = slice(src * m + lo, src * m + hi)
                    with self._side_stream():
                        gathered[rank][rows].copy_(a_shard[src, lo:hi])
                    self._wait(self._record(on_side=True), on_side=False)
                    torch.matmul(gathered[rank][rows], b[rank], out=out[rank, rows])
            with self._side_stream():
                gathered[rank][rank * m : (rank + 1) * m].copy_(a_shard[rank])
        self._join()
        return out, gathered[0]

    def _rs_pipelined(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        W, M, _ = a.shape
        m = M // W
        layout = self._chunk_layout(m)
        out = torch.empty(W, m, b.shape[-1], dtype=a.dtype, device=self.device)
        acc_dtype = _acc_dtype(a.dtype)
        for dest in range(W):
            for chunk in range(layout.count):
                lo, hi = layout.rows(chunk)
                # [W, rows, N]: every rank's partial products of this chunk of dest's rows
                parts = torch.matmul(a[:, dest * m + lo : dest * m + hi], b)
                event = self._record(on_side=False)
                with self._side_stream():
                    self._wait(event, on_side=True)
                    if self._side is not None:
                        parts.record_stream(self._side)
                    out[dest, lo:hi] = parts.sum(0, dtype=acc_dtype).to(a.dtype)
        self._join()
        return out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# DistWorld


def _collective(new_name: str, old_name: str):
    """torch >= 2.13 names (`*_single`) where present, else the older `*_into_tensor` names."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


class DistWorld(World):
    """One rank per process over a torch.distributed process group.

    Args:
        group: the process group (default: the default group, which must be initialised).
        mode: None (automatic: serial below the FLOP threshold, else pipelined), "pipelined" or
            "serial". "fused" raises NotImplementedError (see the module docstring).
        device: the device of this rank's tensors (default: the current CUDA device for NCCL,
            else the CPU).
        config: an `OverlapConfig` (chunk_m and min_overlap_flops are used).
    """

    stacked_ranks = False

    def __init__(self, group=None, mode=None, *, device=None,
                 config: OverlapConfig | None = None):  # fmt: skip
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistWorld needs an initialised torch.distributed process group")
        group = group if group is not None else dist.group.WORLD
        if _parse_mode(mode) is Mode.FUSED:
            raise NotImplementedError(
                "DistWorld mode='fused' (intra-node symmetric-memory peers, copy-engine "
                "producer, in-kernel flag waits) is not implemented: it needs several GPUs on one "
                "node and has never been run. Use mode='pipelined' or 'serial', or LocalWorld to "
                "run the fused kernels on one device."
            )
        if device is None:
            on_nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if on_nccl else "cpu"
        super().__init__(dist.get_world_size(group), torch.device(device), mode, config)
        self.group = group
        self.rank = dist.get_rank(group)
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._all_gather = _collective("all_gather_single", "all_gather_into_tensor")
        self._reduce_scatter = _collective("reduce_scatter_single", "reduce_scatter_tensor")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", rank={self.rank})"

    def _overlap_mode(self) -> Mode:
        return Mode.PIPELINED

    def _schedule(self, mode: Mode):
        if mode is Mode.PIPELINED:
            return self._ag_pipelined, self._rs_pipelined
        return self._ag_serial, self._rs_serial

    def check_status(self) -> None:
        """No fused kernels run in a DistWorld: nothing to check."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total, group=self.group)
        return total

    def _comm_stream(self):
        if self._side is None:
            return contextlib.nullcontext()
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._side)

    def _ag_serial(self, a_shard: torch.Tensor, b: torch.Tensor):
        m, K = a_shard.shape  # a_shard [m, K], b [K, n]
        gathered = a_shard.new_empty(self.world_size * m, K)  # [M, K]
        with profile_range("overlap.ag.collective"):
            self._all_gather(gathered, a_shard, group=self.group)
        with profile_range("overlap.ag.gemm"):
            return gathered @ b, gathered

    def _rs_serial(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        M = a.shape[0]  # a [M, k], b [k, N]
        with profile_range("overlap.rs.gemm"):
            partial = a @ b  # [M, N]
        out = partial.new_empty(M // self.world_size, b.shape[-1])  # [m, N]
        with profile_range("overlap.rs.collective"):
            self._reduce_scatter(out, partial, group=self.group)
        return out

    def _ag_pipelined(self, a_shard: torch.Tensor, b: torch.Tensor):
        W, (m, K) = self.world_size, a_shard.shape
        layout = self._chunk_layout(m)
        gathered = a_shard.new_empty(W * m, K)
        out = a_shard.new_empty(W * m, b.shape[-1])
        rows = [layout.rows(c) for c in range(layout.count)]
        bufs = [a_shard.new_empty(W * (hi - lo), K) for lo, hi in rows]  # [W*rows, K] each
        with self._comm_stream(), profile_range("overlap.ag.collective"):
            works = [
                self._all_gather(buf, a_shard[lo:hi], group=self.group, async_op=True)
                for buf, (lo, hi) in zip(bufs, rows, strict=True)
            ]
        for buf, work, (lo, hi) in zip(bufs, works, rows, strict=True):
            work.wait()
            chunk = buf.view(W, hi - lo, K)  # chunk rows of every rank
            with profile_range("overlap.ag.gemm"):
                gathered.view(W, m, K)[:, lo:hi] = chunk
                out.view(W, m, b.shape[-1])[:, lo:hi] = torch.matmul(chunk, b)
        return out, gathered

    def _rs_pipelined(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        W, M, k = self.world_size, a.shape[0], a.shape[1]
        m = M // W
        layout = self._chunk_layout(m)
        out = a.new_empty(m, b.shape[-1])  # [m, N]
        works, parts = [], []
        for chunk in range(layout.count):
            lo, hi = layout.rows(chunk)
            with profile_range("overlap.rs.gemm"):
                part = torch.matmul(a.view(W, m, k)[:, lo:hi], b)  # [W, rows, N]
            with self._comm_stream(), profile_range("overlap.rs.collective"):
                works.append(
                    self._reduce_scatter(out[lo:hi], part.view(W * (hi - lo), b.shape[-1]),
                                         group=self.group, async_op=True)
                )  # fmt: skip
            parts.append(part)  # alive until its collective has finished
        for work in works:
            work.wait()
        return out
