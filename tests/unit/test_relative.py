"""DeePEn's relative space: rows built on demand, cached, and the same either way."""

from __future__ import annotations

import torch

from consort.runtime import relative
from consort.runtime.relative import RelativeSpace


def space(cache_rows: int = relative.ROW_CACHE_SIZE) -> RelativeSpace:
    torch.manual_seed(0)
    return RelativeSpace(torch.randn(300, 16), anchor_ids=range(0, 300, 3), temperature=0.1, cache_rows=cache_rows)


def test_rows_are_softmaxed_cosines_and_cached_rows_equal_fresh_ones() -> None:
    cached, fresh = space(cache_rows=5), space()
    ids = torch.tensor([5, 7, 5, 299, 0])
    first = cached.rows(ids)
    torch.testing.assert_close(first.sum(-1), torch.ones(5))
    torch.testing.assert_close(cached.rows(ids), first)  # from the cache
    torch.testing.assert_close(fresh._build_rows(ids), first)
    assert cached.cached_rows == 4
    cached.rows(torch.tensor([10, 11, 12]))  # evicts the least recently used
    assert cached.cached_rows == 5
    torch.testing.assert_close(cached.rows(ids), first)  # evicted rows are rebuilt the same
    # Any shape: [B, C] ids give [B, C, A]; more distinct ids than the cache holds are built uncached.
    grid = torch.arange(12).reshape(2, 6)
    torch.testing.assert_close(cached.rows(grid), fresh._build_rows(grid.reshape(-1)).reshape(2, 6, -1))


def test_rows_in_use_are_not_evicted_by_the_same_lookup() -> None:
    s, fresh = space(cache_rows=4), space()
    s.rows(torch.tensor([1, 2]))
    s.rows(torch.tensor([3, 4]))
    # 1 and 2 are the oldest; 2 is asked again alongside two new tokens, so 1 and one of 3, 4 make room.
    out = s.rows(torch.tensor([2, 5, 6]))
    torch.testing.assert_close(out, fresh._build_rows(torch.tensor([2, 5, 6])))
    assert int(s._slot_of[2]) >= 0 and int(s._slot_of[1]) == -1
    assert s.cached_rows == 4
    torch.testing.assert_close(s.rows(torch.tensor([4, 2])), fresh._build_rows(torch.tensor([4, 2])))


def test_a_batch_of_searches_equals_each_search_alone() -> None:
    """Ragged candidate sets, one already matched (it must stop where it started) and the others moving."""
    s = space()
    torch.manual_seed(1)
    candidates = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([8, 9]), torch.tensor([20, 21, 22])]
    initials = [torch.log_softmax(torch.randn(len(c)), -1) for c in candidates]
    targets = [
        s.project(torch.tensor([6, 7, 2]), torch.log_softmax(torch.tensor([2.0, 1.0, 0.0]), -1)),
        s.project(candidates[1], initials[1]),  # its own projection: nothing to search
        s.project(torch.tensor([40, 41]), torch.log_softmax(torch.tensor([0.5, 0.0]), -1)),
    ]
    batched = s.invert_many(targets, candidates, initials, steps=6, learning_rate=0.3)
    for target, c, initial, out in zip(targets, candidates, initials, batched, strict=True):
        alone = s.invert(target, c, initial, steps=6, learning_rate=0.3)
        assert out.shape == c.shape
        torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], initials[1], atol=1e-6, rtol=1e-6)
    assert (batched[0] - initials[0]).abs().max() > 0.1


def test_a_batch_of_projections_equals_each_alone() -> None:
    s = space()
    ids = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([7, 8])]
    values = [torch.log_softmax(torch.tensor(v), -1) for v in ([1.0, 0.0, -1.0], [0.0], [2.0, 0.5])]
    together = s.project_many(ids, values)
    assert together.shape == (3, s.num_anchors)
    for row, i, v in zip(together, ids, values, strict=True):
        torch.testing.assert_close(row, torch.softmax(v, -1) @ s.rows(i))
        torch.testing.assert_close(row.sum(), torch.tensor(1.0))


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
