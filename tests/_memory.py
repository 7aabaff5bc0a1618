"""Peak memory of a block of code on any device, CPU included: the storages that ops allocate inside the block
and that are alive at the same time (a TorchDispatchMode sees every op; views and in-place writes of storages made
before the block do not count). Memory outside torch (the Triton interpreter's numpy buffers) is not seen."""
import itertools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakNewBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._live = {}  # storage data_ptr -> [allocation id, bytes, tensors seen that use it]
        self._events = []  # (allocation id, +bytes or -bytes), in order
        self._ids = itertools.count()

    @property
    def peak(self) -> int:
        return self.peak_excluding()

    def peak_excluding(self, *tensors: torch.Tensor) -> int:
        """Peak of the live bytes, not counting the storages of `tensors` (e.g. the gradients a call returns) at
        any time: a peak reached before they were allocated counts in full."""
        skip = {self._live[t.untyped_storage().data_ptr()][0] for t in tensors
                if t is not None and t.untyped_storage().data_ptr() in self._live}
        current = peak = 0
        for alloc, delta in self._events:
            if alloc not in skip:
                current += delta
                peak = max(peak, current)
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._live.get(key)
        if entry is None:
            if key in inputs:
                return  # a view of, or a write into, a storage that existed before the op
            entry = self._live[key] = [next(self._ids), storage.nbytes(), 0]
            self._events.append((entry[0], entry[1]))
        entry[2] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is not None:
            entry[2] -= 1
            if entry[2] == 0:
                self._events.append((entry[0], -entry[1]))
                del self._live[key]
