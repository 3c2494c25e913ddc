"""The exact identities of DESIGN.md §2, on tiny random-weight models in float32."""

from __future__ import annotations

import pytest
import torch

from mask_impact.engine import Analysis
from mask_impact.engines.decoder import FastEngine, NaiveEngine
from mask_impact.inputs import build_prompt
from mask_impact.knockout import AttentionPlan, apply_plan, knockout_attention_installed
from mask_impact.units import positions_for
from tests.support import hidden_states_under

PROMPT = "What's in this image? Describe the picture."


def _prompt(loaded, images, names):
    return build_prompt(loaded, PROMPT, [images[name] for name in names])


def _native_logits(loaded, input_ids, model_kwargs):
    with torch.no_grad():
        return loaded.model(input_ids=input_ids, **model_kwargs).logits[0]  # (S, V)


def _plan_logits(loaded, input_ids, model_kwargs, plan):
    with torch.no_grad(), knockout_attention_installed(loaded.adapter.attention_configs()), apply_plan(plan):
        return loaded.model(input_ids=input_ids, **model_kwargs).logits[0]  # (S, V)


CASES = [("vl", ("square",)), ("vl", ("wide", "square")), ("vl", ()), ("text", ()), ("llama", ())]


@pytest.fixture(params=CASES, ids=lambda case: f"{case[0]}-{len(case[1])}img")
def case(request, vl_model, text_model, llama_model, images):
    family, names = request.param
    loaded = {"vl": vl_model, "text": text_model, "llama": llama_model}[family]
    return loaded, _prompt(loaded, images, names)


def test_custom_attention_without_knockout_is_the_native_forward(case):
    assert_no_knockout_is_native(*case)


def assert_no_knockout_is_native(loaded, prompt) -> None:
    """Identity 1: the registered attention with no knockout, and the fast engine's layer loop, are native."""
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(4)
    native = _native_logits(loaded, tf.input_ids, tf.model_kwargs)
    # the registered function with no plan is SDPA itself: identical bits
    assert torch.equal(_plan_logits(loaded, tf.input_ids, tf.model_kwargs, None), native)
    for reference in (False, True):
        planned = _plan_logits(loaded, tf.input_ids, tf.model_kwargs, AttentionPlan(reference=reference))
        assert (planned - native).abs().max() <= 1e-5
    # the fast engine's own layer loop (embeddings, MRoPE, DeepStack, norm, head) matches too
    fast = FastEngine(analysis, tf)
    native_logprobs = torch.log_softmax(native[tf.answer_positions], -1)
    assert (fast.base_logprobs - native_logprobs).abs().max() <= 2e-5


def test_baseline_is_native_greedy_generation(case):
    loaded, prompt = case
    analysis = Analysis(loaded, prompt)
    ids, _ = analysis.generate(6)
    kwargs = dict(input_ids=prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids), **prompt.model_kwargs)
    with torch.no_grad():  # placeholders are suppressed in both: they are input-only tokens
        native = loaded.model.generate(**kwargs, max_new_tokens=6, do_sample=False,
                                       suppress_tokens=analysis.placeholder_ids() or None)[0, prompt.length:]
    assert ids == native.tolist()[: len(ids)]
    assert len(ids) == 6 or ids[-1] in Analysis(loaded, prompt).eos_ids()


@pytest.mark.slow
@pytest.mark.parametrize("window_size", [1, 3])
@pytest.mark.parametrize("block_from", ["all", "answer"])
@pytest.mark.parametrize("mode", ["text", "vision", "both"])
def test_fast_engine_equals_naive_reference(vl_model, images, mode, block_from, window_size):
    prompt = _prompt(vl_model, images, ("wide",))
    _assert_engines_agree(vl_model, prompt, mode, block_from, window_size, "causal")


@pytest.mark.slow
@pytest.mark.parametrize("block_from", ["all", "answer"])
def test_fast_engine_equals_naive_with_bidirectional_vision(vl_model, images, block_from):
    prompt = _prompt(vl_model, images, ("wide", "square"))
    _assert_engines_agree(vl_model, prompt, "both", block_from, 1, "bidirectional")


@pytest.mark.slow
@pytest.mark.parametrize("block_from", ["all", "answer"])
def test_fast_engine_equals_naive_on_text_models(text_model, llama_model, images, block_from):
    for loaded in (text_model, llama_model):
        _assert_engines_agree(loaded, _prompt(loaded, images, ()), "text", block_from, 3, "causal")


