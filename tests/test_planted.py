"""The method itself: on the trained demo models, the knockout analysis finds the planted answer.

On 50 freshly drawn held-out examples per task (seed 777; training used 1234 and 1235), knocking out a
token at every layer hurts the answer most when that token holds the answer.

Vision-language: the image token whose cell contains the shape ranks first among the 16 image tokens
(≥ 90% asked; measured 100% for all three question types).

Text: the queried value ranks first among all prompt tokens (≥ 90% asked; measured 90%, 45 of 50, every
pass by a margin of at least 0.45 nats; in the other five the model's fallback digit equals the answer,
so the value's knockout changes little).
"""

from __future__ import annotations

import pytest

from mask_impact.demo import SHIPPED
from mask_impact.models import load_model
from mask_impact.planted import text_planted, vl_planted

pytestmark = pytest.mark.slow


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


def test_the_queried_value_ranks_first_among_prompt_tokens(trained_text):
    report = text_planted(trained_text, count=50)
    assert report.correct_answers >= 48
    assert report.top1_rate >= 0.9, f"top-1 in {report.top1_rate:.0%}, mean rank {report.mean_rank:.2f}"
    assert report.planted_by_layer[0] > 2.0 > max(report.others_by_layer)
