"""Worlds: the ranks of a tensor-parallel group and the way bytes move between them.

# W ranks, m rows per rank shard, M = W*m rows, K inner (AG), n local columns (AG),
# k local inner (RS), N columns (RS), CH rows per chunk

Every world has the same interface, used by `overlap.ops`:

    world.all_gather_matmul(a_shard, b)      -> (c, gathered)   c = AllGather(a_shard) @ b
    world.matmul_reduce_scatter(a, b)        -> c_shard          ReduceScatter_rows(a @ b)
    world.all_reduce(x)                      -> sum over ranks (plain collective, no overlap)

and runs each call with one of three schedules (`Mode`), chosen per call: the one given to the
constructor, or, with `mode=None`, `SERIAL` below `OverlapConfig.min_overlap_flops` (overlap
costs more than it saves on small GEMMs) and above it the schedule measured to win at that size
on this kind of world and GPU (`overlap.tuning`): FUSED where the world can run it and it won
(or from `OverlapConfig.fused_min_flops`), else PIPELINED where it won, else SERIAL; where
nothing was measured, the world's `unmeasured_mode`.

    SERIAL     the collective, then one GEMM (the baseline)
    PIPELINED  rows cut into chunks; the collective of one chunk overlaps the GEMM of another
               (stream-level overlap, as PyTorch's async TP decomposes it)
    FUSED      one persistent Triton GEMM per rank that walks its tiles in chunk-arrival order
               and waits on per-chunk flags (overlap.kernels); its state lives in the world's
               fused context (overlap.fused), `world.fused`, None where FUSED cannot run

Each world (`overlap.local_world.LocalWorld`, `overlap.dist_world.DistWorld`) writes the serial
and pipelined schedules and builds its fused context; `World` maps modes to them.
"""

import abc
import dataclasses
import enum

import torch

from kernelbase.checks import check_bool, check_int, check_number, check_real
from kernelbase.gemm import GemmConfig
from kernelbase.profiling import profile_range
from overlap import handles, tuning
from overlap.protocol import ChunkLayout
from overlap.streams import SideStream

# Per-rank GEMM FLOPs (2 * rows * inner * columns) below which mode=None runs SERIAL.
# Placeholder until measured on a GPU: PyTorch's async-TP benchmark has the decomposed overlap
# slower than none at M=2048 on 8xH100 (354 vs 301 us), i.e. near 2*2048*8192*3584 = 1.2e11.
OVERLAP_MIN_FLOPS = 1e11


class Mode(enum.Enum):
    SERIAL = "serial"
    PIPELINED = "pipelined"
    FUSED = "fused"


@dataclasses.dataclass(frozen=True)
class OverlapConfig:
    """Knobs of a world. Defaults are placeholders until measured on a GPU (bench/overlap.py)."""

    chunk_m: int | None = None  # rows per chunk of a rank's shard; None: DEFAULT_CHUNK_ROWS
    tile: GemmConfig | None = None  # GEMM tiles; None: overlap.fused.default_tile_config
    # The fused GEMMs read their operands through tensor descriptors (the copy engine, TMA, on
    # Hopper and later GPUs; under the interpreter too) where the tile config (GemmConfig.tma)
    # and the matrices allow it (unit stride along rows, 16-byte aligned rows); False, or an
    # older GPU: pointer loads, software-pipelined async copies, whatever the tile says
    # (compare: bench.overlap --tiles ...:ptr).
    tma: bool = True
    timeout_s: float = 10.0  # bound on every flag wait of the fused kernels
    # Read the kernels' status words after every fused call. On CUDA that synchronises the
    # host with the device; with False, call `world.check_status()` yourself.
    sync_status: bool = True
    free_sms: int | None = None  # SMs the AG consumer leaves free; None: 0 with stream writes
    comm_programs: int | None = None  # programs of the RS reduction; None: FusedContext.reduce_plan
    min_overlap_flops: float = OVERLAP_MIN_FLOPS
    # Per-rank FLOPs from which mode=None runs FUSED (where the world can); None: the measured
    # table of overlap.tuning, which has no entry (fused never picked) where fused did not win.
    fused_min_flops: float | None = None
    count_tiles: bool = False  # fused path: count computations per output tile (tests)
    # DistWorld, serial and pipelined: compare every rank's call (op, shapes, dtype, chunking)
    # before the collectives, so ranks that disagree raise OverlapMismatchError instead of
    # aborting or hanging in the backend. One tiny all-gather, read on the host: None checks
    # where that costs no synchronisation (CPU tensors, gloo); True everywhere (debugging on
    # CUDA); False never. The fused path always checks, on the device.
    check_ranks: bool | None = None

    def __post_init__(self):
        for name, minimum in (("chunk_m", 1), ("free_sms", 0), ("comm_programs", 0)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum)
        check_real("timeout_s", self.timeout_s)
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        check_number("min_overlap_flops", self.min_overlap_flops)
        if self.fused_min_flops is not None:
            check_number("fused_min_flops", self.fused_min_flops)
        for name in ("tma", "sync_status", "count_tiles"):
            check_bool(name, getattr(self, name))
        if self.check_ranks is not None:
            check_bool("check_ranks", self.check_ranks)
        if self.tile is not None and not isinstance(self.tile, GemmConfig):
            raise TypeError(f"tile must be None or a GemmConfig, got {type(self.tile).__name__}")


