"""Launchers of the compiled chunk signals (`overlap._C`, csrc/overlap/signals.cu).

    write_flag(flags, index, value)         flags[index] = value after the stream's earlier work
    wait_flag(flags, index, value)          the stream's later work waits for flags[index] >= value
    wait_flag_bounded(flags, index, value, status, timeout_ns, code)
                                            the same wait in a one-thread kernel, bounded in time

All three are queued on the current stream and return at once (no host synchronisation).
"Reached" is the driver's CU_STREAM_WAIT_VALUE_GEQ test `(int32)(flag - value) >= 0`, which is
`flag >= value` while both lie in [0, 2**31) (the overlap epochs do). When `overlap._C` is not
available the launchers raise RuntimeError with the reason (`kernelbase.compiled.status()`).
"""

import torch

from kernelbase.compiled import check_cuda_tensor, require, stream_handle

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def write_flag(flags: torch.Tensor, index: int, value: int) -> None:
    """Set `flags[index] = value` (int32) once the work queued before on the current stream is
    done and visible (a memory barrier precedes the write).

    A driver stream memory write (cuStreamWriteValue32) where the driver has it: it needs no SM,
    so a persistent kernel occupying every SM cannot starve it. Otherwise a one-thread kernel
    (system-scope fence, then a release store), which does need an SM
    (`overlap._C.stream_memops()` says which one this process uses).
    """
    address, device = _flag_address(flags, index, value)
    require("overlap").write_flag(address, value, stream_handle(device), device.index)


def wait_flag(flags: torch.Tensor, index: int, value: int) -> None:
    """Make the work queued after this on the current stream wait until `flags[index] >= value`
    (cuStreamWaitValue32 with CU_STREAM_WAIT_VALUE_GEQ: the stream's front end waits, no SM).

    Unbounded: a flag that never rises stalls the stream. Raises RuntimeError where the driver
    has no stream memory operations; `wait_flag_bounded` then waits in a kernel.
    """
    address, device = _flag_address(flags, index, value)
    require("overlap").wait_flag(address, value, stream_handle(device), device.index)


def wait_flag_bounded(
    flags: torch.Tensor, index: int, value: int, status: torch.Tensor, timeout_ns: int, code: int
) -> None:
    """Queue a one-thread kernel that polls `flags[index]` (acquire loads at system scope, with
    a short back-off) until it reaches `value`, for at most `timeout_ns` nanoseconds.

    On a timeout it writes `status = (code, observed flag value)` if `status[0]` is still 0
    (first timeout wins; `code` must be non-zero) and returns, so the stream goes on and the host
    can raise a clear error after reading `status`. It returns at once, writing nothing, when
    `status[0]` is already non-zero (an earlier wait timed out).

    The bound is real time, read from the GPU's %globaltimer, not a number of polls: the time
    one poll takes depends on the GPU, its clocks, the memory traffic of the kernels beside it,
    the back-off and how many waiters poll the same line, so a spin count is only a timeout to
    within a factor of a few (the placeholder rate in overlap/flags.py is exactly that), while
    nanoseconds of the global timer are nanoseconds on every GPU.
    """
    address, device = _flag_address(flags, index, value)
    check_cuda_tensor("status", status, (torch.int32,), dim=1, device=device)
    if status.shape[0] != 2:
        raise ValueError(f"status must have shape (2,), got {tuple(status.shape)}")
    if timeout_ns <= 0:
        raise ValueError(f"timeout_ns={timeout_ns} must be > 0")
    if code == 0 or not INT32_MIN <= code <= INT32_MAX:
        raise ValueError(f"code={code} must be a non-zero int32 (0 means 'no timeout')")
    require("overlap").wait_flag_bounded(
        address, value, status.data_ptr(), timeout_ns, code, stream_handle(device), device.index
    )


def _flag_address(flags: torch.Tensor, index: int, value: int) -> tuple[int, torch.device]:
    """Address of flags[index] after checking the arguments, and the flags' device."""
    check_cuda_tensor("flags", flags, (torch.int32,))
    if not 0 <= index < flags.numel():
        raise ValueError(f"index={index} is out of range for flags of {flags.numel()} elements")
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"value={value} must be an int32")
    return flags.data_ptr() + 4 * index, flags.device
