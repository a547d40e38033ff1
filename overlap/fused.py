"""The state and shared machinery of a world's fused calls: `FusedContext`.

# W ranks, m rows per rank shard, K inner (AG), n local columns (AG), N columns (RS),
# CH rows per chunk

A world that can run the FUSED schedule builds one context with itself (as Triton-distributed
builds an AG-GEMM context once per layer), a subclass of `FusedContext` that owns everything a
fused call needs besides its inputs and implements the two fused schedules of its world:

    FusedContext (here)      tile config and operand loads (TMA), wait budget, the world's side stream, the call
                             epochs, one status word per rank whose kernels run in this process,
                             persistent grid sizes, tile logs, and one rank's launch of each
                             fused kernel (ag_gemm, rs_gemm, rs_reduce)
    LocalFused (local_world) the W ranks' flags, gather buffers and GEMM-RS workspaces; the AG
                             producer of one GPU (one copy, every flag raised at once)
    PeerFused (dist_world)   peer buffers (symmetric / shared memory), their address tables,
                             this rank's local flags and the AG chunk producer

A call: `epoch = next_epoch()`; producers and consumers are launched on the side and current
streams (the producer raising each chunk's flag to `epoch`, the consumer waiting for it); the
side stream is joined; `finish()` records what ran and, with `OverlapConfig.sync_status` (or
on the CPU), reads the status words, raising `OverlapTimeoutError` if a wait timed out.
"""

import abc
import dataclasses

import torch

from kernelbase.gemm import GemmConfig, tma_supported
from kernelbase.intmath import cdiv, next_power_of_2
from overlap.kernels.ag_gemm import launch_ag_gemm
from overlap.kernels.gemm_rs import launch_gemm_rs, launch_rs_reduce
from overlap.protocol import (
    EPOCH_LIMIT,
    FALLBACK_FREE_SMS,
    ChunkLayout,
    check_status,
    has_stream_write,
    header_slot,
    raise_flag,
    signature,
    wait_budget_for,
)
from overlap.streams import SideStream
from overlap.world import OverlapConfig

# GPU: the bf16 H100 tile of Triton's persistent matmul tutorial, 128x256x64 with 8 warps and 3
# stages: 232 (AG) and 244 (RS) registers, no spills, both operands pipelined in Triton 3.9's
# sm_90 build (tests/gpu_compile.py). Not yet measured: the H100 run of the issue notes (0.23 of
# cuBLAS for the AG-GEMM) had 128x256x32 with 4 stages and an unpipelined A operand.
# `bench.overlap --tiles` compares configs.
GPU_TILE_CONFIG = GemmConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
# float32 operands: three stages of the tile above need 262 KB of shared memory (an H100 block
# gets 227 KB: OutOfResources on an H100), and 128x256x32 spills 12 KB in the AG-GEMM's
# epilogue (Triton 3.6 sm_90 build).
GPU_TILE_CONFIG_FP32 = GemmConfig(block_m=64, block_n=128, block_k=16, num_warps=8, num_stages=3)
# CPU interpreter: the smallest tiles tl.dot accepts, a few programs so the persistent loop runs.
INTERPRETER_TILE_CONFIG = GemmConfig(
    block_m=16, block_n=16, block_k=16, group_m=2, num_warps=1, num_stages=1, max_programs=3
)
# Programs of the RS reduction on CUDA where it runs beside the RS GEMM, on as many SMs the GEMM
# leaves free. Placeholder.
DEFAULT_COMM_PROGRAMS = 16
# Programs per SM of the RS reduction where it runs after the GEMMs, on the whole GPU (a
# LocalWorld): 61 registers x 256 threads each leave room for four.
REDUCE_PROGRAMS_PER_SM = 4
# Elements the RS reduction loads per step over all W sources on CUDA, W blocks [rows, 256]:
# 32 KB of bf16 in flight per program (64 per thread of its 8 warps), so a block has fewer rows
# as W grows. Placeholder until measured (bench.overlap's comm_ms). CPU: small, so the
# interpreter stays quick.
GPU_REDUCE_ELEMENTS = 16384
GPU_REDUCE_COLUMNS = 256
CPU_REDUCE_BLOCK = (16, 16)


