"""The CPU threading layout every recorded or replayed forward runs under.

A CPU forward is bit-identical run to run only under the same threading layout. ``torch.get_num_threads()``
alone does not describe it: until ``torch.set_num_threads`` is called in a process, MKL runs in *dynamic* mode
and picks its own thread count per call (one thread inside OpenMP regions, e.g. the sgemms of CPU attention);
after the first ``set_num_threads`` call it uses exactly the count it is given. ``MKL_VERBOSE=1`` shows it
(``Dyn:1 ... NThr:1`` before, ``Dyn:0 ... NThr:2`` after). A bundle recorded in a fresh process (dynamic) and
replayed under a pinned count (not dynamic) runs different kernels, and on some CPUs they round differently.

So the recorder, the replayer and CCA all run their forwards inside :func:`pinned_threads`: one explicit
``set_num_threads`` (OpenMP threads = MKL threads = ``n``, MKL dynamic off), the count written to the bundle
(``environment/torch_num_threads``, ``environment/threading``), the caller's setting restored afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

#: How the bundle's environment describes the layout (``environment/threading``).
THREADING = "torch.set_num_threads(n): OpenMP and MKL threads = n, MKL dynamic threading off"


@contextmanager
def pinned_threads(n: int | None = None) -> Iterator[int]:
    """Run the body with ``n`` intra-op threads set explicitly (``None``/0: the current count); yields the count.

    The previous count is set again afterwards (MKL dynamic threading stays off: that is torch's own behaviour
    after any ``set_num_threads`` call and changes no result of a pinned forward).
    """
    prev = torch.get_num_threads()
    want = int(n) if n else prev
    if want < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    try:
        torch.set_num_threads(want)
        yield want
    finally:
        torch.set_num_threads(prev)
