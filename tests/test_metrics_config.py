"""Metric values on hand-made distributions; layer specs and windows."""

from __future__ import annotations

import math

import pytest
import torch

from mask_impact.config import UsageError, parse_layers, windows_for
from mask_impact.metrics import METRICS, compute_all


def test_metrics_on_known_distributions():
    base = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.7, 0.1]]).log()  # (T, V)
    knocked = torch.stack([torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.7, 0.1]]).log(), base])  # (B, T, V)
    answer = torch.tensor([0, 1])
    values = compute_all(base, knocked, answer)
    assert set(values) == set(METRICS)
    assert values["logprob_drop"] == pytest.approx([math.log(2), 0.0], abs=1e-6)
    assert values["prob_change_pct"] == pytest.approx([-50.0, 0.0], abs=1e-4)
    assert values["kl"] == pytest.approx([0.125 * math.log(2), 0.0], abs=1e-6)
    assert values["top1_changed"] == [True, False]
    assert values["first_divergence"] == [0, None]


def test_kl_row_by_row_is_the_whole_batch_formula_bit_for_bit():
    """``kl`` runs one knockout at a time (no (B, T, V) temporaries): the same sums as Σ_v p_base (log p_base −
    log p_ko) over the whole batch at once, bit for bit, and exactly 0 for the baseline row itself."""
    generator = torch.Generator().manual_seed(0)
    base = torch.log_softmax(3 * torch.randn(4, 1000, generator=generator), -1)  # (T, V)
    knocked = torch.log_softmax(3 * torch.randn(6, 4, 1000, generator=generator), -1)  # (B, T, V)
    knocked[2] = base
    whole = (base.exp()[None] * (base[None] - knocked)).sum(-1).mean(-1)
    values = METRICS["kl"](base, knocked, torch.zeros(4, dtype=torch.long))
    assert torch.equal(values, whole) and values[2] == 0.0 and bool((values[[0, 1, 3, 4, 5]] > 0.1).all())
    assert METRICS["kl"](base, knocked[:0], None).shape == (0,)


def test_first_divergence_finds_a_later_step():
    base = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4]]).log()
    knocked = torch.tensor([[[0.6, 0.4], [0.6, 0.4], [0.3, 0.7]]]).log()
    values = compute_all(base, knocked, torch.tensor([0, 0, 0]))
    assert values["first_divergence"] == [2] and values["top1_changed"] == [True]
    assert values["logprob_drop"][0] == pytest.approx(math.log(0.6 / 0.3), abs=1e-6)


def test_parse_layers():
    assert parse_layers("0-3,7, 5-5", 8) == [0, 1, 2, 3, 5, 7]
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    for bad in ("99", "3-1", "a-b", "1,,2"):
        with pytest.raises(UsageError):
            parse_layers(bad, 8)


def test_windows_are_centred_as_in_geva_et_al():
    assert windows_for([0, 1, 2, 3], 1, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert windows_for([0, 1, 5, 9], 3, 10) == [(0, 1), (0, 2), (4, 6), (8, 9)]
    assert windows_for([0, 5, 9], 4, 10) == [(0, 1), (3, 6), (7, 9)]
    with pytest.raises(UsageError):
        windows_for([0], 11, 10)
