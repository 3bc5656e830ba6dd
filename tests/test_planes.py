"""Structured random planes (random signs, Hartley transform, random coordinates) for large inputs.

The unit: an orthonormal, nested, seeded family. The known answers: at D >= 1024 structured planes
give the dimensions that dense (QR) planes give on a tube and on a half-space within a radius.
"""

import pytest
import torch
from torch import nn

from cm_monitor import OptimizerSettings, cm_dimension
from cm_monitor.cutting import REFERENCE_SETTINGS
from cm_monitor.planes import DENSE_MAX_ELEMENTS, PlaneRows, StructuredPlanes, choose_planes, hartley, plane_seed
from cm_monitor.synthetic import HalfSpace, Tube

SEEDS = [plane_seed(0, (1,), a) for a in range(3)]


def zeros(n):
    return torch.zeros(n, dtype=torch.long)


def unbounded(planes):
    return OptimizerSettings(max_radius=None, temperature=1.0, planes=planes)


# ------------------------------------------------------------------------------------ the unit


@pytest.mark.parametrize("n", [16, 37])
def test_hartley_is_the_real_orthonormal_involution(n):
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = torch.fft.fft(x, norm="ortho")
    torch.testing.assert_close(hartley(x), f.real - f.imag)
    torch.testing.assert_close(hartley(hartley(x)), x)
    torch.testing.assert_close(hartley(x).norm(dim=1), x.norm(dim=1))


@pytest.mark.parametrize("n", [16, 37])
def test_hartley_gradient_is_the_transpose_of_its_matrix(n):
    """The hand-written backward (H is symmetric) against the dense matrix's, and gradcheck."""
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weight = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((hartley(x) * weight).sum(), x)
    matrix = hartley(torch.eye(n, dtype=torch.float64))  # row j: H e_j
    torch.testing.assert_close(grad, weight @ matrix.T)
    assert "Hartley" in type(hartley(x).grad_fn).__name__  # the hand-written backward, not rfft's
    assert torch.autograd.gradcheck(hartley, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(hartley, (x,))
    tangent = weight
    value, derivative = torch.func.jvp(hartley, (x.detach(),), (tangent,))
    torch.testing.assert_close(value, hartley(x.detach()))
    torch.testing.assert_close(derivative, hartley(tangent))
    torch.testing.assert_close(torch.func.vmap(hartley)(x.detach()), hartley(x.detach()))


@pytest.mark.parametrize("D", [48, 37])
def test_structured_basis_is_orthonormal_nested_and_seeded(D):
    planes = StructuredPlanes(SEEDS, D, 20, dtype=torch.float64)
    q = planes.basis()  # [G, D, 20]
    assert q.shape == (3, D, 20)
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(20, dtype=torch.float64).expand(3, -1, -1))
    # nested: the 8-plane is spanned by the first 8 columns of the 20-plane's basis
    torch.testing.assert_close(StructuredPlanes(SEEDS, D, 8, dtype=torch.float64).basis(), q[..., :8])
    # reproducible from the seed, whatever other groups are drawn with it; other seeds, other planes
    torch.testing.assert_close(StructuredPlanes(SEEDS[1:2], D, 20, dtype=torch.float64).basis()[0], q[1])
    assert (q[0] - q[1]).abs().max() > 0.1 and (q[1] - q[2]).abs().max() > 0.1
    # dense: every column spreads over all coordinates (no axis-aligned directions)
    assert float(q.abs().amax((1, 2)).max()) < 4 / D**0.5


