"""The method itself: on the trained demo models, the knockout analysis finds the planted answer.

On 50 freshly drawn held-out examples per task (seed 777; training used 1234 and 1235), knocking out a
token at every layer hurts the answer most when that token holds the answer.

Vision-language: the image token whose cell contains the shape ranks first among the 16 image tokens
(issue: ≥ 90%; measured 100% for all three question types).

Text: the queried value ranks first in 72% of examples; in the rest the *question's* key token ranks
first and the value second, both being necessary (issue #6 asks ≥ 90% first; not met, so the test
holds the weaker property that is true — first or second in ≥ 90% — and the issue stays open).
"""

from __future__ import annotations

import pytest

from mask_impact.demo import SHIPPED
from mask_impact.models import load_model
from mask_impact.planted import text_planted, vl_planted


@pytest.fixture(scope="module")
def trained_vl():
    return load_model(str(SHIPPED / "demo-vl"), True, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def trained_text():
    return load_model(str(SHIPPED / "demo-text"), False, device="cpu", dtype="float32")


@pytest.mark.parametrize("question", ["colour", "shape", "where"])
def test_the_shape_token_ranks_first_among_image_tokens(trained_vl, question):
    report = vl_planted(trained_vl, question, count=50)
    assert report.correct_answers >= 48  # the model does answer these held-out examples
    assert report.top1_rate >= 0.9, f"top-1 in {report.top1_rate:.0%}, mean rank {report.mean_rank:.2f}"
    # and no other image token matters at any single layer as much as the shape's does at its best layer
    assert max(report.planted_by_layer) > 2.0 > max(report.others_by_layer)


def test_the_queried_value_is_among_the_two_most_needed_prompt_tokens(trained_text):
    report = text_planted(trained_text, count=50)
    assert report.correct_answers >= 48
    assert sum(rank <= 2 for rank in report.ranks) >= 45, sorted(report.ranks)
    assert report.top1_rate >= 0.5
