"""LocalWorld: W virtual ranks of a tensor-parallel group in one process, on one device.

Every per-rank tensor carries a leading [W] dim (a_shard [W, m, K], b [W, K, n] -> c [W, W*m, n]).
Each rank's gather buffer, flags, status word, partial-product buffer and tile counters are
separate allocations, reached only through that rank's own pointers (or, for peers, a table of
their addresses), so the fused path runs exactly the kernels and flag protocol a multi-GPU world
would, and one GPU can test and time the mechanism (`LocalFused`):

    AG  producer (side stream on CUDA, `LocalFused.gather`): copy the W shards into the rank's
        gather buffer, then raise all of the call's chunk flags at once (a stream memset:
        overlap.protocol). Consumer: ag_gemm_kernel. On one GPU a device-to-device copy may
        itself be a kernel, which a persistent consumer occupying every SM would starve while
        spinning on the copy's flag (a deadlock until the timeout: the likely cause of the
        timeouts of back-to-back calls measured on an H100, not yet confirmed on one). So rank
        r's consumer is launched after rank r's copy on the stream; the copy of rank r+1
        overlaps it. With the consumer waiting for the whole copy anyway, chunk-by-chunk copies
        would only add launches (2 W cpr + 1 per rank: at W = 8 that producer took 1.4-3.9 ms
        per call on an H100, far more than its copies' bytes need). On several GPUs (DistWorld)
        the pulls are chunk by chunk, by the copy engines, and the consumer really waits on
        their flags.
    RS  producer: gemm_rs_kernel per rank (tiles for the next peer first; counters raise the
        chunk flags). Consumer: rs_reduce_kernel per rank, reading the W partial buffers. On
        one GPU the ranks' GEMMs run one after another, so every destination's rows are
        complete only during the last one: the reductions run after the GEMMs, on the whole GPU
        (their waits find the flags up), and the GEMMs leave no SM free for them. (DistWorld's
        reductions run beside the GEMM, on SMs it leaves free, and really wait.)

On the CPU (Triton interpreter) every producer finishes before its consumer is launched, so the
flags are all up when the consumer polls them; the protocol (and its timeout) is still exercised.
The serial and pipelined schedules are torch ops (the "collectives" are copies and sums).

`link_gbps` makes every transfer between the ranks cost its time on a link of that bandwidth, in
all three schedules (overlap.link), so that overlap can be measured on one GPU.
"""

import dataclasses

import torch

from kernelbase.backend import Backend, backend_for, info, late_interpreter_hint
from kernelbase.profiling import profile_range
from overlap.fused import FusedContext
from overlap.kernels.ag_gemm import ag_gemm_tiles
from overlap.kernels.gemm_rs import gemm_rs_tiles
from overlap.link import EmulatedLink
from overlap.protocol import HEADER_WORDS, ChunkLayout, peer_chunks, raise_flags
from overlap.world import Mode, OverlapConfig, World, acc_dtype