def reduce_block(device: torch.device, world_size: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_N) of the RS reduction of a world of `world_size` ranks on `device`."""
    if device.type != "cuda":
        return CPU_REDUCE_BLOCK
    sources = next_power_of_2(world_size)
    return max(1, GPU_REDUCE_ELEMENTS // (sources * GPU_REDUCE_COLUMNS)), GPU_REDUCE_COLUMNS


def default_tile_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> GemmConfig:
    """The GEMM tile when OverlapConfig.tile is None, by device and operand dtype."""
    if device.type != "cuda":
        return INTERPRETER_TILE_CONFIG
    return GPU_TILE_CONFIG_FP32 if dtype.itemsize == 4 else GPU_TILE_CONFIG


class FusedContext(abc.ABC):
    """What the fused calls of one world share; see the module docstring.

    `ranks` are the ranks whose kernels run in this process (all W for a LocalWorld, one for a
    DistWorld): each gets a status word.
    """

    # Memory scope of the GEMM-RS flags and counters: "sys" where other GPUs read them.
    scope = "gpu"
    # The RS reduction runs beside the GEMM, on SMs the GEMM leaves it (False: after the GEMMs,
    # on the whole GPU).
    reduce_beside_gemm = True
    # A LocalWorld's emulated link (overlap.link.EmulatedLink), if any.
    link = None

    def __init__(
        self,
        world_size: int,
        device: torch.device,
        config: OverlapConfig,
        streams: SideStream,
        ranks: list[int],
    ):
        self.world_size = world_size
        self.device = device
        self.config = config
        self.streams = streams
        self.tma = config.tma and tma_supported(device)
        # SMs of the GPU, which the persistent grids and the RS reduction are sized by.
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else None
        )
        self._tiles: dict[torch.dtype, GemmConfig] = {}  # tile_for's, by operand dtype
        self.tile = self.tile_for(torch.bfloat16)  # of 2-byte operands; tile_for: any dtype
        self.wait_budget = wait_budget_for(config.timeout_s)
        self.epoch = 0
        self.status = {rank: torch.zeros(2, dtype=torch.int32, device=device) for rank in ranks}
        #: Per rank, int32 [2, tiles] of the last fused GEMM (config.count_tiles only): row 0
        #: how often each output tile was computed, row 1 its position in the rank's walk.
        self.last_tile_counts: list[torch.Tensor] = []
        #: How producers raise a flag; tests replace it to drop a flag and exercise the timeout.
        self.raise_flag = raise_flag
        # The last call, for status messages: op, chunk layout, signature, epoch.
        self._last = ("overlap", ChunkLayout(1, 1), (), 0)
        self._signatures: dict[tuple[int, ...], torch.Tensor] = {}  # on the device, by value

    def tile_for(self, dtype: torch.dtype) -> GemmConfig:
        """The GEMM tile of a call on `dtype` operands: OverlapConfig.tile, else the default for
        the dtype; tile.tma: the GEMMs read operands through tensor descriptors (TMA: Hopper and
        later), as the tile config and OverlapConfig.tma both allow."""
        tile = self._tiles.get(dtype)
        if tile is None:
            tile = self.config.tile or default_tile_config(self.device, dtype)
            tile = self._tiles[dtype] = dataclasses.replace(tile, tma=tile.tma and self.tma)
        return tile

    # -- the fused schedules of the world ---------------------------------------------------------

    @abc.abstractmethod
    def all_gather_matmul(self, a_shard: torch.Tensor, b: torch.Tensor):
        """(c, gathered), as World.all_gather_matmul."""

    @abc.abstractmethod
    def matmul_reduce_scatter(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """c_shard, as World.matmul_reduce_scatter."""

    @abc.abstractmethod
    def zero_flags(self) -> None:
        """Set every flag this process owns to 0 (the epochs start over)."""

    # -- shared machinery -------------------------------------------------------------------------

    def chunk_layout(self, m: int) -> ChunkLayout:
        return ChunkLayout.of(m, self.config.chunk_m)

    def next_epoch(self) -> int:
        """The epoch of a new call; flags are zeroed first when the epochs would overflow."""
        if self.epoch + 1 >= EPOCH_LIMIT:  # start over: no flag may hold a future epoch
            self.zero_flags()
            self.epoch = 0
        self.epoch += 1
        return self.epoch

    # One rank's fused kernels (also timed alone by bench.overlap). `link_clock`: a LocalWorld's
    # emulated link (`self.link`).

    def ag_gemm(
        self,
        rank,
        a_local,
        gathered,
        b,
        out,
        flags,
        epoch,
        layout,
        programs,
        *,
        tile_counts=None,
        link_clock=None,
    ):
        """Rank `rank`'s AG-GEMM consumer: out [W*m, n] = the gathered rows [W*m, K] @ b [K, n],
        waiting on `flags` raised to `epoch`; its own rows `a_local` [m, K]. The flags are
        raised on this GPU (by its own pulls), so they are polled at GPU scope."""
        row_bytes = a_local.shape[1] * a_local.element_size()
        launch_ag_gemm(
            a_local,
            gathered,
            b,
            out,
            flags,
            self.status[rank],
            rank=rank,
            world_size=self.world_size,
            epoch=epoch,
            wait_budget=self.wait_budget,
            chunk_m=layout.chunk_m,
            config=self.tile_for(a_local.dtype),
            num_programs=programs,
            tile_counts=tile_counts,
            link_clock=link_clock,
            link_ns_per_row=self._link_ns_per_row(link_clock, row_bytes),
        )

    def rs_gemm(
        self,
        rank,
        a,
        b,
        partial,
        counters,
        flags,
        epoch,
        layout,
        programs,
        *,
        tile_counts=None,
        link_clock=None,
    ):
        """Rank `rank`'s GEMM-RS producer: partial [M, N] = a [M, k] @ b [k, N], raising `flags`
        to `epoch` as `counters` see each chunk's tiles done (at memory scope `self.scope`: the
        consumers may be other GPUs)."""
        row_bytes = b.shape[1] * a.element_size()
        launch_gemm_rs(
            a,
            b,
            partial,
            counters,
            flags,
            rank=rank,
            world_size=self.world_size,
            epoch=epoch,
            chunk_m=layout.chunk_m,
            config=self.tile_for(a.dtype),
            num_programs=programs,
            tile_counts=tile_counts,
            scope=self.scope,
            link_clock=link_clock,
            link_ns_per_row=self._link_ns_per_row(link_clock, row_bytes),
        )

    def rs_reduce(self, dest, partial_table, header_table, out, epoch, layout, *, link_clock=None):
        """Rank `dest`'s GEMM-RS consumer: out [m, N] = the sum of its rows of every rank's
        partial buffer (contiguous [M, N], addresses in `partial_table`), each chunk once the
        flag after the header at `header_table` is raised to `epoch`."""
        m, N = out.shape
        programs, _, block_r, block_n = self.reduce_plan(m, N)
        launch_rs_reduce(
            partial_table,
            header_table,
            out,
            self.status[dest],
            dest=dest,
            world_size=self.world_size,
            row_stride=N,
            epoch=epoch,
            wait_budget=self.wait_budget,
            chunk_m=layout.chunk_m,
            num_programs=programs,
            block_r=block_r,
            block_n=block_n,
            scope=self.scope,
            link_clock=link_clock,
        )

    def _link_ns_per_row(self, link_clock, row_bytes: int) -> float:
        return self.link.ns_per_row(row_bytes) if link_clock is not None else 0.0

    def programs(self, num_tiles: int, reserve: int) -> int:
        """Persistent grid: one program per SM left after `reserve` (CUDA), or per tile."""
        cap = num_tiles
        if self.num_sms is not None:
            cap = max(1, self.num_sms - reserve)
        if self.tile.max_programs is not None:
            cap = min(cap, self.tile.max_programs)
        return max(1, min(num_tiles, cap))

    def free_sms(self) -> int:
        """SMs the AG consumer leaves free (for flag-raising kernels without stream writes)."""
        if self.config.free_sms is not None:
            return self.config.free_sms
        if self.device.type != "cuda" or has_stream_write(self.device):
            return 0
        return FALLBACK_FREE_SMS

    def reduce_plan(self, m: int, N: int) -> tuple[int, int, int, int]:
        """(programs, SMs the GEMM leaves them, BLOCK_R, BLOCK_N) of the RS reduction: beside
        the GEMM `comm_programs` (DEFAULT_COMM_PROGRAMS) programs on as many SMs left free;
        after the GEMMs (`reduce_beside_gemm` False) REDUCE_PROGRAMS_PER_SM per SM, none left
        free."""
        block_r, block_n = reduce_block(self.device, self.world_size)
        items = cdiv(m, block_r) * cdiv(N, block_n)
        if self.device.type != "cuda":
            return min(items, self.tile.max_programs or items), 0, block_r, block_n
        if self.reduce_beside_gemm:
            programs = min(items, self.config.comm_programs or DEFAULT_COMM_PROGRAMS)
            return programs, programs, block_r, block_n
        programs = min(items, self.config.comm_programs or REDUCE_PROGRAMS_PER_SM * self.num_sms)
        return programs, 0, block_r, block_n

    def tile_counts(self, ranks: int, num_tiles: int) -> list[torch.Tensor | None]:
        """Zeroed per-rank tile logs for `ranks` ranks when config.count_tiles, else Nones."""
        if not self.config.count_tiles:
            return [None] * ranks
        self.last_tile_counts = [
            torch.zeros(2, num_tiles, dtype=torch.int32, device=self.device) for _ in range(ranks)
        ]
        return self.last_tile_counts

    def signature(
        self, op: str, dims: tuple[int, int, int], dtype: torch.dtype, layout: ChunkLayout
    ) -> tuple[int, ...]:
        """What this world's ranks publish for a call (protocol.signature)."""
        return signature(op, dims, dtype, layout.chunk_m, self.world_size)

    def publish(self, header: torch.Tensor, epoch: int, call: tuple[int, ...]) -> None:
        """Write `call` (a signature) into slot epoch % 2 of `header [HEADER_WORDS]`, then raise
        that slot's epoch word: the peers read the call only after they saw the epoch
        (overlap.kernels.flags)."""
        words = self._signatures.get(call)
        if words is None:
            words = torch.tensor(call, dtype=torch.int32).to(self.device)
            self._signatures[call] = words
        slot = header_slot(header, epoch)
        slot[1 : 1 + len(call)].copy_(words)
        self.raise_flag(slot, 0, epoch)

    def peer_signature(self, op: str, peer: int, epoch: int) -> list[int] | None:
        """The call `peer` published for `epoch` of `op`, where this process can read it (else
        None)."""
        return None

    def finish(self, op: str, layout: ChunkLayout, call: tuple[int, ...]) -> None:
        """End of a call: remember it for status messages; check the status words now where
        that is free (CPU) or asked for (`sync_status`)."""
        self._last = (op, layout, call, self.epoch)
        if self.config.sync_status or self.device.type != "cuda":
            self.check_status()

    def check_status(self) -> None:
        """Raise OverlapTimeoutError / OverlapMismatchError if a kernel recorded one since the
        last check."""
        op, layout, call, epoch = self._last
        for rank, status in self.status.items():
            check_status(
                status,
                op=op,
                rank=rank,
                layout=layout,
                timeout_s=self.config.timeout_s,
                wait_budget=self.wait_budget,
                mine=call,
                theirs=lambda peer: self.peer_signature(op, peer, epoch),
            )
