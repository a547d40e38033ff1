"""A small model projecting W-GPU NVLink times of the overlap ops from one-GPU measurements.

# W ranks, M rows in total, K / k inner, n / N columns, b bytes per element, B link bandwidth

A LocalWorld runs the W ranks one after another on one GPU, so its times are not those of W GPUs.
What does carry over is what one rank's GPU computes. From the one-GPU run the model takes, per
rank (measured time / W): t_gemm, cuBLAS on the whole GEMM with all data present; t_fused, the
fused kernel with all data present; t_chunked, the per-chunk cuBLAS GEMMs of the pipelined
schedule with all data present. It adds the time the bytes need on the links:

    AG  every rank receives (W-1) shards of m*K elements:      t_comm = (W-1) * m*K*b / B
    RS  every rank receives (W-1) partial chunks of m*N:       t_comm = (W-1) * m*N*b / B
        plus the fp32 reduction of the W chunks at HBM speed:  t_reduce

With C chunks per rank, the transfers overlap the GEMM except at one end: AG's last chunk must
arrive before its tiles run, RS's first chunk must be computed before it is sent:

    serial     t_comm + t_gemm + t_reduce
    pipelined  max(t_chunked, t_comm + t_chunked / (W*C)) + t_reduce / C
    fused      max(t_fused,   t_comm + t_fused / (W*C))   + t_reduce / C
    efficiency (serial - fused) / min(t_comm + t_reduce, t_gemm)

Not modelled: NVLink copies and the GEMM contending for HBM bandwidth, copy-engine launch
latencies, the reduction's SMs taken from the RS GEMM, NCCL protocol overheads. B is an
achievable unidirectional per-GPU bandwidth (H100 SXM NVLink4: 450 GB/s peak per direction;
about 370 GB/s is typical of large copies, the default here), a parameter, not a measurement.
"""

import dataclasses

DEFAULT_LINK_GBPS = 370.0  # achievable per-direction NVLink4 bandwidth of one H100 (assumed)
DEFAULT_HBM_GBPS = 3000.0  # achievable H100 HBM3 bandwidth for the RS reduction (assumed)


@dataclasses.dataclass(frozen=True)
class Projection:
    comm_ms: float  # links (+ RS reduction)
    gemm_ms: float  # cuBLAS, all data present
    serial_ms: float
    pipelined_ms: float
    fused_ms: float

    @property
    def efficiency(self) -> float | None:
        hideable = min(self.comm_ms, self.gemm_ms)
        return (self.serial_ms - self.fused_ms) / hideable if hideable > 0 else None


def project(
    op: str,
    world_size: int,
    M: int,
    inner: int,
    cols: int,
    elem_bytes: int,
    *,
    gemm_ms: float,
    fused_ms: float,
    chunked_ms: float,
    chunks_per_rank: int,
    link_gbps: float = DEFAULT_LINK_GBPS,
    hbm_gbps: float = DEFAULT_HBM_GBPS,
) -> Projection:
    """Projected per-call times (ms) of one rank of a W-GPU NVLink group.

    op "ag": an [M, inner] matrix gathered, `cols` local columns. op "rs": [M, inner] local
    input, `cols` output columns. gemm_ms / fused_ms / chunked_ms: one rank's GEMM with all data
    present on one GPU (cuBLAS / the fused kernel / the pipelined schedule's chunked cuBLAS
    GEMMs), measured.
    """
    W, m, C = world_size, M // world_size, max(1, chunks_per_rank)
    if op == "ag":
        received, reduce_ms = (W - 1) * m * inner * elem_bytes, 0.0
    elif op == "rs":
        received = (W - 1) * m * cols * elem_bytes
        reduce_ms = (W * m * cols * 4 + m * cols * elem_bytes) / (hbm_gbps * 1e9) * 1e3
    else:
        raise ValueError(f"op must be 'ag' or 'rs', got {op!r}")
    if W == 1:
        return Projection(0.0, gemm_ms, gemm_ms, chunked_ms, fused_ms)
    link_ms = received / (link_gbps * 1e9) * 1e3
    return Projection(
        comm_ms=link_ms + reduce_ms,
        gemm_ms=gemm_ms,
        serial_ms=link_ms + gemm_ms + reduce_ms,
        pipelined_ms=max(chunked_ms, link_ms + chunked_ms / (W * C)) + reduce_ms / C,
        fused_ms=max(fused_ms, link_ms + fused_ms / (W * C)) + reduce_ms / C,
    )