class LocalWorld(World):
    """W virtual ranks in one process on one device; per-rank tensors carry a leading [W] dim.

    Args:
        world_size: W >= 1.
        device: where the ranks live (default: the current CUDA device, else the CPU).
        mode: None (automatic), "fused", "pipelined" or "serial" (or a `Mode`). "fused" needs
            a CUDA device or the Triton interpreter (TRITON_INTERPRET=1) on the CPU.
        config: an `OverlapConfig`.
        link_gbps: emulate links of this bandwidth between the ranks (GB/s per direction, e.g.
            450 for an H100's NVLink): every schedule's transfers take their time on them
            (overlap.link). None (default): transfers are device-to-device copies. Needs a CUDA
            device or the Triton interpreter (which has no clock: nothing waits there).
    """

    stacked_ranks = True

    def __init__(
        self,
        world_size: int,
        device=None,
        *,
        mode=None,
        config: OverlapConfig | None = None,
        link_gbps: float | None = None,
    ):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"LocalWorld device {device}: {info()['cuda']}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        #: The emulated link (overlap.link.EmulatedLink), None without `link_gbps`.
        self.link = None
        if link_gbps is not None:
            if backend_for(device) is Backend.TORCH:
                raise ValueError(
                    f"LocalWorld link_gbps={link_gbps!r} needs a CUDA device or the Triton "
                    f"interpreter (its waits are Triton kernels); device is {device}."
                    + late_interpreter_hint()
                )
            self.link = EmulatedLink(link_gbps, device)
        super().__init__(world_size, device, mode, config)

    def __repr__(self) -> str:
        link = f", link_gbps={self.link.gbps:g}" if self.link else ""
        return super().__repr__()[:-1] + link + ")"

    @property
    def tuning_key(self) -> str | None:
        # overlap.tuning's LocalWorld entries were measured without a link: with one, the
        # transfers cost what the link makes them cost and none of those entries apply.
        return None if self.link else "LocalWorld"

    @property
    def unmeasured_mode(self) -> Mode:
        # Without a link the "transfers" are copies on the GPU that runs the GEMMs: nothing to
        # hide, and pipelining only cuts the GEMMs into chunks (on an H100 it lost to serial at
        # 9 of 12 all-gather shapes, up to 5x at W = 8: overlap.tuning). With a link, PIPELINED.
        return Mode.PIPELINED if self.link else Mode.SERIAL

    def _make_fused(self):
        if backend_for(self.device) is Backend.TORCH:
            return None, (
                f"the fused kernels need a CUDA device or the Triton interpreter "
                f"(TRITON_INTERPRET=1 before importing overlap); device is {self.device}."
                + late_interpreter_hint()
            )
        return LocalFused(self), None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(0, dtype=acc_dtype(x.dtype)).to(x.dtype)
        return total.unsqueeze(0).expand(x.shape).contiguous()

    # -- serial and pipelined (torch) ------------------------------------------------------------

    def _ag_serial(self, a_shard: torch.Tensor, b: torch.Tensor):
        W, m, K = a_shard.shape
        out = torch.empty(W, W * m, b.shape[-1], dtype=a_shard.dtype, device=self.device)
        gathered = []
        link = self.link
        if link:
            link.begin(W)
        for rank in range(W):
            with profile_range("overlap.ag.copy"):
                if link:
                    link.start(rank)
                buf = a_shard.new_empty(W * m, K)  # this rank's gather buffer
                buf.copy_(a_shard.view(W * m, K))
                if link:
                    link.arrived(rank, (W - 1) * m * K * a_shard.element_size())
            with profile_range("overlap.ag.gemm"):
                torch.matmul(buf, b[rank], out=out[rank])
            gathered.append(buf)
        return out, gathered[0]

    def _rs_serial(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        W, M, _ = a.shape
        m = M // W
        acc = torch.zeros(W, m, b.shape[-1], dtype=acc_dtype(a.dtype), device=self.device)
        link = self.link
        if link:
            link.begin(W)
        for rank in range(W):
            with profile_range("overlap.rs.gemm"):
                partial = torch.matmul(a[rank], b[rank])  # [M, N], this rank's partial
            with profile_range("overlap.rs.reduce"):
                if link:  # this rank's partial rows for its W-1 peers
                    link.send(rank, (W - 1) * m * b.shape[-1] * a.element_size())
                acc += partial.view(W, m, b.shape[-1])
        return acc.to(a.dtype)

    def _ag_pipelined(self, a_shard: torch.Tensor, b: torch.Tensor):
        W, m, K = a_shard.shape
        layout = self.chunk_layout(m)
        out = torch.empty(W, W * m, b.shape[-1], dtype=a_shard.dtype, device=self.device)
        gathered = [a_shard.new_empty(W * m, K) for _ in range(W)]
        link, row_bytes = self.link, K * a_shard.element_size()
        if link:
            link.begin(W)
        streams = self.streams
        streams.fork()
        for rank in range(W):
            if link:  # rank's transfers begin with its first GEMM, after the previous rank's
                streams.wait(streams.record(on_side=False), on_side=True)
                with streams():
                    link.start(rank)
                arrived_rows = 0
            torch.matmul(a_shard[rank], b[rank], out=out[rank, rank * m : (rank + 1) * m])
            for src, chunk in peer_chunks(rank, W, layout):
                lo, hi = layout.rows(chunk)
                rows = slice(src * m + lo, src * m + hi)
                with streams():
                    gathered[rank][rows].copy_(a_shard[src, lo:hi])
                    if link:
                        arrived_rows += hi - lo
                        link.arrived(rank, arrived_rows * row_bytes)
                streams.wait(streams.record(on_side=True), on_side=False)
                torch.matmul(gathered[rank][rows], b[rank], out=out[rank, rows])
            with streams():
                gathered[rank][rank * m : (rank + 1) * m].copy_(a_shard[rank])
        streams.join()
        return out, gathered[0]

    def _rs_pipelined(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        W, M, _ = a.shape
        m = M // W
        layout = self.chunk_layout(m)
        out = torch.empty(W, m, b.shape[-1], dtype=a.dtype, device=self.device)
        sum_dtype = acc_dtype(a.dtype)
        link, row_bytes = self.link, b.shape[-1] * a.element_size()
        if link:
            link.begin(1)
        streams = self.streams
        for dest in range(W):
            for chunk in range(layout.count):
                lo, hi = layout.rows(chunk)
                # [W, rows, N]: every rank's partial products of this chunk of dest's rows
                parts = torch.matmul(a[:, dest * m + lo : dest * m + hi], b)
                event = streams.record(on_side=False)
                with streams():
                    streams.wait(event, on_side=True)
                    if link:  # the W-1 peers' partials of the chunk; the links one after another
                        link.send(0, (W - 1) * (hi - lo) * row_bytes)
                    if streams.stream is not None:
                        parts.record_stream(streams.stream)
                    out[dest, lo:hi] = parts.sum(0, dtype=sum_dtype).to(a.dtype)
        streams.join()
        return out


@dataclasses.dataclass
class _RSWorkspace:
    """Per-rank buffers of the fused GEMM-RS, sized once per (M, N, dtype, chunks)."""

    key: tuple
    partials: list[torch.Tensor]  # W x [M, N], a's dtype
    counters: list[torch.Tensor]  # W x [W*cpr] int32
    flags: list[torch.Tensor]  # W x [HEADER_WORDS + W*cpr] int32: the rank's header, its flags
    partial_table: torch.Tensor  # [W] int64 addresses of partials
    header_table: torch.Tensor  # [W] int64 addresses of flags (their headers)


class LocalFused(FusedContext):
    """The fused schedules of a LocalWorld: all W ranks' kernels, launched one rank after another."""

    reduce_beside_gemm = False  # the RS reductions follow the GEMMs (see matmul_reduce_scatter)

    def __init__(self, world: LocalWorld):
        W = world.world_size
        super().__init__(W, world.device, world.config, world.streams, list(range(W)))
        self.link = world.link
        #: How the AG producer raises a call's flags; tests replace it to drop a flag.
        self.raise_flags = raise_flags
        self.ag_flags: list[torch.Tensor] = []  # W x [W*cpr] int32, grown to the largest call
        self.rs_workspace: _RSWorkspace | None = None

    def zero_flags(self) -> None:
        rs_flags = self.rs_workspace.flags if self.rs_workspace is not None else []
        for flags in [*self.ag_flags, *rs_flags]:
            flags.zero_()

    def gather(
        self,
        a_shard: torch.Tensor,
        gathered: torch.Tensor,
        flags: torch.Tensor,
        layout: ChunkLayout,
        epoch: int,
    ) -> None:
        """One rank's AG producer: its gather buffer [W*m, K] in one copy of the W shards
        a_shard [W, m, K], then its first W*cpr flags raised to `epoch` in one operation."""
        gathered.copy_(a_shard.view(gathered.shape))
        self.raise_flags(flags[: self.world_size * layout.count], epoch)

    def all_gather_matmul(self, a_shard: torch.Tensor, b: torch.Tensor):
        W, m, K = a_shard.shape  # a_shard [W, m, K], b [W, K, n]
        n = b.shape[-1]
        layout = self.chunk_layout(m)
        epoch = self.next_epoch()
        if not self.ag_flags or self.ag_flags[0].numel() < W * layout.count:
            self.ag_flags = [
                torch.zeros(W * layout.count, dtype=torch.int32, device=self.device)
                for _ in range(W)
            ]
        out = torch.empty(W, W * m, n, dtype=a_shard.dtype, device=self.device)  # [W, M, n]
        gathered = [a_shard.new_empty(W * m, K) for _ in range(W)]  # W x [M, K]
        num_tiles = ag_gemm_tiles(m, n, W, self.tile_for(a_shard.dtype))
        programs = self.programs(num_tiles, self.free_sms())
        counts = self.tile_counts(W, num_tiles)
        link_clock = self.link.begin(W) if self.link else None
        self.streams.fork()
        for rank in range(W):
            with self.streams(), profile_range("overlap.ag.copy"):
                self.gather(a_shard, gathered[rank], self.ag_flags[rank], layout, epoch)
            # One device: the copy may run as a kernel, which a persistent consumer on every SM
            # would starve while it spins on the flags. So rank r's consumer starts once rank
            # r's copy is done; rank r+1's copy runs beside it.
            self.streams.wait(self.streams.record(on_side=True), on_side=False)
            with profile_range("overlap.ag.gemm"):
                self.ag_gemm(
                    rank,
                    a_shard[rank],
                    gathered[rank],
                    b[rank],
                    out[rank],
                    self.ag_flags[rank],
                    epoch,
                    layout,
                    programs,
                    tile_counts=counts[rank],
                    link_clock=link_clock[rank:] if self.link else None,
                )
        self.streams.join()
        call = self.signature("all_gather_matmul", (m, K, n), a_shard.dtype, layout)
        self.finish("all_gather_matmul", layout, call)
        return out, gathered[0]

    def workspace_rs(self, M: int, N: int, dtype: torch.dtype, num_flags: int) -> _RSWorkspace:
        """The GEMM-RS buffers for this shape, allocated again when the shape changes."""
        key = (M, N, dtype, num_flags)
        ws = self.rs_workspace
        if ws is not None and ws.key == key:
            return ws
        W, dev = self.world_size, self.device

        def table(tensors):
            return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=dev)

        partials = [torch.empty(M, N, dtype=dtype, device=dev) for _ in range(W)]
        counters = [torch.zeros(num_flags, dtype=torch.int32, device=dev) for _ in range(W)]
        flags = [
            torch.zeros(HEADER_WORDS + num_flags, dtype=torch.int32, device=dev) for _ in range(W)
        ]
        self.rs_workspace = _RSWorkspace(
            key, partials, counters, flags, table(partials), table(flags)
        )
        return self.rs_workspace

    def matmul_reduce_scatter(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        W, M, _ = a.shape  # a [W, M, k], b [W, k, N]
        N, m = b.shape[-1], M // W
        layout = self.chunk_layout(m)
        ws = self.workspace_rs(M, N, a.dtype, W * layout.count)
        epoch = self.next_epoch()
        call = self.signature("matmul_reduce_scatter", (M, a.shape[-1], N), a.dtype, layout)
        for counters in ws.counters:
            counters.zero_()
        out = torch.empty(W, m, N, dtype=a.dtype, device=self.device)  # [W, m, N]
        reserve = self.reduce_plan(m, N)[1]  # SMs the GEMM leaves the reductions
        num_tiles = gemm_rs_tiles(m, N, W, self.tile_for(a.dtype))
        programs = self.programs(num_tiles, reserve)
        counts = self.tile_counts(W, num_tiles)
        link, link_clock = self.link, None
        if link:  # [W] the ranks' links, then [W, W, cpr] the chunks' arrivals
            link_clock = link.begin(W + W * W * layout.count)
        with profile_range("overlap.rs.gemm"):
            for rank in range(W):
                self.publish(ws.flags[rank][:HEADER_WORDS], epoch, call)
                self.rs_gemm(
                    rank,
                    a[rank],
                    b[rank],
                    ws.partials[rank],
                    ws.counters[rank],
                    ws.flags[rank][HEADER_WORDS:],
                    epoch,
                    layout,
                    programs,
                    tile_counts=counts[rank],
                    link_clock=link_clock,
                )
                if link:  # the next rank's GEMM starts once this rank's transfers are done
                    link.drain(rank)
        # One GPU: every destination's rows are complete only once the last rank's GEMM has
        # made its share, so the reductions follow the GEMMs on the whole GPU (`reduce_plan`)
        # instead of waiting beside them on SMs the GEMMs would have to leave free.
        with profile_range("overlap.rs.reduce"):
            for dest in range(W):
                self.rs_reduce(
                    dest,
                    ws.partial_table,
                    ws.header_table,
                    out[dest],
                    epoch,
                    layout,
                    link_clock=link_clock,
                )
        self.finish("matmul_reduce_scatter", layout, call)
        return out
