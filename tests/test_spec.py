"""Knockouts of groups of keys and of flows between groups: the identities, against references written
without the engine (an explicit S×S mask, deletion of the group)."""

from __future__ import annotations

import pytest
import torch

from mask_impact.engine import Analysis
from mask_impact.engines.decoder import FastEngine, NaiveEngine
from mask_impact.inputs import build_prompt
from mask_impact.knockout import AttentionPlan
from mask_impact.spec import Knockout
from tests.test_identities import _deleted_forward, _plan_logits

PROMPT = "What's in this image? Describe the picture."


def _setup(loaded, image):
    prompt = build_prompt(loaded, PROMPT, [image] if image else [])
    return prompt, Analysis(loaded, prompt)


def _family(family: str, vl_model, text_model, images):
    """The VL model with the wide picture, or the text model: its prompt, analysis, teacher-forced input, groups."""
    loaded = vl_model if family == "vl" else text_model
    prompt, analysis = _setup(loaded, images["wide"] if family == "vl" else None)
    _, tf = analysis.baseline(3)
    return loaded, prompt, analysis, tf, _groups(prompt)


def _groups(prompt) -> dict[str, list[int]]:
    """Position groups of a prompt: its image tokens, the user's words, the last prompt position."""
    vision = [t.index for t in prompt.tokens if t.modality == "vision"]
    text = [t.index for t in prompt.tokens if t.modality == "text"]
    question = [p for p in text if p > (max(vision) if vision else 1) + 1][:-2]  # the user's text, not "\n"...
    return {"image": vision, "question": question, "last": [prompt.length - 1]}


def test_token_knockout_masks_equal_the_single_position_rule():
    """``--unit token`` is the rule the engine had before specs: every query q != p blocked from key p
    (queries >= the answer start with --block-from answer), generated positions included."""
    length, k_len = 12, 15  # 3 generated positions past the prompt
    positions = [0, 3, 11]
    for query_start in (0, 9):
        knockouts = [Knockout.token(p).restricted_to(query_start) for p in positions]
        plan = AttentionPlan.for_knockouts((0, 0), knockouts, length)
        for q_len in (k_len, 1):  # a full pass, and one cached decoding step
            got = plan.allowed(0, q_len, k_len, None, torch.device("cpu"))
            q_pos = torch.arange(k_len - q_len, k_len)[:, None]
            k_pos = torch.arange(k_len)[None, :]
            for row, p in enumerate(positions):
                blocked = (k_pos == p) & (q_pos != p) & (q_pos >= query_start)
                assert torch.equal(got[row, 0], (k_pos <= q_pos) & ~blocked)


def test_first_affected_follows_the_spec():
    assert Knockout.token(5).first_affected() == 5
    assert Knockout((5, 9), (3, 12)).first_affected() == 12
    assert Knockout((5, 9), (3,)).first_affected() is None  # every query precedes every key
    assert Knockout((5,), (), 20).first_affected() == 20 and Knockout((5,), (7,), 20).first_affected() == 7
    assert Knockout((5,)).restricted_to(9) == Knockout((5,), (), 9)
    groups = torch.tensor([-1, 0, 0, 0, -1, -1])
    assert Knockout.token(3).first_affected(groups) == 1  # bidirectional: the image's earlier tokens see it
    assert Knockout((3,), (0, 4)).first_affected(groups) == 4 and Knockout((3,), (0, 2)).first_affected(groups) == 2


@pytest.mark.parametrize("family", ["vl", "text"])
def test_group_knockout_at_all_layers_equals_deleting_the_group(family, vl_model, text_model, images):
    loaded, prompt, analysis, tf, groups = _family(family, vl_model, text_model, images)
    every_layer = (0, loaded.adapter.num_layers - 1)
    cases = [groups["question"][:3], groups["question"][1::2]]  # a word-like run, and a scattered group
    if family == "vl":
        cases += [groups["image"][:2] + groups["image"][8:10], groups["image"]]  # a 2×2 region, the whole image
    for keys in cases:
        plan = analysis.plan(every_layer, [Knockout(tuple(keys))], reference=True)
        knocked = _plan_logits(loaded, tf.input_ids, tf.model_kwargs, plan)
        deleted, keep = _deleted_forward(loaded, tf, set(keys))
        after = keep > min(keys)
        assert (knocked[keep[after]] - deleted[after]).abs().max() <= 1e-4, keys