def test_offsets_are_the_basis_times_the_coordinates():
    D, d = 40, 12
    planes = StructuredPlanes(SEEDS, D, d, dtype=torch.float64)
    theta = torch.randn(3, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense = torch.einsum("gij,gkj->gki", planes.basis(), theta).reshape(15, D)
    torch.testing.assert_close(planes.offsets(theta), dense)
    rows = torch.tensor([0, 4, 7, 14])
    torch.testing.assert_close(planes.offsets(theta, rows), dense[rows])
    # ‖Q θ‖ = ‖θ‖: the radius projection on θ is a projection on the plane point
    torch.testing.assert_close(dense.norm(dim=1), theta.reshape(15, d).norm(dim=1))


def test_auto_picks_dense_for_small_inputs_and_structured_for_large_ones():
    assert choose_planes("auto", 64, 64) == "dense"  # 8 x 8 digits
    assert choose_planes("auto", 256, 256) == "dense"  # the bound itself: D · max(dims) = 2**16
    assert DENSE_MAX_ELEMENTS == 2**16
    assert choose_planes("auto", 784, 784) == "structured"  # MNIST
    assert choose_planes("auto", 3072, 3072) == "structured"  # CIFAR-10, default grid
    assert choose_planes("auto", 3072, 20) == "dense"  # a grid that stops at 20: the basis is small
    assert choose_planes("auto", 3 * 224 * 224, 3 * 224 * 224) == "structured"
    assert choose_planes("dense", 3072, 3072) == "dense" and choose_planes("structured", 64, 64) == "structured"
    assert REFERENCE_SETTINGS.planes == "dense" and OptimizerSettings().planes == "auto"
    with pytest.raises(ValueError, match="`planes` must be"):
        OptimizerSettings(planes="random")


def test_structured_path_builds_no_dense_basis_and_chunks_by_problems(monkeypatch):
    from cm_monitor import cutting, planes

    def forbidden(*args, **kwargs):
        raise AssertionError("dense basis drawn on the structured path")

    D = 2048
    model = Tube(D, 128)
    anchors = model.sample_outside(4)
    kw = dict(classes=[1], dims=[1856, 1920, 1984], settings=unbounded("auto"), max_steps=100)
    whole = cm_dimension(model, anchors, zeros(4), **kw)
    sizes = []
    real = planes.StructuredPlanes

    def spy(seeds, *args, **kwargs):
        sizes.append(len(seeds))
        return real(seeds, *args, **kwargs)

    monkeypatch.setattr(planes, "nested_bases", forbidden)
    monkeypatch.setattr(planes, "StructuredPlanes", spy)
    monkeypatch.setattr(cutting, "MAX_PROBLEM_ELEMENTS", 2 * D)  # two problems per pass
    capped = cm_dimension(model, anchors, zeros(4), **kw)
    assert max(sizes) <= 2  # planes loaded for at most two free rows at a time
    assert sum(sizes) == int(capped.probed.sum())  # once per problem
    torch.testing.assert_close(capped.scores, whole.scores, equal_nan=True)  # the pool size changes nothing


def test_structured_planes_leave_rng_and_gradients_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(6, 64), torch.arange(6) % 3
    rng = torch.get_rng_state()
    est = cm_dimension(model, x, y, dims=[4, 16, 64], max_steps=20, settings=OptimizerSettings(planes="structured"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    again = cm_dimension(model, x, y, dims=[4, 16, 64], max_steps=20, settings=OptimizerSettings(planes="structured"))
    assert torch.equal(est.scores.nan_to_num(-1), again.scores.nan_to_num(-1))


# ------------------------------------------------------------------------------- known answers


def test_tube_structured_matches_dense_at_d_1024():
    """Class 1 within radius 1 of a 128-dim subspace of R^1024: dimension ≈ 128 (a little below for a
    thin tube); dense and structured planes agree (measured: 120.1 and 120.1)."""
    D, k = 1024, 128
    model = Tube(D, k)
    anchors = model.sample_outside(6)
    kw = dict(classes=[1], dims=[880, 912, 944, 976], lr=0.3)
    dense = cm_dimension(model, anchors, zeros(6), **kw, settings=unbounded("dense"))
    structured = cm_dimension(model, anchors, zeros(6), **kw, settings=unbounded("structured"))
    assert abs(float(structured.dimension[0]) - float(dense.dimension[0])) <= 8, (dense.dimension, structured.dimension)
    for est in (dense, structured):
        assert k - 24 <= float(est.dimension[0]) <= k + 4, est.dimension
        assert float(est.curve[0, 0]) == 0.0 and float(est.curve[0, -1]) == 1.0


def _anchors_at_distance(D, n, h, seed=1):
    """Anchors of class 0 of the HalfSpace at distance ``h`` from its hyperplane, each of norm 1."""
    model = HalfSpace(D)
    w = model.linear.weight.detach()[0]
    n_hat = w / w.norm()
    z = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    z = z - (z @ n_hat)[:, None] * n_hat
    z = z / z.norm(dim=1, keepdim=True) * (1 - h**2) ** 0.5
    return model, z - h * n_hat


@pytest.mark.parametrize(
    ("D", "ratio", "exact"),
    # exact: the d at which the median of Beta(d/2, (D - d)/2) is ratio² (scipy's betaincinv)
    [(1024, 0.25, 64.58), (1024, 0.35, 125.94), (2048, 0.25, 128.58)],
)
def test_half_space_within_a_radius_structured_matches_dense(D, ratio, exact):
    """A d-plane reaches the hyperplane within radius R iff R · ‖Q_dᵀ n‖ >= h; for uniformly random
    planes ‖Q_dᵀ n‖² ~ Beta(d/2, (D - d)/2), so half of them succeed at the d where its median is
    (h/R)². Structured planes (‖Q_dᵀ n‖² the sum of d random entries of the randomly signed Hartley
    transform of n) agree within the anchors' sampling error (measured d*, dense / structured:
    62.3 / 62.9, 121.9 / 126.0, 122.0 / 129.0)."""
    model, anchors = _anchors_at_distance(D, 24, ratio)
    assert bool((model(anchors).argmax(1) == 0).all())
    dims = sorted({max(1, round(exact * f)) for f in (0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0)})
    kw = dict(classes=[1], threshold=0.5, dims=dims)
    dense = cm_dimension(model, anchors, zeros(24), **kw, settings=OptimizerSettings(max_radius=1.0, planes="dense"))
    structured = cm_dimension(
        model, anchors, zeros(24), **kw, settings=OptimizerSettings(max_radius=1.0, planes="structured")
    )
    for est in (dense, structured):
        assert abs(float(est.cutting_dim[0]) - exact) <= 0.15 * exact, est.cutting_dim
    assert abs(float(structured.cutting_dim[0]) - float(dense.cutting_dim[0])) <= 0.15 * exact


def test_dense_bases_are_drawn_from_the_cpu_generator():
    """The Gaussians come from a CPU generator per seed (the same on every device)."""
    from cm_monitor.planes import nested_bases

    gaussian = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(nested_bases([7], 16, 4)[0], torch.linalg.qr(gaussian)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["dense", "structured"])
def test_planes_are_the_same_on_cuda(family):
    """The same seeds span the same nested planes on the GPU (QR may flip a column's sign)."""
    from cm_monitor.planes import nested_bases

    seeds = [plane_seed(0, (1,), a) for a in range(3)]
    if family == "dense":
        cpu, gpu = nested_bases(seeds, 64, 8), nested_bases(seeds, 64, 8, device="cuda").cpu()
    else:
        cpu = StructuredPlanes(seeds, 64, 8).basis()
        gpu = StructuredPlanes(seeds, 64, 8, device="cuda").basis().cpu()
    for d in (1, 3, 8):  # the projector onto each nested plane
        p_cpu, p_gpu = cpu[..., :d] @ cpu[..., :d].mT, gpu[..., :d] @ gpu[..., :d].mT
        torch.testing.assert_close(p_gpu, p_cpu, atol=1e-4, rtol=0)


def test_plane_rows_draw_a_groups_dense_plane_once_and_keep_at_most_their_rows():
    """A group's later problems take its dense basis from the cache: bit for bit a fresh draw,
    drawn once; the cache keeps at most as many bases as the pool has rows (least recent out)."""
    D, max_dim = 32, 8
    rows = PlaneRows("dense", 3, D, max_dim, device=torch.device("cpu"), dtype=torch.float32)
    fresh = PlaneRows("dense", 3, D, max_dim, device=torch.device("cpu"), dtype=torch.float32)
    assert PlaneRows("structured", 3, D, max_dim, device=torch.device("cpu"), dtype=torch.float32).cache is None
    theta = torch.randn(3, max_dim, generator=torch.Generator().manual_seed(0))
    rows.load(torch.arange(3), [11, 12, 11])  # a seed twice in one refill: drawn once
    assert rows.cache.drawn == 2
    rows.load(torch.tensor([1]), [11])  # a later problem of group 11: from the cache
    assert rows.cache.drawn == 2
    fresh.load(torch.arange(3), [11, 11, 12])
    rows.load(torch.arange(3), [11, 11, 12])
    assert torch.equal(rows.apply(theta), fresh.apply(theta))  # bit for bit the planes of a fresh draw
    rows.load(torch.arange(3), [13, 14, 15])  # three new groups: 11 and 12 are dropped
    assert rows.cache.drawn == 5 and list(rows.cache.planes) == [13, 14, 15]
    rows.load(torch.tensor([0]), [11])
    assert rows.cache.drawn == 6  # drawn again, to the same plane
    fresh.load(torch.tensor([0]), [11])
    assert torch.equal(rows.apply(theta)[:1], fresh.apply(theta)[:1])


def test_tube_anchors_follow_the_models_device_and_not_its_generator():
    # the noise is drawn on the CPU and moved: a model on another device (meta here, CUDA on a GPU)
    # gets anchors on its device, from the same draw
    cpu = Tube(64, 16).sample_outside(3)
    moved = Tube(64, 16).to("meta").sample_outside(3)
    assert moved.device.type == "meta" and moved.shape == cpu.shape
    g = torch.Generator().manual_seed(1)
    tube = Tube(64, 16)
    assert torch.equal(cpu, (tube.center + torch.randn(3, 64, generator=g) * tube.radius) * tube.input_scale)
