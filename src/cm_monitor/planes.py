"""Random cutting planes: nested orthonormal bases and the grid of plane dimensions.

A cutting plane of dimension ``d`` through an anchor ``x0`` is ``x0 + M θ`` with ``M`` a
``D × d`` matrix of orthonormal columns. Here one random orthonormal basis ``Q`` (``D × d_max``,
the QR factor of a Gaussian matrix) is drawn per (target, anchor) and the ``d``-plane is spanned
by its first ``d`` columns: planes are nested in ``d``, so a point reachable in a small plane is
reachable in every larger one and the outcomes are consistent across ``d``.

Each basis is drawn from its own seed, derived from a base seed and the (target, anchor) key, so
the same anchor and target get the same plane whatever else is measured in the same call, and a
callback that keeps the base seed measures the same planes at every evaluation.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cm_monitor._model import to_device

#: The plane dimensions of the reference notebook (capped at ``D`` and with ``D`` appended).
REFERENCE_DIMS: tuple[int, ...] = (1, 3, 5, 10, 15, 30, 50, 75, 100, 200, 300, 500, 1000)

_SEED_MASK = (1 << 63) - 1


def default_dims(input_dim: int, num: int = 24) -> list[int]:
    """A log-spaced grid of about ``num`` plane dimensions from 1 to ``input_dim`` (inclusive).

    Denser than the reference grid (:data:`REFERENCE_DIMS`) so that small inputs (8 × 8 digits,
    D = 64) are resolved: the read-off interpolates between neighbouring grid points.
    """
    if input_dim < 1:
        raise ValueError(f"`input_dim` must be >= 1, got {input_dim}.")
    if num < 2:
        raise ValueError(f"`num` must be >= 2, got {num}.")
    grid = {max(1, min(input_dim, round(math.exp(t)))) for t in torch.linspace(0, math.log(input_dim), num).tolist()}
    grid.add(input_dim)
    return sorted(grid)


def reference_dims(input_dim: int) -> list[int]:
    """The reference notebook's grid: 1, 3, 5, 10, ..., 1000 below ``input_dim``, then ``input_dim``."""
    return sorted({d for d in REFERENCE_DIMS if d < input_dim} | {input_dim})


def check_dims(dims: Sequence[int] | Tensor | None, input_dim: int) -> list[int]:
    """Validate a grid of plane dimensions: integers in ``[1, input_dim]``, sorted, unique."""
    if dims is None:
        return default_dims(input_dim)
    values = dims.tolist() if isinstance(dims, Tensor) else list(dims)
    if not values:
        raise ValueError("`dims` is empty; expected plane dimensions in [1, D].")
    out = []
    for d in values:
        if isinstance(d, bool) or int(d) != d:
            raise TypeError(f"`dims` must hold integers, got {d!r}.")
        d = int(d)
        if not 1 <= d <= input_dim:
            raise ValueError(f"`dims` holds {d}, outside [1, D] = [1, {input_dim}] (D = number of input elements).")
        out.append(d)
    return sorted(set(out))