def parse_mode(mode) -> Mode | None:
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
        self.mode = parse_mode(mode)
        self.config = config or OverlapConfig()
        self.handle = handles.register(self)  # what the torch.library ops take (overlap.ops)
        self.streams = SideStream(device)
        #: The fused context (overlap.fused.FusedContext), None where FUSED cannot run.
        self.fused, why_not = self._make_fused()
        if self.mode is Mode.FUSED and self.fused is None:
            raise ValueError(f"{type(self).__name__} mode='fused' is unavailable: {why_not}")

    def __repr__(self) -> str:
        mode = self.mode.value if self.mode else "auto"
        return f"{type(self).__name__}(world_size={self.world_size}, device={self.device}, mode={mode})"

    @property
    def fused_available(self) -> bool:
        """True when this world can run the FUSED schedule (mode=None picks it where it was
        measured to win: see `mode_for`)."""
        return self.fused is not None

    # -- the interface -------------------------------------------------------------------------

    def all_gather_matmul(self, a_shard: torch.Tensor, b: torch.Tensor):
        """(c, gathered): c = AllGather(a_shard) @ b; gathered = AllGather(a_shard) [W*m, K]."""
        m, k, n = a_shard.shape[-2], a_shard.shape[-1], b.shape[-1]
        mode = self.mode_for(2 * self.world_size * m * k * n, m * k * n, "all_gather_matmul")
        all_gather_matmul, _ = self._schedules(mode)
        with profile_range(f"overlap.all_gather_matmul.{mode.value}"):
            return all_gather_matmul(a_shard.contiguous(), b)

    def matmul_reduce_scatter(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """c_shard = rows of this rank of the sum over ranks of a @ b."""
        M, k, N = a.shape[-2], a.shape[-1], b.shape[-1]
        mode = self.mode_for(2 * M * k * N, M * k * N, "matmul_reduce_scatter")
        _, matmul_reduce_scatter = self._schedules(mode)
        with profile_range(f"overlap.matmul_reduce_scatter.{mode.value}"):
            return matmul_reduce_scatter(a.contiguous(), b)

    @abc.abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, on every rank (a new tensor)."""

    def mode_for(self, flops: float, numel: int = 1, op: str = "all_gather_matmul") -> Mode:
        """The schedule of a call of `op` with `flops` per-rank GEMM FLOPs (numel 0: SERIAL)."""
        if numel == 0:
            return Mode.SERIAL
        if self.mode is not None:
            return self.mode
        if flops < self.config.min_overlap_flops:
            return Mode.SERIAL
        fused_from = self.config.fused_min_flops
        if fused_from is None:
            fused_from = self._measured(tuning.FUSED_FROM_FLOPS, op)
        if self.fused_available and fused_from is not None and flops >= fused_from:
            return Mode.FUSED
        pipelined_from = self._measured(tuning.PIPELINED_FROM_FLOPS, op)
        if pipelined_from is None:
            return self.unmeasured_mode
        return Mode.PIPELINED if flops >= pipelined_from else Mode.SERIAL

    @property
    def unmeasured_mode(self) -> Mode:
        """What mode=None runs above `min_overlap_flops` where `overlap.tuning` has no PIPELINED
        entry for this world, GPU and op: PIPELINED, which hides the transfers of all but the
        first chunk behind GEMMs."""
        return Mode.PIPELINED

    @property
    def tuning_key(self) -> str | None:
        """The world column of `overlap.tuning`'s tables (None: they do not apply)."""
        return type(self).__name__

    def _measured(self, table, op: str) -> float | None:
        key = self.tuning_key
        return None if key is None else tuning.from_flops(table, key, self.device, op)

    def chunk_layout(self, m: int) -> ChunkLayout:
        """How the pipelined and fused schedules cut a rank's m rows into chunks."""
        return ChunkLayout.of(m, self.config.chunk_m)

    def check_status(self) -> None:
        """Raise OverlapTimeoutError if a fused kernel of this world timed out since the last
        check. Needed only with `OverlapConfig(sync_status=False)` on CUDA."""
        if self.fused is not None:
            self.fused.check_status()

    # -- the schedules ---------------------------------------------------------------------------

    def _schedules(self, mode: Mode):
        """(all_gather_matmul, matmul_reduce_scatter) of `mode`."""
        return {
            Mode.SERIAL: (self._ag_serial, self._rs_serial),
            Mode.PIPELINED: (self._ag_pipelined, self._rs_pipelined),
            Mode.FUSED: (self._ag_fused, self._rs_fused),
        }[mode]

    @abc.abstractmethod
    def _make_fused(self):
        """(fused context, None) where FUSED can run, else (None, the reason it cannot)."""

    @abc.abstractmethod
    def _ag_serial(self, a_shard: torch.Tensor, b: torch.Tensor): ...

    @abc.abstractmethod
    def _ag_pipelined(self, a_shard: torch.Tensor, b: torch.Tensor): ...

    def _ag_fused(self, a_shard: torch.Tensor, b: torch.Tensor):
        return self.fused.all_gather_matmul(a_shard, b)

    @abc.abstractmethod
    def _rs_serial(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _rs_pipelined(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    def _rs_fused(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fused.matmul_reduce_scatter(a, b)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions over ranks accumulate in."""
    return torch.float64 if dtype == torch.float64 else torch.float32
