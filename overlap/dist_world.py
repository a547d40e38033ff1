"""DistWorld: one rank per process over a torch.distributed process group.

# W ranks, m rows per rank shard, M = W*m rows, K inner (AG), n local columns (AG),
# k local inner (RS), N columns (RS), CH rows per chunk, e the call's epoch

Per-rank tensors have no rank dim (a_shard [m, K], b [K, n] -> c [W*m, n]). Every rank must make
the same calls with the same shapes in the same order, as with any collective.

    SERIAL     the collective (`all_gather_single` / `reduce_scatter_single`) and one GEMM.
    PIPELINED  rows cut into chunks; each chunk's collective is issued asynchronously on a side
               stream and a chunk's GEMM runs once its collective is done. Any backend: NCCL
               across nodes, gloo on the CPU.
    FUSED      the persistent kernels of overlap.kernels over peer memory (overlap.peer_memory:
               symmetric memory on a node of GPUs, shared memory on one CPU host), run by
               the world's fused context, `PeerFused`:

      AG  publish (current stream): copy a_shard into this rank's peer buffer, slot e % 2, and
          raise this rank's ready flag to e after the copy. Then `wait_peers_kernel` (one
          program): every peer's ready flag >= e. Producer (side stream, copy engine): for each
          peer in rotated order, pull each chunk from the peer's buffer into the local gather
          buffer and raise the chunk's local flag. Consumer: `ag_gemm_kernel`, as in LocalWorld.
      RS  producer: `gemm_rs_kernel` writes this rank's partial products into its peer buffer,
          slot e % 2, and raises its per-(destination, chunk) flags there. Consumer (side
          stream): `rs_reduce_kernel` reads this rank's rows from every peer's partial buffer,
          each block after acquiring the peer's flags of the chunks holding it.
      Flags and rows that other GPUs read are published and polled at system memory scope.

      Two slots and no barrier per call: a rank writes slot s again in call e + 2. To get there
      it finished call e + 1, whose waits needed every peer to have started call e + 1 (AG:
      published; RS: produced), and a rank starts a call only after its streams have finished
      the previous one (the side stream is joined at the end of every call), which includes
      all its reads of slot s. A buffer is replaced (a larger shape) or its flags are reset (the
      epochs wrap) only after every rank's queued work is done (device sync + barrier).

      The ready wait runs before the consumer on the current stream rather than beside it: a
      persistent consumer on every SM could otherwise keep the one-program wait from running.

FUSED is opt-in: `mode=None` picks PIPELINED (SERIAL below the FLOP threshold), because the CUDA
fused path has never run on two GPUs. It needs peer memory for the group (one node with peer
access between its GPUs; on the CPU one host and the Triton interpreter, which is how the test
suite runs the multi-process protocol). PyTorch's symmetric memory refuses two ranks on one GPU,
so tests/overlap/test_dist_gpu.py needs two GPUs and skips on one.
"""

import datetime
import uuid

import torch
import torch.distributed as dist

from kernelbase.intmath import next_power_of_2
from kernelbase.profiling import profile_range
from overlap.fused import FusedContext
from overlap.kernels.ag_gemm import ag_gemm_tiles
from overlap.kernels.flags import launch_wait_peers
from overlap.kernels.gemm_rs import gemm_rs_tiles
from overlap.peer_memory import PeerBuffer, PeerMemory
from overlap.protocol import (
    HEADER_WORDS,
    ChunkLayout,
    OverlapMismatchError,
    describe_signature,
    header_slot,
    peer_chunks,
    signature,
)
from overlap.world import Mode, OverlapConfig, World