def _mix(x: int) -> int:
    """SplitMix64 finalizer: a fixed, well-spread 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def plane_seed(base_seed: int, key: Sequence[int], anchor: int) -> int:
    """The seed of the basis for one (target ``key``, ``anchor``) pair.

    An explicit integer hash (not Python's ``hash``), so a seed saved in a checkpoint gives the same
    planes on every Python version.
    """
    h = _mix(int(base_seed))
    for v in (len(key), *key, anchor):
        h = _mix(h ^ (int(v) & 0xFFFFFFFFFFFFFFFF))
    return h & _SEED_MASK


def nested_bases(
    seeds: Sequence[int],
    input_dim: int,
    max_dim: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random orthonormal bases ``[len(seeds), input_dim, max_dim]``, one per seed.

    The first ``d`` columns of each basis span a uniformly random ``d``-dimensional subspace
    (the QR factor of a Gaussian matrix), and the subspaces are nested in ``d``. Gaussians are
    drawn on the CPU with a generator per seed and then moved to ``device``, so the same seeds span
    the same planes on every device (CUDA's random numbers differ from the CPU's, and between GPU
    models); the QR factorization runs on ``device`` (its rounding, and possibly the columns' signs,
    depend on it: not the planes).
    """
    if not 1 <= max_dim <= input_dim:
        raise ValueError(f"`max_dim` must be in [1, {input_dim}], got {max_dim}.")
    gaussians = torch.empty(len(seeds), input_dim, max_dim, dtype=dtype)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        torch.randn(input_dim, max_dim, generator=gen, dtype=dtype, out=gaussians[i])
    q, _ = torch.linalg.qr(to_device(gaussians, device), mode="reduced")
    return q


#: ``planes="auto"`` uses dense (QR) bases while one basis, ``D × max(dims)``, holds at most this
#: many elements (256 KiB in float32: the full space of a 16 × 16 input, e.g. 8 × 8 digits), and
#: structured planes above (MNIST's D = 784 with the default grid, CIFAR-10, any ImageNet-sized
#: input). In the work pool a dense row costs ``D · max(dims)`` per step and a QR per group: at
#: D = 1024 a tube measurement took 87 s with dense planes and 4.3 s with structured ones, at the
#: same answer (docs/performance.md).
DENSE_MAX_ELEMENTS = 2**16


def choose_planes(planes: str, input_dim: int, max_dim: int) -> str:
    """The plane family used: ``"dense"`` or ``"structured"``; ``"auto"`` picks dense bases while
    ``input_dim · max_dim <= DENSE_MAX_ELEMENTS`` and structured planes above."""
    if planes == "auto":
        return "dense" if input_dim * max_dim <= DENSE_MAX_ELEMENTS else "structured"
    if planes not in ("dense", "structured"):
        raise ValueError(f"`planes` must be 'auto', 'dense' or 'structured', got {planes!r}.")
    return planes


def hartley(x: Tensor) -> Tensor:
    """The orthonormal discrete Hartley transform along the last axis: ``Re(F x) - Im(F x)`` with
    ``F`` the unitary DFT. Real, orthonormal and its own inverse; ``O(n log n)`` by a real FFT.

    Differentiable: ``H`` is symmetric, so the gradient is ``H`` of the incoming gradient, one more
    real FFT (autograd's own backward of ``rfft`` runs a complex FFT of twice the work)."""
    return _Hartley.apply(x)


class _Hartley(torch.autograd.Function):
    """``H`` is linear and symmetric: its backward and its forward-mode derivative are ``H`` again."""

    generate_vmap_rule = True  # torch.func.vmap works as with the plain operators

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _hartley(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _Hartley.apply(grad)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return _Hartley.apply(tangent)


def _hartley(x: Tensor) -> Tensor:
    n = x.shape[-1]
    f = torch.fft.rfft(x, norm="ortho")  # coefficients 0 .. n // 2; F_{n-k} = conj(F_k) gives the rest
    re, im = f.real, f.imag
    return torch.cat([re - im, (re + im)[..., 1 : 1 + (n - 1) // 2].flip(-1)], dim=-1)


class StructuredPlanes:
    """Random nested planes without a ``D × d`` matrix: ``Q[:, :d] = diag(s) · H · E_{π[:d]}``.

    Per group (one seed each): random signs ``s ∈ {±1}^D`` and a random permutation ``π`` of the
    ``D`` coordinates, drawn in that order from a CPU ``torch.Generator`` seeded with the group's
    seed, so the planes do not depend on the device or on which other groups are drawn. ``H`` is
    the orthonormal discrete Hartley transform (:func:`hartley`) of the flattened input and
    ``E_{π[:d]}`` puts the ``d`` plane coordinates at the coordinates ``π[:d]``. The columns are
    orthonormal, the ``d``-plane is spanned by the first ``d`` of them (nested in ``d``), and
    ``Q θ`` costs ``O(D log D)`` time and ``O(D)`` memory per problem. ``Qᵀ`` is the subsampled
    randomized Hartley transform, a standard stand-in for a uniformly random projection.

    Args:
        seeds: one seed per group.
        input_dim: ``D``.
        max_dim: the largest plane dimension (number of basis columns).
        device, dtype: where and in what precision the planes are applied.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        input_dim: int,
        max_dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 1 <= max_dim <= input_dim:
            raise ValueError(f"`max_dim` must be in [1, {input_dim}], got {max_dim}.")
        signs, coords = [], []
        for seed in seeds:
            gen = torch.Generator().manual_seed(int(seed))
            signs.append(torch.randint(0, 2, (input_dim,), generator=gen) * 2 - 1)
            coords.append(torch.randperm(input_dim, generator=gen)[:max_dim])
        self.input_dim, self.max_dim = input_dim, max_dim
        self.signs = to_device(torch.stack(signs), device, dtype)  # [G, D]
        self.coords = to_device(torch.stack(coords), device)  # [G, max_dim]: π[:max_dim]

    def offsets(self, theta: Tensor, rows: Tensor | None = None) -> Tensor:
        """``Q θ`` for plane coordinates ``theta`` ``[G, K, max_dim]`` (``K`` problems per group):
        ``[G · K, D]``, or only the rows ``rows`` of it (indices into ``G · K``), which is cheaper."""
        G, K, _ = theta.shape
        z = theta.new_zeros(G, K, self.input_dim).scatter(-1, self.coords[:, None, :].expand(G, K, -1), theta)
        z = z.reshape(G * K, self.input_dim)
        if rows is None:
            return self.signs.repeat_interleave(K, dim=0) * hartley(z)
        return self.signs[rows // K] * hartley(z[rows])

    def basis(self) -> Tensor:
        """The bases as dense matrices ``[G, D, max_dim]`` (for checks on small ``D``)."""
        G = self.signs.shape[0]
        eye = torch.eye(self.max_dim, device=self.signs.device, dtype=self.signs.dtype)
        cols = self.offsets(eye.expand(G, -1, -1))  # row j of group g: Q_g e_j
        return cols.view(G, self.max_dim, self.input_dim).transpose(1, 2)


class Prefix:
    """Views ``t[:n]`` of named per-row tensors, made again only when ``n`` changes (a work pool
    keeps its active rows a prefix ``[0, n)`` and updates them in place)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors, self.n, self.views = tensors, -1, {}

    def __call__(self, n: int) -> dict[str, Tensor]:
        if n != self.n:
            self.n, self.views = n, {name: t[:n] for name, t in self.tensors.items()}
        return self.views


class PlaneCache:
    """The dense bases of the groups seen last, by seed, at most ``size`` of them (least recently
    used out first). A bisection runs a few problems per group one after the other, each with the same
    plane; drawing a dense plane once saves a QR per problem (0.35 ms at ``D = 64``, 1.8 ms at
    ``D = 256`` on a 2-core CPU). With ``size`` the work pool's rows it holds at most as many
    planes as the pool itself. (Structured planes are not kept: drawing one is a random
    permutation of ``D`` coordinates, about 1 ms at ``D = 150,528``, and keeping them cost more
    memory, on the model's device, than it saved time: 136 MB for 5 % of a 224 × 224 call.)

    Args:
        size: planes kept at most.
        draw: draws the planes of a list of seeds, one tensor per seed.
    """

    def __init__(self, size: int, draw: Callable[[list[int]], list[Tensor]]) -> None:
        self.size, self.draw = max(1, size), draw
        self.planes: OrderedDict[int, Tensor] = OrderedDict()
        self.drawn = 0  # planes drawn so far (for tests and benchmarks)

    def get(self, seeds: list[int]) -> list[Tensor]:
        """The planes of ``seeds`` (a seed may repeat), drawing those not kept in one call."""
        missing = list(dict.fromkeys(s for s in seeds if s not in self.planes))
        fresh = dict(zip(missing, self.draw(missing), strict=True)) if missing else {}
        self.drawn += len(missing)
        out = [fresh[s] if s in fresh else self.planes[s] for s in seeds]
        for s in seeds:
            if s in fresh:
                self.planes[s] = fresh[s]
            self.planes.move_to_end(s)
        while len(self.planes) > self.size:
            self.planes.popitem(last=False)
        return out


class PlaneRows:
    """The planes of the rows of a work pool: row ``r`` holds the nested basis of the group whose
    problem it works on, loaded from that group's seed when the problem starts (:meth:`load`), so a
    row's plane never depends on which other problems share the pass.

    Dense planes keep each row's ``D × max_dim`` basis; structured planes keep its signs and
    coordinates only (``O(D)`` per row). :meth:`apply` computes ``Q θ`` for some rows only.
    """

    def __init__(
        self, family: str, rows: int, input_dim: int, max_dim: int, *, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.family, self.input_dim, self.max_dim = family, input_dim, max_dim
        self.device, self.dtype = device, dtype
        if family == "dense":
            self.basis_t = torch.zeros(rows, max_dim, input_dim, device=device, dtype=dtype)
        else:
            self.signs = torch.zeros(rows, input_dim, device=device, dtype=dtype)
            self.coords = torch.zeros(rows, max_dim, device=device, dtype=torch.long)
        names = ("basis_t",) if family == "dense" else ("signs", "coords")
        self.prefix = Prefix({name: getattr(self, name) for name in names})
        self.cache = PlaneCache(rows, self._bases) if family == "dense" else None

    def _bases(self, seeds: list[int]) -> list[Tensor]:
        """The transposed dense bases of ``seeds``, each its own copy (a kept one holds no other's memory)."""
        bases = nested_bases(seeds, self.input_dim, self.max_dim, device=self.device, dtype=self.dtype)
        return [b.contiguous() for b in bases.transpose(1, 2)]

    def load(self, rows: Tensor, seeds: Sequence[int]) -> None:
        """Give ``rows`` the planes of ``seeds`` (one seed per row); a dense plane drawn for an
        earlier problem of the same group comes from :attr:`cache` (not drawn again)."""
        if self.cache is not None:
            self.basis_t[rows] = torch.stack(self.cache.get([int(s) for s in seeds]))
        else:
            planes = StructuredPlanes(seeds, self.input_dim, self.max_dim, device=self.device, dtype=self.dtype)
            self.signs[rows], self.coords[rows] = planes.signs, planes.coords

    def reorder(self, order: Tensor) -> None:
        """Rows ``[0, len(order))`` get the planes of rows ``order`` (the work pool keeps its active
        rows a prefix)."""
        n = order.shape[0]
        for t in (self.basis_t,) if self.family == "dense" else (self.signs, self.coords):
            t[:n] = t[order]

    def apply(self, theta: Tensor) -> Tensor:
        """``Q_r θ_r`` ``[n, D]`` for plane coordinates ``theta`` ``[n, w]`` of the rows ``[0, n)``:
        the first ``w <= max_dim`` coordinates (the others are zero)."""
        (n, w), rows = theta.shape, self.prefix(theta.shape[0])
        if self.family == "dense":
            return torch.bmm(theta[:, None, :], rows["basis_t"][:, :w]).squeeze(1)
        z = theta.new_zeros(n, self.input_dim).scatter(1, rows["coords"][:, :w], theta)
        return rows["signs"] * hartley(z)
