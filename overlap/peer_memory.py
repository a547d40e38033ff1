"""Peer memory: one buffer per rank of a process group, and every rank can address all of them.

The fused schedules of a `DistWorld` need what symmetric memory gives a node of GPUs: each rank
allocates a buffer of the same size and gets tensor views and raw addresses of all W buffers,
so its kernels can poll a peer's flags and read a peer's rows, and its copies can pull from a
peer's buffer.

    CUDA  torch.distributed._symmetric_memory (`empty` + `rendezvous`): peer GPUs' buffers are
          mapped into every rank's address space. The group must be on one node, with peer
          access between its GPUs.
    CPU   POSIX shared memory: every rank creates a file of the buffer's size in a shared
          directory (/dev/shm where present) and maps the files of all ranks with
          `torch.from_file(shared=True)`. The group must be on one host. Kernels reach these
          buffers under the Triton interpreter, whose atomics are the CPU's own, so the CPU
          runs the multi-process flag protocol of a GPU node with real concurrency between the
          processes.

Allocating is collective: every rank of the group must allocate the same sizes in the same order
(as with any collective). A buffer's memory is zero when allocated.
"""

import dataclasses
import math
import os
import socket
import tempfile
import uuid

import torch
import torch.distributed as dist

from kernelbase.backend import interpreting
from kernelbase.intmath import cdiv


@dataclasses.dataclass(frozen=True)
class PeerBuffer:
    """W buffers of `nbytes` bytes, one per rank, as seen from rank `rank`."""

    rank: int
    buffers: tuple[torch.Tensor, ...]  # W x uint8 [nbytes]; buffers[rank] is this rank's own
    keepalive: object = None  # what keeps the peer mappings alive (CUDA: the rendezvous handle)

    @property
    def nbytes(self) -> int:
        return self.buffers[0].numel()

    def view(self, rank: int, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0):
        """Rank `rank`'s buffer from byte `offset` on, as a contiguous `dtype` tensor `shape`."""
        itemsize, numel = dtype.itemsize, math.prod(shape)
        if offset % itemsize or offset + numel * itemsize > self.nbytes:
            raise ValueError(
                f"a {dtype} view of shape {tuple(shape)} at byte {offset} does not fit an aligned "
                f"place in a peer buffer of {self.nbytes} bytes"
            )
        raw = self.buffers[rank][offset : offset + numel * itemsize]
        return raw.view(dtype).view(shape)

    def addresses(self, offset: int = 0) -> torch.Tensor:
        """int64 [W] on the buffers' device: the address of byte `offset` of every rank's buffer."""
        return torch.tensor(
            [b.data_ptr() + offset for b in self.buffers],
            dtype=torch.int64,
            device=self.buffers[0].device,
        )


class PeerMemory:
    """Allocates `PeerBuffer`s over a process group; see the module docstring.

    Construction is collective. `unavailable` is None when peer memory works on this group and
    device, else the reason it does not (the same on every rank); `allocate` then raises.
    """

    def __init__(self, group, device: torch.device):
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        facts = [None] * self.world_size
        dist.all_gather_object(facts, _local_facts(device), group=group)
        self.unavailable = _why_unavailable(facts, device)
        self._count = 0
        self._prefix = None
        if self.unavailable is None and device.type == "cpu":
            # One name for this world's files, agreed on by every rank.
            names = [f"overlap-{uuid.uuid4().hex}" if self.rank == 0 else None]
            dist.broadcast_object_list(names, src=dist.get_global_rank(group, 0), group=group)
            self._prefix = os.path.join(_shared_dir(), names[0])

    def allocate(self, nbytes: int) -> PeerBuffer:
        """A zeroed buffer of `nbytes` bytes on every rank (collective)."""
        if self.unavailable is not None:
            raise RuntimeError(f"peer memory is unavailable: {self.unavailable}")
        nbytes = max(16, cdiv(nbytes, 16) * 16)  # every view offset we use stays aligned
        self._count += 1
        if self.device.type == "cuda":
            return self._allocate_symmetric(nbytes)
        return self._allocate_shared_files(nbytes)

    def _allocate_symmetric(self, nbytes: int) -> PeerBuffer:
        import torch.distributed._symmetric_memory as symm_mem

        local = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        local.zero_()
        handle = symm_mem.rendezvous(local, self.group)
        buffers = tuple(
            local if peer == self.rank else handle.get_buffer(peer, (nbytes,), torch.uint8)
            for peer in range(self.world_size)
        )
        # Every rank's zeroing is done before any peer may raise a flag in its buffer.
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        return PeerBuffer(self.rank, buffers, keepalive=handle)

    def _allocate_shared_files(self, nbytes: int) -> PeerBuffer:
        def path(rank: int) -> str:
            return f"{self._prefix}-{self._count}-{rank}"

        # from_file creates the file at its full size, zero-filled.
        own = torch.from_file(path(self.rank), shared=True, size=nbytes, dtype=torch.uint8)
        try:
            dist.barrier(group=self.group)  # every rank's file exists
            buffers = tuple(
                own
                if peer == self.rank
                else torch.from_file(path(peer), shared=True, size=nbytes, dtype=torch.uint8)
                for peer in range(self.world_size)
            )
            dist.barrier(group=self.group)  # every rank has mapped every file
        finally:
            os.unlink(path(self.rank))  # the mappings stay valid; nothing is left on disk
        return PeerBuffer(self.rank, buffers)


def _shared_dir() -> str:
    return (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else (tempfile.gettempdir())
    )


def _local_facts(device: torch.device) -> dict:
    facts = dict(host=socket.gethostname(), device=str(device), interpreting=interpreting())
    if device.type == "cuda":
        try:
            import torch.distributed._symmetric_memory  # noqa: F401

            facts["symmetric_memory"] = True
        except ImportError:
            facts["symmetric_memory"] = False
        index = device.index if device.index is not None else torch.cuda.current_device()
        facts["peers"] = {
            other: other == index or torch.cuda.can_device_access_peer(index, other)
            for other in range(torch.cuda.device_count())
        }
        facts["index"] = index
    return facts


def _why_unavailable(facts: list[dict], device: torch.device) -> str | None:
    """Why peer memory cannot work for ranks with these `facts` (None if it can)."""
    hosts = sorted({f["host"] for f in facts})
    if len(hosts) > 1:
        return f"the group spans several hosts ({', '.join(hosts)})"
    if len({f["device"].split(":")[0] for f in facts}) > 1:
        return "the ranks' devices are of different types"
    if device.type == "cpu":
        if not all(f["interpreting"] for f in facts):
            return (
                "the fused kernels run on the CPU only under the Triton interpreter "
                "(TRITON_INTERPRET=1 before triton is imported)"
            )
        return None
    if device.type != "cuda":
        return f"no peer memory on {device.type} devices"
    if not all(f["symmetric_memory"] for f in facts):
        return "this torch build has no torch.distributed._symmetric_memory"
    for f in facts:
        for g in facts:
            if not f["peers"].get(g["index"], False):
                return f"GPU {f['index']} has no peer access to GPU {g['index']}"
    return None
