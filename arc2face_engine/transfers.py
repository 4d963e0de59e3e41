"""Host <-> device copies that never block on more than they must, on the right device.

Both directions go through pinned (page-locked) host memory, so the copy engine moves the
bytes while the host goes on. On a machine with several GPUs, the stream that queues a copy
and the event the host waits on must belong to the device that holds the tensor: a bare
`torch.cuda.Event()` is recorded on the *current* device's stream, which for a shard thread
working on cuda:1 is cuda:0's, so the host would read the pinned buffer before the copy
from cuda:1 has landed. Everything here names the tensor's device explicitly.
"""

from __future__ import annotations

import numpy as np
import torch


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A device tensor as a numpy array: one copy into pinned memory on the tensor's own
    device and stream, and one wait, for that copy only (CPU tensors: as they are)."""
    if tensor.device.type != "cuda":
        return tensor.detach().cpu().numpy()
    with torch.cuda.device(tensor.device):
        stream = torch.cuda.current_stream(tensor.device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)  # queued on `stream`, the producer's stream
        copied = torch.cuda.Event()
        copied.record(stream)
    copied.synchronize()
    return host.numpy()


def pinned_from_numpy(arrays: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """Host arrays stacked straight into one pinned buffer (no pageable intermediate)."""
    first = arrays[0]
    count = len(arrays)
    dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype  # read-only inputs too
    host = torch.empty((count, *first.shape), dtype=dtype,
                       pin_memory=torch.cuda.is_available())  # fmt: skip
    np.stack(arrays, out=host.numpy())
    return host


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> `device` without blocking the host, queued on that device's current stream
    (the caller's, e.g. the face analyzer's own stream). CPU: the tensor as it is."""
    if device.type != "cuda":
        return host
    if not host.is_pinned():
        host = host.pin_memory()
    with torch.cuda.device(device):
        return host.to(device, non_blocking=True)
