"""Peak memory of a block of code on any device, CPU included: the storages that ops allocate inside the block
and that are alive at the same time (a TorchDispatchMode sees every op; views and in-place writes of storages made
before the block do not count). Memory outside torch (the Triton interpreter's numpy buffers) is not seen."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakNewBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._live = {}  # storage data_ptr -> [bytes, tensors seen that use it]
        self._current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
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
            entry = self._live[key] = [storage.nbytes(), 0]
            self._current += entry[0]
            self.peak = max(self.peak, self._current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self._current -= entry[0]
                del self._live[key]
