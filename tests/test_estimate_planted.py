"""The estimate on the trained demo models: does its largest |estimate| find the planted token?

Fresh examples of the demo tasks (seed 777, as tests/test_planted.py), window = every layer, ranked by the
magnitude of the estimated logprob_drop (what ``--estimate K`` computes exactly first). Measured on 50 examples
each (``python tools/planted_signal.py --estimate``): colour 100% first, shape 98% first; 'where' 62% first and
94% among the first 5; text recall 30% first and 82% among the first 5. The last two miss the ≥ 90% top-1 the
estimate was meant to reach: the demo models are saturated (log p(answer) ≈ −0.001), and their answer survives
until the planted token's attention is almost entirely removed, then collapses (DESIGN.md §6), which no
first-order estimate at the baseline can see. The exact engine on the top cells settles it: ``--triage K`` of
that tool shows what an ``--estimate K`` run finds (the planted token first among its exact cells: 'where' 98% at
K = 5, recall 90% at K = 10; DESIGN.md §6); the last test here checks that measurement's bookkeeping.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mask_impact.demo import SHIPPED
from mask_impact.models import load_model
from mask_impact.planted import vl_planted
from tests.support import HANG_S, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_vl():
    return load_model(str(SHIPPED / "demo-vl"), True, device="cpu", dtype="float32")


@pytest.mark.parametrize("question", ["colour", "shape"])
def test_the_largest_estimate_is_the_shape_token(trained_vl, question):
    report = vl_planted(trained_vl, question, count=20, estimate=True)
    assert report.top1_rate >= 0.9, f"top-1 in {report.top1_rate:.0%}, mean rank {report.mean_rank:.2f}"


def test_the_shape_token_is_among_the_largest_estimates_for_where(trained_vl):
    report = vl_planted(trained_vl, "where", count=50, estimate=True)
    assert report.within(5) >= 0.9, f"among the first 5 in {report.within(5):.0%}"
    assert report.top1_rate >= 0.5  # measured 62%: below the 90% asked, see the module's docstring


def test_what_an_estimate_run_finds(trained_vl):
    """``triage=(K, ...)``: the planted token's rank among the cells ``--estimate K`` computes. With K = 8, the 8
    largest and 8 random others are all 16 cells, so its ranks are the exact sweep's; with K = 1 the estimate's own
    top cell is computed, so wherever that is the planted token, the run computes it."""
    exact = vl_planted(trained_vl, "where", count=6, triage=(1, 8))
    estimated = vl_planted(trained_vl, "where", count=6, estimate=True)
    assert exact.triage_ranks[8] == exact.ranks and exact.triage_computed_rate(8) == 1.0
    assert exact.computed_share(8) == 1.0 and exact.computed_share(1) == 2 / 16
    for first, computed in zip(estimated.ranks, exact.triage_ranks[1]):
        if first == 1:
            assert computed is not None
    assert sum(rank is not None for rank in exact.triage_ranks[1]) >= sum(rank == 1 for rank in estimated.ranks) > 0


@pytest.mark.parametrize("argv,message", [
    (["--triage", "-1"], "--triage must be at least 1"),  # printed "computes -12% of the cells", exit 0
    (["--triage", "3", "--triage", "0"], "--triage must be at least 1"),  # "computes 0%": no --estimate 0 run exists
    (["--count", "0"], "--count must be at least 1"),  # a ZeroDivisionError traceback
    (["--triage", "x"], "argument --triage: invalid int value: 'x'"),  # argparse's usage and error: two lines
    (["--estimate", "--triage", "2"], "give it without --estimate"),
])
def test_bad_options_of_the_planted_tool_are_one_line(argv, message):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "planted_signal.py"), *argv], capture_output=True,
                          text=True, timeout=HANG_S)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
