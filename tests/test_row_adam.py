"""RowAdam, the work pool's per-row optimizer, against torch.optim.Adam and its own definition."""

from __future__ import annotations

import torch

from cm_monitor.cutting import RowAdam

LIVE = [4, 2, 3]  # plane dimension of each row; the pool's width is 6, its pass width 4


def _grads(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(len(LIVE), 4, generator=g, dtype=torch.float64) for _ in range(steps)]


def _coords() -> torch.Tensor:
    return (torch.arange(4)[None, :] < torch.tensor(LIVE)[:, None]).double()


def test_adam_rows_match_torch_adam_each_and_restart_independently():
    theta = torch.zeros(len(LIVE), 6, dtype=torch.float64)
    opt = RowAdam(theta, lr=0.05, isotropic=False)
    params = [torch.zeros(6, dtype=torch.float64, requires_grad=True) for _ in LIVE]
    refs = [torch.optim.Adam([p], lr=0.05) for p in params]
    coords, live = _coords(), torch.tensor(LIVE, dtype=torch.float64)
    for step, grad in enumerate(_grads(12)):
        if step == 5:  # row 1 starts a new problem: fresh state, its neighbours go on
            opt.reset(torch.tensor([1]))
            theta[1] = 0.0
            params[1] = torch.zeros(6, dtype=torch.float64, requires_grad=True)
            refs[1] = torch.optim.Adam([params[1]], lr=0.05)
        opt.step(grad * coords, live)  # the pool's gradient is zero beyond each row's plane
        for r, (p, ref) in enumerate(zip(params, refs, strict=True)):
            p.grad = torch.nn.functional.pad(grad[r] * coords[r], (0, 2))
            ref.step()
    for r, p in enumerate(params):
        torch.testing.assert_close(theta[r], p.detach())
    assert (theta[:, 4:] == 0).all() and theta[1, 2:].eq(0).all()  # masked coordinates never move


def test_isotropic_rows_follow_their_mean_square():
    theta = torch.zeros(len(LIVE), 6, dtype=torch.float64)
    opt = RowAdam(theta, lr=0.1, isotropic=True)
    coords, live = _coords(), torch.tensor(LIVE, dtype=torch.float64)
    b1, b2 = opt.betas
    want = torch.zeros(len(LIVE), 4, dtype=torch.float64)
    m, v = torch.zeros_like(want), torch.zeros(len(LIVE), dtype=torch.float64)
    for t, grad in enumerate(_grads(7), start=1):
        g = grad * coords
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g.pow(2).sum(1) / live
        opt.step(g, live)
        step = 0.1 * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt()[:, None] + 1e-8)
        want = want - step
        torch.testing.assert_close(theta[:, :4], want)
    assert (theta[:, 4:] == 0).all()  # coordinates beyond the pass width never move
