"""kernelbase.deferred: device-found errors raised on the host without a sync per call."""

import pytest
import torch

from kernelbase import deferred


def _describe(values):
    return None if values[0] == 0 else f"word holds {values}"


def test_cpu_words_are_checked_at_once_and_words_without_values_never():
    deferred.defer(torch.zeros(2, dtype=torch.int32), _describe)  # nothing wrong
    with pytest.raises(ValueError, match=r"word holds \[3, 1\]"):
        deferred.defer(torch.tensor([3, 1], dtype=torch.int32), _describe)
    deferred.defer(torch.ones(2, dtype=torch.int32, device="meta"), _describe)
    assert not deferred._pending


@pytest.mark.gpu
def test_cuda_words_raise_in_order_and_reuse_their_pinned_words():
    """Errors surface at poll() once the device got there, or at check(), oldest first; the
    pinned words and events of finished checks are reused, not allocated per call."""
    deferred.check()
    words = [torch.tensor([i % 3, i], dtype=torch.int32, device="cuda") for i in range(12)]
    for word in words[:3]:
        deferred.defer(word, _describe)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"word holds \[1, 1\]"):  # 0 passed, 1 raised
        deferred.poll()
    with pytest.raises(ValueError, match=r"word holds \[2, 2\]"):
        deferred.check()
    key = (words[0].device, words[0].shape, words[0].dtype)
    pinned = {host.data_ptr() for _, host in deferred._free[key]}
    assert len(pinned) >= 3
    zero = torch.zeros(2, dtype=torch.int32, device="cuda")
    for _ in range(100):  # back to back: at most one check pending at each poll
        deferred.defer(zero, _describe)
        torch.cuda.synchronize()
        deferred.poll()
    assert not deferred._pending
    assert {host.data_ptr() for _, host in deferred._free[key]} == pinned
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the event follows the copy on the current stream
        torch.cuda._sleep(10_000_000)
        deferred.defer(torch.tensor([5, 0], dtype=torch.int32, device="cuda"), _describe)
    deferred.poll()  # the copy waits behind the sleep: nothing to raise yet
    with pytest.raises(ValueError, match=r"word holds \[5, 0\]"):
        deferred.check()