def _assert_engines_agree(loaded, prompt, mode, block_from, window_size, vision_attention):
    from mask_impact.config import windows_for

    analysis = Analysis(loaded, prompt, block_from, vision_attention)
    _, tf = analysis.baseline(3)
    naive, fast = NaiveEngine(analysis, tf), FastEngine(analysis, tf)
    assert (naive.base_logprobs - fast.base_logprobs).abs().max() <= 1e-5
    positions = positions_for(prompt, mode)
    largest_effect = 0.0
    for window in windows_for(list(range(loaded.adapter.num_layers)), window_size, loaded.adapter.num_layers):
        expected = naive.logprobs(window, positions)
        for chunk in (positions[:5], positions[5:]):  # batches that start at different positions
            if chunk:
                got = fast.logprobs(window, chunk)
                want = expected[positions.index(chunk[0]): positions.index(chunk[0]) + len(chunk)]
                assert (got - want).abs().max() <= 2e-5, (window, chunk)
        largest_effect = max(largest_effect, (expected - naive.base_logprobs).abs().max().item())
    assert largest_effect > 0.05  # the knockouts really changed the answer distribution


def _deleted_forward(loaded, tf, deleted: int | set[int]):
    """Native forward with the position(s) ``deleted`` removed, every other token keeping its position ids."""
    deleted = {deleted} if isinstance(deleted, int) else deleted
    keep = torch.tensor([i for i in range(tf.input_ids.shape[1]) if i not in deleted])
    with torch.no_grad():
        inputs = loaded.adapter.layer_inputs(tf.input_ids, tf.model_kwargs)
        position_ids = inputs.rope_position_ids[..., keep]
        embeds = inputs.hidden[:, keep]
        if inputs.visual_mask is None:
            hidden = loaded.model.model(inputs_embeds=embeds, position_ids=position_ids).last_hidden_state
        else:
            visual_rank = torch.cumsum(inputs.visual_mask.long(), 0) - 1  # row of each image position
            keep_rows = visual_rank[keep][inputs.visual_mask[keep]]
            hidden = loaded.adapter.decoder(
                inputs_embeds=embeds, position_ids=position_ids, visual_pos_masks=inputs.visual_mask[keep][None],
                deepstack_visual_embeds=[rows[keep_rows] for rows in inputs.deepstack],
            ).last_hidden_state
        return loaded.model.lm_head(hidden)[0], keep  # (S - |deleted|, V)


@pytest.mark.parametrize("family", ["vl", "text"])
def test_knockout_at_all_layers_equals_deleting_the_token(family, vl_model, text_model, images):
    loaded = vl_model if family == "vl" else text_model
    prompt = _prompt(loaded, images, ("wide",) if family == "vl" else ())
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(3)
    every_layer = (0, loaded.adapter.num_layers - 1)
    vision = [t.index for t in prompt.tokens if t.modality == "vision"]
    for p in sorted({1, 3, prompt.length - 4, *vision[1:3]}):
        knocked = _plan_logits(loaded, tf.input_ids, tf.model_kwargs, analysis.plan(every_layer, [p], reference=True))
        deleted, keep = _deleted_forward(loaded, tf, p)
        after = keep > p
        assert (knocked[keep[after]] - deleted[after]).abs().max() <= 1e-4, p


@pytest.mark.parametrize("window", [(0, 0), (1, 2), (3, 3)])
def test_knockout_leaves_earlier_positions_and_lower_layers_bit_identical(vl_model, images, window):
    prompt = _prompt(vl_model, images, ("wide",))
    analysis = Analysis(vl_model, prompt)
    _, tf = analysis.baseline(3)
    for p in (2, 6, prompt.length - 2):
        base, knocked = hidden_states_under(vl_model, tf, (analysis.plan(reference=True),
                                                           analysis.plan(window, [p], reference=True)))
        for layer in range(len(base)):
            if layer <= window[0]:  # hidden_states[l] enters layer l: untouched below the window
                assert torch.equal(base[layer], knocked[layer])
            assert torch.equal(base[layer][:, :p], knocked[layer][:, :p])
        assert not torch.equal(base[-1][:, p + 1:], knocked[-1][:, p + 1:])
