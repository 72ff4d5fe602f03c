"""The CoOp recipe's arithmetic and the accuracy metrics, against direct references."""

from __future__ import annotations

import math

import pytest
import torch

from vlprompt.engine import accuracy_report, batches_per_epoch, coop_lr, default_epochs
from vlprompt.engine.trainer import epoch_batches


def test_lr_matches_the_logged_values_of_coop_issue_26():
    lrs = [coop_lr(e, 50, 0.002) for e in range(5)]
    assert lrs[0] == 1e-5
    for got, want in zip(lrs[1:], [2.000e-3, 1.998027e-3, 1.992115e-3, 1.982287e-3]):
        assert abs(got - want) < 5e-10


def test_lr_matches_torch_cosine_annealing_after_warmup():
    """Dassl wraps CosineAnnealingLR(T_max=E) in a 1-epoch constant warm-up; the successor starts after it."""
    E = 20
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.002)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=E)
    expected = [1e-5]
    for _ in range(1, E):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    for e in range(E):
        assert math.isclose(coop_lr(e, E, 0.002), expected[e], rel_tol=1e-9, abs_tol=1e-15)
    assert coop_lr(E - 1, E, 0.002) > 0  # the last epoch does not reach zero


@pytest.mark.parametrize("n, bs, want", [(1600, 32, 50), (37, 32, 1), (10, 32, 1), (20, 32, 1), (32, 32, 1),
                                         (0, 32, 0), (63, 32, 1), (64, 32, 2)])
def test_drop_last_rule(n, bs, want):
    assert batches_per_epoch(n, bs) == want
    batches = epoch_batches(n, bs, torch.Generator().manual_seed(0))
    assert len(batches) == want
    if n < bs and n:
        assert sorted(batches[0]) == list(range(n))  # a single partial batch holding everything
    else:
        assert all(len(b) == bs for b in batches)


def test_epochs_by_shots():
    assert [default_epochs(k, "caltech101") for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert [default_epochs(k, "imagenet") for k in (1, 2, 4, 8, 16)] == [50] * 5
    assert default_epochs(-1, "dtd") == 200


def test_accuracy_report_micro_macro_per_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    rep = accuracy_report(preds, labels, ["a", "b", "c", "d"])
    assert rep["accuracy"] == pytest.approx(100 * 5 / 7)
    assert rep["per_class"] == pytest.approx({"a": 75.0, "b": 100.0, "c": 50.0})  # "d" has no test images
    assert rep["macro_accuracy"] == pytest.approx((75 + 100 + 50) / 3)
    assert rep["n"] == 7
