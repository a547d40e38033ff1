"""Errors found on the device, raised on the host without a synchronisation per call.

A check that needs the values of a CUDA tensor (expert ids in range, router logits finite) would
cost one host synchronisation per call, which stalls the launch queue of every later layer. So
the op writes an int32 error word on the device and calls `defer(word, describe)`: the word is
copied into pinned host memory behind a CUDA event, and the next op that calls `poll()` raises
what a finished copy shows, or `check()` waits for every copy and raises. An error therefore
surfaces at the latest at the next moeblaze call after the GPU got there, or at `check()`.

On the CPU a read costs nothing: `defer` checks at once. While a CUDA graph is being captured
nothing is deferred (a capture may not read memory back to the host), nor is a word without
values: a fake tensor (under FakeTensorMode, as when a model's memory is estimated) or one on the
meta device.
"""

import collections
from collections.abc import Callable

import torch

from kernelbase.backend import has_values

_pending: collections.deque = collections.deque()  # (event, pinned word, describe)


def defer(word: torch.Tensor, describe: Callable[[list[int]], str | None]) -> None:
    """Raise ValueError(describe(word.tolist())) once `word` is known, unless describe gives None.

    `describe` runs on the host later, after the device wrote `word`; it may read the tensors it
    closes over then (an error may synchronise).
    """
    if not has_values(word):
        return
    if word.device.type != "cuda":
        _raise(describe, word.tolist())
        return
    if torch.cuda.is_current_stream_capturing():
        return
    host = torch.empty(word.shape, dtype=word.dtype, pin_memory=True)
    host.copy_(word, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending.append((event, host, describe))


def poll() -> None:
    """Raise the first error among the copies the device has finished; never waits.

    Nothing is polled while the current stream captures a CUDA graph: querying an event then is
    an error that invalidates the capture."""
    if _pending and torch.cuda.is_current_stream_capturing():
        return
    while _pending and _pending[0][0].query():
        _, host, describe = _pending.popleft()
        _raise(describe, host.tolist())


def check() -> None:
    """Wait for every deferred check and raise the first error (synchronises with the device)."""
    while _pending:
        event, host, describe = _pending.popleft()
        event.synchronize()
        _raise(describe, host.tolist())


def _raise(describe: Callable[[list[int]], str | None], values: list[int]) -> None:
    message = describe(values)
    if message is not None:
        raise ValueError(message)
