"""The emulated link of a LocalWorld: what each schedule's transfers cost at a given bandwidth.

# W ranks, m rows per rank shard, K inner (AG), N columns (RS), b bytes per element,
# B = link_gbps (GB/s per direction = bytes per ns)

On one GPU a LocalWorld's "communication" is a device-to-device copy, much faster than any link
between GPUs, so overlap has almost nothing to hide. `LocalWorld(W, link_gbps=B)` makes every
transfer between ranks cost what it would on a link of B GB/s per direction, so that overlap
efficiency can be measured on one GPU (overlap.kernels.link waits on the GPU clock; no SM the
GEMMs need is taken). The model, per rank, as the ranks run one after another:

    AG  rank r receives its (W-1) peers' shards, (W-1)*m*K*b bytes, through its link, chunks in
        arrival order (protocol.peer_chunks) from the moment its transfers begin (t0):
          serial     t0, the copy, wait until t0 + (W-1)*m*K*b / B, the GEMM
          pipelined  (side stream) t0 once the previous rank's GEMMs are done, then chunk by
                     chunk: its copy, wait until t0 + the bytes through that chunk / B; the
                     chunk's GEMM waits for that
          fused      the copies run before the consumer, which takes t0 when it starts and, before
                     a tile of a peer's rows, waits until t0 + the bytes through its last chunk / B
    RS  rank s sends each of its (W-1) peers its partial rows, (W-1)*m*N*b bytes, through its
        outgoing link, a queue: a transfer starts when it is ready and the link is free
          serial     rank s's GEMM, then its (W-1)*m*N*b bytes, then the reduction
          pipelined  per destination chunk, once its W partials are computed (one GEMM on all
                     ranks), the (W-1) partials' bytes, then their sum (side stream)
          fused      the producer queues each finished chunk on its rank's link and records its
                     arrival; the reduction waits for it; rank s+1's GEMM starts once rank s's
                     link is idle, so rank s's time is max(GEMM, its transfers)

In every schedule one rank's transfers overlap only that rank's GEMMs, never another rank's, so
the LocalWorld's time is the sum of the ranks' times on W GPUs. The serial and pipelined waits
run in one-warp kernels (overlap.kernels.link). Under the Triton interpreter there is no clock:
the schedules run as with a link, and nothing waits. The flag waits of the fused kernels keep
their bound (`OverlapConfig.timeout_s`): the fused RS reduction of a rank waits for flags of
ranks whose GEMMs start only after the earlier ranks' links drained, so a link slow enough
that this takes longer than `timeout_s` raises OverlapTimeoutError; raise the timeout with it.
"""

import math

import torch

from overlap.kernels.link import launch_link_wait


def check_link_gbps(link_gbps) -> float:
    """`link_gbps` as a float, or ValueError naming what was passed."""
    if isinstance(link_gbps, bool) or not isinstance(link_gbps, int | float):
        raise ValueError(f"link_gbps must be a number of GB/s, got {link_gbps!r}")
    if not (link_gbps > 0 and math.isfinite(link_gbps)):
        raise ValueError(f"link_gbps must be a positive, finite number of GB/s, got {link_gbps!r}")
    return float(link_gbps)


class EmulatedLink:
    """The clock words of one LocalWorld's link emulation (see the module docstring)."""

    def __init__(self, link_gbps: float, device: torch.device):
        self.gbps = check_link_gbps(link_gbps)
        self.clock = torch.zeros(0, dtype=torch.int64, device=device)

    def transfer_ns(self, nbytes: int) -> int:
        """Time of `nbytes` on the link, in whole nanoseconds (1 GB/s is 1 byte per ns)."""
        return round(nbytes / self.gbps)

    def ns_per_row(self, row_bytes: int) -> float:
        """Time of one row of `row_bytes` on the link (the fused kernels multiply it by rows)."""
        return row_bytes / self.gbps

    def begin(self, words: int) -> torch.Tensor:
        """Zero (on the current stream) and return the first `words` clock words of a call."""
        if self.clock.numel() < words:
            self.clock = torch.zeros(words, dtype=torch.int64, device=self.clock.device)
        else:
            self.clock.zero_()
        return self.clock

    def start(self, slot: int) -> None:
        """Link `slot`'s transfers begin now (after the stream's earlier work)."""
        launch_link_wait(self.clock, slot, 0, queue=False)

    def arrived(self, slot: int, nbytes: int) -> None:
        """The stream waits until `nbytes` have crossed link `slot` since it started."""
        launch_link_wait(self.clock, slot, self.transfer_ns(nbytes), queue=False)

    def send(self, slot: int, nbytes: int) -> None:
        """The stream queues `nbytes`, ready now, on link `slot` and waits for their arrival."""
        launch_link_wait(self.clock, slot, self.transfer_ns(nbytes), queue=True)

    def drain(self, slot: int) -> None:
        """The stream waits until link `slot` has delivered everything queued on it."""
        launch_link_wait(self.clock, slot, 0, queue=True)