def _collective(new_name: str, old_name: str):
    """torch >= 2.13 names (`*_single`) where present, else the older `*_into_tensor` names."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


class DistWorld(World):
    """One rank per process over a torch.distributed process group.

    Args:
        group: the process group (default: the default group, which must be initialised).
        mode: None (automatic: pipelined, or serial below the FLOP threshold; see the module
            docstring), "fused" (opt-in, unverified on GPUs; raises ValueError, with the reason,
            where peer memory does not work), "pipelined" or "serial".
        device: the device of this rank's tensors (default: the current CUDA device for NCCL,
            else the CPU).
        config: an `OverlapConfig`.

    Construction is collective (every rank of the group must construct the world together).
    """

    stacked_ranks = False

    def __init__(self, group=None, mode=None, *, device=None, config: OverlapConfig | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistWorld needs an initialised torch.distributed process group")
        group = group if group is not None else dist.group.WORLD
        if device is None:
            on_nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if on_nccl else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.group = group
        self.rank = dist.get_rank(group)
        self._all_gather = _collective("all_gather_single", "all_gather_into_tensor")
        self._reduce_scatter = _collective("reduce_scatter_single", "reduce_scatter_tensor")
        super().__init__(dist.get_world_size(group), device, mode, config)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", rank={self.rank})"

    def _make_fused(self):
        if self.mode is not Mode.FUSED:
            # Opt-in: the fused path has never run on two GPUs, so mode=None picks PIPELINED
            # until it has (and finding out whether peer memory works is collective).
            return None, "fused is opt-in on a DistWorld (mode='fused')"
        peers = PeerMemory(self.group, self.device)  # collective: finds out whether it works
        if peers.unavailable is not None:
            return None, peers.unavailable
        return PeerFused(self, peers), None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total, group=self.group)
        return total

    # -- serial and pipelined (torch collectives) -------------------------------------------------

    def _check_ranks_agree(self, op: str, dims: tuple[int, int, int], dtype, m: int) -> None:
        """OverlapMismatchError, on every rank, if the ranks' calls differ (config.check_ranks)."""
        check = self.config.check_ranks
        if not (check or (check is None and self.device.type == "cpu")):
            return
        call = signature(op, dims, dtype, self.chunk_layout(m).chunk_m, self.world_size)
        mine = torch.tensor(call, dtype=torch.int64, device=self.device)
        every = mine.new_empty(self.world_size * len(call))
        self._all_gather(every, mine, group=self.group)
        for peer, theirs in enumerate(every.view(self.world_size, -1).tolist()):
            if tuple(theirs) != call:
                raise OverlapMismatchError(
                    op, self.rank, peer, describe_signature(call), describe_signature(theirs)
                )

    def _comm_stream(self):
        """The side stream, after the work queued so far (a no-op context on the CPU)."""
        self.streams.fork()
        return self.streams()

    def _ag_serial(self, a_shard: torch.Tensor, b: torch.Tensor):
        m, K = a_shard.shape  # a_shard [m, K], b [K, n]
        self._check_ranks_agree("all_gather_matmul", (m, K, b.shape[-1]), a_shard.dtype, m)
        gathered = a_shard.new_empty(self.world_size * m, K)  # [M, K]
        with profile_range("overlap.ag.collective"):
            self._all_gather(gathered, a_shard, group=self.group)
        with profile_range("overlap.ag.gemm"):
            return gathered @ b, gathered

    def _rs_serial(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        M = a.shape[0]  # a [M, k], b [k, N]
        self._check_ranks_agree(
            "matmul_reduce_scatter", (M, a.shape[1], b.shape[-1]), a.dtype, M // self.world_size
        )
        with profile_range("overlap.rs.gemm"):
            partial = a @ b  # [M, N]
        out = partial.new_empty(M // self.world_size, b.shape[-1])  # [m, N]
        with profile_range("overlap.rs.collective"):
            self._reduce_scatter(out, partial, group=self.group)
        return out

    def _ag_pipelined(self, a_shard: torch.Tensor, b: torch.Tensor):
        W, (m, K) = self.world_size, a_shard.shape
        self._check_ranks_agree("all_gather_matmul", (m, K, b.shape[-1]), a_shard.dtype, m)
        layout = self.chunk_layout(m)
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
        self._check_ranks_agree("matmul_reduce_scatter", (M, k, b.shape[-1]), a.dtype, m)
        layout = self.chunk_layout(m)
        out = a.new_empty(m, b.shape[-1])  # [m, N]
        works, parts = [], []
        for chunk in range(layout.count):
            lo, hi = layout.rows(chunk)
            with profile_range("overlap.rs.gemm"):
                part = torch.matmul(a.view(W, m, k)[:, lo:hi], b)  # [W, rows, N]
            with self._comm_stream(), profile_range("overlap.rs.collective"):
                works.append(
                    self._reduce_scatter(
                        out[lo:hi],
                        part.view(W * (hi - lo), b.shape[-1]),
                        group=self.group,
                        async_op=True,
                    )
                )
            parts.append(part)  # alive until its collective has finished
        for work in works:
            work.wait()
        return out


def _slot_offset(buffer: PeerBuffer, epoch: int) -> int:
    """Byte offset of the slot (one half of `buffer`) that the call of `epoch` uses. The halves
    are fixed, whatever the call's shape: slots of calls with different shapes never overlap."""
    return (epoch % 2) * (buffer.nbytes // 2)


# The peer buffer that begins with each rank's header, by op.
HEADER_BUFFER = {"all_gather_matmul": "ag.ready", "matmul_reduce_scatter": "rs.flags"}


class PeerFused(FusedContext):
    """The fused schedules of a DistWorld over peer memory (see the module docstring)."""

    scope = "sys"  # the GEMM-RS flags are read by the other GPUs

    def __init__(self, world: DistWorld, peers: PeerMemory):
        super().__init__(world.world_size, world.device, world.config, world.streams, [world.rank])
        self.group, self.rank = world.group, world.rank
        self.peers = peers
        self.buffers: dict[str, PeerBuffer] = {}  # peer buffers by purpose
        self._tables: dict[tuple[str, int], torch.Tensor] = {}  # their address tables
        self._local: dict[str, torch.Tensor] = {}  # int32 flags and counters only this rank uses
        # Growing a buffer is agreed through the process group's store, under this world's name.
        self._store = dist.distributed_c10d._get_default_store()
        names = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(names, src=dist.get_global_rank(self.group, 0), group=self.group)
        self._name, self._growths = f"overlap/{names[0]}", 0

    def _quiesce(self) -> None:
        """Wait until every rank's queued work is done (collective)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)

    def _peer_buffer(self, name: str, nbytes: int, op: str, call: tuple[int, ...]) -> PeerBuffer:
        """The peer buffer for `name`, with room for `nbytes`. Growing it is collective: the
        ranks agree on the size (the largest any asks for, so every rank's buffers and slot
        offsets stay alike) within `timeout_s`, or OverlapMismatchError names a rank that did
        not make the same call."""
        buf = self.buffers.get(name)
        if buf is not None and buf.nbytes >= nbytes:
            return buf
        nbytes = self._agree_on_size(name, nbytes, op, call)
        if buf is not None:
            self._quiesce()  # no rank reads the buffer being replaced any more
            self._tables = {key: t for key, t in self._tables.items() if key[0] != name}
        buf = self.buffers[name] = self.peers.allocate(next_power_of_2(nbytes))
        return buf

    def _agree_on_size(self, name: str, nbytes: int, op: str, call: tuple[int, ...]) -> int:
        self._growths += 1
        key = f"{self._name}/grow/{self._growths}"
        self._store.set(f"{key}/{self.rank}", f"{name} {nbytes}")
        keys = [f"{key}/{peer}" for peer in range(self.world_size)]
        try:
            self._store.wait(keys, datetime.timedelta(seconds=self.config.timeout_s))
        except RuntimeError:  # the store's timeout
            missing = next(p for p in range(self.world_size) if not self._store.check([keys[p]]))
            raise OverlapMismatchError(
                op,
                self.rank,
                missing,
                describe_signature(call),
                None,
                detail=f"rank {missing} did not grow its peer buffers with this rank within "
                f"{self.config.timeout_s:g} s",
            ) from None
        asks = [self._store.get(k).decode().split() for k in keys]
        if any(ask_name != name for ask_name, _ in asks):
            peer = next(p for p, (ask_name, _) in enumerate(asks) if ask_name != name)
            raise OverlapMismatchError(
                op,
                self.rank,
                peer,
                describe_signature(call),
                None,
                detail=f"rank {peer} grew {asks[peer][0]!r} instead",
            )
        return max(int(size) for _, size in asks)

    def _table(self, name: str, offset: int) -> torch.Tensor:
        """int64 [W] device addresses of byte `offset` of every rank's buffer `name`."""
        key = (name, offset)
        if key not in self._tables:
            self._tables[key] = self.buffers[name].addresses(offset)
        return self._tables[key]

    def _local_flags(self, name: str, count: int) -> torch.Tensor:
        flags = self._local.get(name)
        if flags is None or flags.numel() < count:
            flags = self._local[name] = torch.zeros(count, dtype=torch.int32, device=self.device)
        return flags

    def peer_signature(self, op: str, peer: int, epoch: int) -> list[int] | None:
        header = self.buffers[HEADER_BUFFER[op]].view(peer, torch.int32, (HEADER_WORDS,))
        slot = header_slot(header, epoch)
        return slot[1:].tolist() if int(slot[0]) == epoch else None

    def zero_flags(self) -> None:
        self._quiesce()
        for name in HEADER_BUFFER.values():  # the buffers holding flags
            if name in self.buffers:
                self.buffers[name].buffers[self.rank].zero_()
        for flags in self._local.values():
            flags.zero_()
        self._quiesce()

    def all_gather_matmul(self, a_shard: torch.Tensor, b: torch.Tensor):
        W, r, (m, K) = self.world_size, self.rank, a_shard.shape  # a_shard [m, K], b [K, n]
        n = b.shape[-1]
        layout = self.chunk_layout(m)
        op = "all_gather_matmul"
        call = self.signature(op, (m, K, n), a_shard.dtype, layout)
        slot_bytes = m * K * a_shard.element_size()
        rows = self._peer_buffer("ag.rows", 2 * slot_bytes, op, call)
        ready = self._peer_buffer("ag.ready", 4 * HEADER_WORDS, op, call)
        epoch = self.next_epoch()
        offset = _slot_offset(rows, epoch)
        shards = [rows.view(p, a_shard.dtype, (m, K), offset) for p in range(W)]  # W x [m, K]
        flags = self._local_flags("ag.flags", W * layout.count)
        out = a_shard.new_empty(W * m, n)
        gathered = a_shard.new_empty(W * m, K)
        with profile_range("overlap.ag.publish"):
            shards[r].copy_(a_shard)
            self.publish(ready.view(r, torch.int32, (HEADER_WORDS,)), epoch, call)
            # Every peer published this call, and the same call (else the consumer's peer
            # tiles are NaN and finish() raises OverlapMismatchError).
            launch_wait_peers(
                self._table("ag.ready", 0),
                self.status[r],
                rank=r,
                world_size=W,
                epoch=epoch,
                wait_budget=self.wait_budget,
                flags_per_rank=layout.count,
                scope="sys",
            )
        num_tiles = ag_gemm_tiles(m, n, W, self.tile_for(a_shard.dtype))
        programs = self.programs(num_tiles, self.free_sms())
        (counts,) = self.tile_counts(1, num_tiles)
        self.streams.fork()
        with self.streams(), profile_range("overlap.ag.copy"):
            self.pull_chunks(r, shards, gathered, flags, layout, epoch)
        with profile_range("overlap.ag.gemm"):
            self.ag_gemm(
                r, a_shard, gathered, b, out, flags, epoch, layout, programs, tile_counts=counts
            )
        self.streams.join()
        self.finish(op, layout, call)
        return out, gathered

    def pull_chunks(
        self,
        rank: int,
        shards,
        gathered: torch.Tensor,
        flags: torch.Tensor,
        layout: ChunkLayout,
        epoch: int,
    ) -> None:
        """AG producer of `rank`: copy its own rows, then the peers' chunks in arrival order
        (`peer_chunks`), into its gather buffer [W*m, K], raising each chunk's flag after its
        copy. `shards[p]` is rank p's [m, K] shard as this process sees it. (The pointer-load
        consumer reads the local rows from the shard; the TMA one from the gather buffer.)"""
        m = layout.m
        gathered[rank * m : (rank + 1) * m].copy_(shards[rank])
        for chunk in range(layout.count):
            self.raise_flag(flags, rank * layout.count + chunk, epoch)
        for src, chunk in peer_chunks(rank, self.world_size, layout):
            lo, hi = layout.rows(chunk)
            gathered[src * m + lo : src * m + hi].copy_(shards[src][lo:hi])
            self.raise_flag(flags, src * layout.count + chunk, epoch)

    def matmul_reduce_scatter(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        W, r, (M, k) = self.world_size, self.rank, a.shape  # a [M, k], b [k, N]
        N, m = b.shape[-1], M // W
        layout = self.chunk_layout(m)
        op = "matmul_reduce_scatter"
        call = self.signature(op, (M, k, N), a.dtype, layout)
        slot_bytes = M * N * a.element_size()
        partials = self._peer_buffer("rs.partials", 2 * slot_bytes, op, call)
        peer_flags = self._peer_buffer("rs.flags", 4 * (HEADER_WORDS + W * layout.count), op, call)
        epoch = self.next_epoch()
        offset = _slot_offset(partials, epoch)
        counters = self._local_flags("rs.counters", W * layout.count)
        counters.zero_()
        out = a.new_empty(m, N)
        reserve = self.reduce_plan(m, N)[1]  # SMs the GEMM leaves the reductions
        num_tiles = gemm_rs_tiles(m, N, W, self.tile_for(a.dtype))
        programs = self.programs(num_tiles, reserve)
        (counts,) = self.tile_counts(1, num_tiles)
        header_and_flags = peer_flags.view(r, torch.int32, (HEADER_WORDS + W * layout.count,))
        self.streams.fork()
        with profile_range("overlap.rs.gemm"):
            self.publish(header_and_flags[:HEADER_WORDS], epoch, call)
            self.rs_gemm(
                r,
                a,
                b,
                partials.view(r, a.dtype, (M, N), offset),
                counters,
                header_and_flags[HEADER_WORDS:],
                epoch,
                layout,
                programs,
                tile_counts=counts,
            )
        with self.streams(), profile_range("overlap.rs.reduce"):
            self.rs_reduce(
                r,
                self._table("rs.partials", offset),
                self._table("rs.flags", 0),
                out,
                epoch,
                layout,
            )
        self.streams.join()
        self.finish(op, layout, call)
        return out
