"""DeePEn's relative space: rows built on demand, cached, and the same either way."""

from __future__ import annotations

import torch

from consort.runtime import relative
from consort.runtime.relative import RelativeSpace


def space() -> RelativeSpace:
    torch.manual_seed(0)
    return RelativeSpace(torch.randn(300, 16), anchor_ids=range(0, 300, 3), temperature=0.1)


def test_rows_are_softmaxed_cosines_and_cached_rows_equal_fresh_ones(monkeypatch) -> None:
    cached, fresh = space(), space()
    ids = torch.tensor([5, 7, 5, 299, 0])
    first = cached.rows(ids)
    torch.testing.assert_close(first.sum(-1), torch.ones(5))
    torch.testing.assert_close(cached.rows(ids), first)  # from the cache
    torch.testing.assert_close(fresh._build_rows(ids.tolist()), first)
    monkeypatch.setattr(relative, "_ROW_CACHE_SIZE", 3)
    cached.rows(torch.tensor([10, 11, 12, 13]))
    assert len(cached._rows) == 3
    torch.testing.assert_close(cached.rows(ids), first)  # evicted rows are rebuilt the same


def test_invert_of_a_projection_keeps_its_top_token() -> None:
    s = space()
    candidates = torch.tensor([1, 2, 3, 4])
    logprobs = torch.log_softmax(torch.tensor([3.0, 1.0, 0.5, 0.0]), -1)
    target = s.project(candidates, logprobs)
    out = s.invert(target, candidates, torch.log_softmax(torch.zeros(4), -1), steps=50, learning_rate=5.0)
    assert int(out.argmax()) == 0
    torch.testing.assert_close(out.exp().sum(), torch.tensor(1.0))


def test_invert_takes_deepens_adamw_steps_with_its_cosine_schedule() -> None:
    """The search is DeePEn's: AdamW on the logits over KLDivLoss(log projection, target), the rate
    annealed by CosineAnnealingLR(T_max=10, eta_min=lr/4), checked against torch's own optimiser."""
    s = space()
    candidates = torch.tensor([1, 2, 3, 4, 5])
    target = s.project(torch.tensor([6, 7, 2]), torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), -1))
    initial = torch.log_softmax(torch.tensor([4.0, 1.0, 0.5, 0.0, -3.0]), -1)
    ours = s.invert(target, candidates, initial, steps=7, learning_rate=0.15)

    logits = initial.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([logits], lr=0.15, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=0.15 / 4)
    rows = s.rows(candidates)
    for _ in range(7):
        projection = torch.softmax(logits, -1) @ rows
        loss = (target * (target.log() - projection.log())).mean()  # torch's KLDivLoss(), DeePEn's loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(ours, torch.log_softmax(logits.detach(), -1), atol=1e-5, rtol=1e-5)
    # A candidate the start finds unlikely moves by about the rate a step, as under Adam it must.
    assert abs(float(ours[4] - initial[4])) > 0.3
