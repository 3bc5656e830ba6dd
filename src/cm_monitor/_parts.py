"""Splitting a measurement into shares (one per process or device) and checking them before a merge.

A measurement made of independent units (the (target, anchor) groups of the cutting planes, the
probe images of ``R_f``, the SGD steps of local elasticity) can be run in ``count`` shares: share
``index`` takes the units ``u`` with ``u % count == index`` (interleaved, so that every share gets
units of every class). The estimators take ``part=(index, count)`` and return a partial estimate;
their ``merge`` combines the ``count`` partial estimates into the estimate of the whole, equal to
the one measured in one piece.

Pure PyTorch; no ``torch.distributed`` here: who runs which share, and how the partial estimates
travel, is the caller's business (the callbacks gather them across ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Part = tuple[int, int]


def check_part(part: object) -> Part | None:
    """``part`` as ``(index, count)`` with ``0 <= index < count``; None (or ``(0, 1)``): the whole."""
    if part is None:
        return None
    ok = (
        isinstance(part, tuple | list)
        and len(part) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in part)
        and 0 <= part[0] < part[1]
    )
    if not ok:
        raise ValueError(f"`part` must be None or (index, count) with 0 <= index < count, got {part!r}.")
    return None if part[1] == 1 else (int(part[0]), int(part[1]))


def owned(num_units: int, part: Part | None) -> Tensor:
    """``[num_units]`` bool: the units share ``part`` measures (all of them for ``None``)."""
    if part is None:
        return torch.ones(num_units, dtype=torch.bool)
    return torch.arange(num_units) % part[1] == part[0]


def check_shares(parts: Sequence[Part | None], what: str) -> int:
    """The number of shares, after checking that ``parts`` are each share of one split exactly once."""
    if not parts:
        raise ValueError(f"No {what} to merge.")
    if any(p is None for p in parts):
        if len(parts) == 1:
            return 1
        raise ValueError(f"Only partial {what} (measured with `part=`) can be merged; one is complete.")
    count = parts[0][1]  # type: ignore[index]
    if sorted(parts) != [(i, count) for i in range(count)]:  # type: ignore[type-var]
        raise ValueError(
            f"The {what} are the shares {sorted(parts)}; expected each of (0, {count}) … ({count - 1}, {count}) once."
        )  # type: ignore[type-var]
    return count
