"""Qwen3-VL-MoE (``qwen3_vl_moe``): the same adapter serves it, and the identities hold on a tiny random MoE
checkpoint (4 experts, 2 per token, a sparse block in every layer) built offline."""

from __future__ import annotations

import json

import pytest
import torch

from mask_impact.cli import main
from mask_impact.engine import Analysis
from tests.test_identities import (PROMPT, _assert_engines_agree, _deleted_forward, _plan_logits, _prompt,
                                   assert_no_knockout_is_native)


def test_the_moe_checkpoint_loads_as_the_moe_class_with_its_sparse_blocks(moe_model):
    assert type(moe_model.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert moe_model.model.config.model_type == "qwen3_vl_moe"
    assert all(type(layer.mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock" for layer in moe_model.adapter.layers)


@pytest.mark.slow
def test_no_knockout_is_native_and_fast_equals_naive_on_moe(moe_model, images):
    assert_no_knockout_is_native(moe_model, _prompt(moe_model, images, ("wide", "square")))
    prompt = _prompt(moe_model, images, ("wide",))
    _assert_engines_agree(moe_model, prompt, "both", "all", 2, "causal")
    _assert_engines_agree(moe_model, prompt, "vision", "answer", 4, "causal")


def test_knockout_at_all_layers_equals_deleting_the_token_on_moe(moe_model, images):
    prompt = _prompt(moe_model, images, ("wide",))
    analysis = Analysis(moe_model, prompt)
    _, tf = analysis.baseline(3)
    every_layer = (0, moe_model.adapter.num_layers - 1)
    vision = [t.index for t in prompt.tokens if t.modality == "vision"]
    for p in (3, vision[2], prompt.length - 4):
        plan = analysis.plan(every_layer, [p], reference=True)
        knocked = _plan_logits(moe_model, tf.input_ids, tf.model_kwargs, plan)
        deleted, keep = _deleted_forward(moe_model, tf, p)
        after = keep > p
        assert (knocked[keep[after]] - deleted[after]).abs().max() <= 1e-4, p


def test_the_command_line_runs_a_moe_checkpoint(moe_model, images, tmp_path):
    argv = ["--model", moe_model.name, "--image", images["wide"], "--prompt", PROMPT, "--mask-mode", "both",
            "--num-tokens", "2", "--output-dir", str(tmp_path), "--output", "moe", "--no-progress", "--no-html"]
    assert main(argv, True) == 0
    data = json.loads((tmp_path / "moe.json").read_text())
    assert data["meta"]["model_type"] == "qwen3_vl_moe" and len(data["units"]) == len(data["tokens"])
    assert torch.isfinite(torch.tensor(data["metrics"]["logprob_drop"])).all()