def _explicit_mask_logits(loaded, tf, window, keys: list[int], queries: list[int]):
    """The model's own SDPA attention, with the window's layers handed an S×S mask built here by hand."""
    length = tf.input_ids.shape[1]
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    blocked = torch.zeros(length, length, dtype=torch.bool)
    blocked[torch.tensor(queries)[:, None], torch.tensor(keys)[None, :]] = True
    allowed = (k <= q) & ~(blocked & (q != k))  # (S, S)

    def hand_mask(module, args, kwargs):
        kwargs["attention_mask"] = allowed[None, None]
        return args, kwargs

    hooks = [loaded.adapter.layers[i].self_attn.register_forward_pre_hook(hand_mask, with_kwargs=True)
             for i in range(window[0], window[1] + 1)]
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=tf.input_ids, **tf.model_kwargs).logits[0]  # (S, V)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.log_softmax(logits[tf.answer_positions], -1)  # (T, V)


@pytest.mark.parametrize("family", ["vl", "text"])
def test_a_flow_equals_the_model_run_with_a_hand_built_mask(family, vl_model, text_model, images):
    loaded, prompt, analysis, tf, groups = _family(family, vl_model, text_model, images)
    answer = tf.answer_positions.tolist()
    flows = [("question", groups["last"]), ("question", answer)]
    if family == "vl":
        flows += [("image", groups["last"]), ("image", groups["question"]), ("image", answer)]
    naive, fast = NaiveEngine(analysis, tf), FastEngine(analysis, tf)
    largest = 0.0
    for window in ((0, 1), (1, 2)):
        for source, queries in flows:
            keys = groups[source]
            reference = _explicit_mask_logits(loaded, tf, window, keys, queries)
            tail = analysis.answer_start if queries == answer else None
            spec = Knockout(tuple(keys), () if tail is not None else tuple(queries), tail)
            assert (naive.logprobs(window, [spec])[0] - reference).abs().max() <= 1e-5, (source, window)
            assert (fast.logprobs(window, [spec])[0] - reference).abs().max() <= 2e-5, (source, window)
            largest = max(largest, (reference - naive.base_logprobs).abs().max().item())
    assert largest > 0.05  # the flows really moved the answer


@pytest.mark.parametrize("block_from", ["all", "answer"])
@pytest.mark.parametrize("vision_attention", ["causal", "bidirectional"])
def test_fast_equals_naive_for_groups_and_flows_in_one_batch(vl_model, images, block_from, vision_attention):
    prompt = build_prompt(vl_model, PROMPT, [images["wide"], images["square"]])
    analysis = Analysis(vl_model, prompt, block_from, vision_attention)
    _, tf = analysis.baseline(3)
    groups = _groups(prompt)
    image = groups["image"]
    units = [Knockout(tuple(groups["question"][:2])), Knockout(tuple(image[4:8])), Knockout(tuple(image)),
             Knockout(tuple(image), tuple(groups["last"])), Knockout(tuple(image), tuple(groups["question"])),
             Knockout(tuple(groups["question"]), (), analysis.answer_start), 3,
             Knockout(tuple(groups["last"]), tuple(image))]  # a flow that changes nothing
    naive, fast = NaiveEngine(analysis, tf), FastEngine(analysis, tf)
    for window in ((0, 0), (1, 3)):
        expected = naive.logprobs(window, units)
        assert (fast.logprobs(window, units) - expected).abs().max() <= 2e-5, window
        assert torch.equal(fast.logprobs(window, units[-1:])[0], fast.base_logprobs)
        effect = (expected - naive.base_logprobs).abs().amax(dim=(1, 2))  # (B,)
        acts = torch.tensor([analysis.first_affected(unit) is not None for unit in units])
        assert torch.equal(effect > 0, acts)  # a unit changes the answer exactly when the spec says it can


def test_a_row_that_changes_nothing_is_the_baseline_exactly_inside_a_batch(text_model):
    prompt, analysis = _setup(text_model, None)
    _, tf = analysis.baseline(3)
    fast = FastEngine(analysis, tf)
    nothing = Knockout((10, 11), (2, 3))  # every query before every key
    got = fast.logprobs((0, 1), [Knockout.token(3), nothing])
    assert torch.equal(got[1], fast.base_logprobs) and not torch.equal(got[0], fast.base_logprobs)


def test_a_query_tail_starts_where_the_spec_says_and_positions_are_checked(text_model):
    prompt, analysis = _setup(text_model, None)
    _, tf = analysis.baseline(3)
    length = tf.input_ids.shape[1]  # prompt + 2 answer positions
    naive = NaiveEngine(analysis, tf)
    past_everything = Knockout((3,), (), length)
    assert torch.equal(naive.logprobs((0, 1), [past_everything])[0], naive.base_logprobs)  # no such query
    last_only = Knockout((3,), (), length - 1)  # only the last answer position is blocked
    reference = _explicit_mask_logits(text_model, tf, (0, 1), [3], [length - 1])
    assert (naive.logprobs((0, 1), [last_only])[0] - reference).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=">= 0"):
        Knockout((-1,))
    with pytest.raises(ValueError, match="past the prompt"):
        analysis.knockout(Knockout((prompt.length,)))
