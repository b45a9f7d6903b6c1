"""Count the Tensor calls that read values back to the host (each one a device sync on a GPU).

Why: a CPU machine has no ``torch.cuda.set_sync_debug_mode``, but the calls that would sync on a GPU are the same
Python calls: ``.item()``, ``.tolist()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``.cpu()``, ``.numpy()``.
:func:`count_host_reads` wraps those methods of ``torch.Tensor`` for the duration of a ``with`` block, counts each
call by kind and by the file and line that made it, and forwards it unchanged (it observes, it does not replace).
Used by tests/test_hot_loop.py and by ``tools/bench_model.py`` (``host_syncs_per_step``).
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

READ_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@dataclass
class HostReads:
    by_kind: dict[str, int] = field(default_factory=lambda: collections.Counter())
    by_site: dict[str, int] = field(default_factory=lambda: collections.Counter())  # "path:line kind"

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def from_files(self, fragment: str) -> int:
        """Calls made from files whose path contains ``fragment`` (e.g. "/nestor_ds/")."""
        return sum(v for k, v in self.by_site.items() if fragment in k)


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Count host reads of tensors inside the block (not thread-safe: for tests and benchmarks)."""
    reads = HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in READ_METHODS}

    def wrap(name: str, fn):
        def counted(self, *args, **kwargs):
            frame = sys._getframe(1)
            reads.by_kind[name] += 1
            reads.by_site[f"{frame.f_code.co_filename}:{frame.f_lineno} {name}"] += 1
            return fn(self, *args, **kwargs)

        counted.__name__ = name
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield reads
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
