"""The side stream of a world: where producers, reductions and collectives run beside the GEMMs.

On CUDA a high-priority stream; on the CPU nothing (every op runs to completion in order), so
every method is a no-op there.
"""

import contextlib

import torch


class SideStream:
    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None

    def __call__(self):
        """Context in which work is queued on the side stream."""
        return torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()

    def fork(self) -> None:
        """The side stream waits for the work queued so far on the current stream."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def join(self) -> None:
        """The current stream waits for everything queued on the side stream."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def record(self, on_side: bool):
        """An event after the work queued so far on the side (or current) stream; None on CPU."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream if on_side else torch.cuda.current_stream(self.device))
        return event

    def wait(self, event, on_side: bool) -> None:
        """The side (or current) stream waits for `event` (from `record`)."""
        if event is not None:
            (self.stream if on_side else torch.cuda.current_stream(self.device)).wait_event(event)
