"""Errors found on the device, raised on the host without a synchronisation per call.

A check that needs the values of a CUDA tensor (expert ids in range, router logits finite) would
cost one host synchronisation per call, which stalls the launch queue of every later layer. So
the op writes an error word on the device (a count, a flag, a value) and calls
`defer(word, describe)`: the word is copied into pinned host memory behind a CUDA event, and the
next op that calls `poll()` raises what a finished copy shows, or `check()` waits for every copy
and raises. An error therefore surfaces at the latest at the next moeblaze call after the GPU got
there, or at `check()`.

On the CPU a read costs nothing: `defer` checks at once. While a CUDA graph is being captured
nothing is deferred (a capture may not read memory back to the host), nor is a word without
values: a fake tensor (under FakeTensorMode, as when a model's memory is estimated) or one on the
meta device.

The pinned words and their events are pooled per device, shape and dtype, and allocated
`POOL_GROWTH` at a time: a check costs one device-to-host copy and one event record. A pinned
allocation (cudaHostAlloc, tens of microseconds or more) happens only when more checks are in
flight than ever before, i.e. while the host runs further ahead of the GPU than it has yet.
"""

import collections
from collections.abc import Callable

import torch

from kernelbase.backend import has_values

_pending: collections.deque = collections.deque()  # (event, pinned word, pool key, describe)
_free: dict[tuple, list] = {}  # (device, shape, dtype) -> [(event, pinned word)] to reuse
POOL_GROWTH = 64  # pinned words allocated at once when none is free


def defer(word: torch.Tensor, describe: Callable[[list], str | None]) -> None:
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
    key = (word.device, word.shape, word.dtype)
    pool = _free.setdefault(key, [])
    if not pool:
        words = torch.empty((POOL_GROWTH, *word.shape), dtype=word.dtype, pin_memory=True)
        pool.extend((torch.cuda.Event(), host) for host in words)
    event, host = pool.pop()
    host.copy_(word, non_blocking=True)  # on the current stream of word's device
    event.record(torch.cuda.current_stream(word.device))
    _pending.append((event, host, key, describe))


def poll() -> None:
    """Raise the first error among the copies the device has finished; never waits.

    Nothing is polled while the current stream captures a CUDA graph: querying an event then is
    an error that invalidates the capture."""
    if _pending and torch.cuda.is_current_stream_capturing():
        return
    while _pending and _pending[0][0].query():
        _raise(*_release())


def check() -> None:
    """Wait for every deferred check and raise the first error (synchronises with the device)."""
    while _pending:
        _pending[0][0].synchronize()
        _raise(*_release())


def _release() -> tuple[Callable[[list], str | None], list]:
    """Take the oldest pending check (its copy has finished): (describe, the word's values); its
    event and pinned word go back to the pool."""
    event, host, key, describe = _pending.popleft()
    values = host.tolist()
    _free[key].append((event, host))
    return describe, values


def _raise(describe: Callable[[list], str | None], values: list) -> None:
    message = describe(values)
    if message is not None:
        raise ValueError(message)
