"""The fast engine's exact savings (``engines.decoder.Savings``) change no result, and each one really applies.

Every saving switched off, alone or all together, gives the same numbers as with all of them on and as the
naive reference (≤ 2e-5 in float32, the fast == naive tolerance of DESIGN.md §2); a knockout that changes
nothing is still the baseline row bit for bit. Tiny random-weight models of every family, float32, offline.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from mask_impact.config import windows_for
from mask_impact.demo import build_demo
from mask_impact.engine import Analysis
from mask_impact.engines.decoder import FastEngine, NaiveEngine, Savings
from mask_impact.inputs import build_prompt
from mask_impact.knockout import _gqa_in_sdpa
from mask_impact.models import load_model
from mask_impact.spec import Knockout

PROMPT = "What's in this image? Describe the picture."
SWITCHED_OFF = [Savings(**{f.name: False}) for f in fields(Savings)] + [
    Savings(**{f.name: False for f in fields(Savings)})]


@pytest.fixture(scope="module")
def two_layer_vl(tmp_path_factory):
    """Two decoder layers: DeepStack (after layers 0 and 1) is added after the last layer too."""
    return load_model(str(build_demo(tmp_path_factory.mktemp("vl2"), True, num_layers=2)), True, "cpu", "float32")


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """Every layer slides over the last 4 keys."""
    folder = build_demo(tmp_path_factory.mktemp("mistral"), False, text_model_type="mistral",
                        text_config={"sliding_window": 4})
    return load_model(str(folder), False, "cpu", "float32")


CASES = {  # name: (model fixture, images, --vision-attention)
    "vl": ("vl_model", ["wide"], "causal"),
    "vl-bidirectional": ("vl_model", ["wide", "square"], "bidirectional"),
    "vl-2-layers": ("two_layer_vl", ["square"], "causal"),
    "qwen3": ("text_model", [], "causal"),
    "llama": ("llama_model", [], "causal"),
    "mistral-sliding": ("mistral", [], "causal"),
}


@pytest.fixture(params=list(CASES))
def case(request, images):
    fixture, names, vision_attention = CASES[request.param]
    loaded = request.getfixturevalue(fixture)
    return loaded, build_prompt(loaded, PROMPT, [images[name] for name in names]), vision_attention


def _units(analysis: Analysis) -> list[int | Knockout]:
    """A spread of token knockouts, a group over the answer start, and one that changes nothing."""
    length, answer = analysis.prompt.length, analysis.answer_start
    tokens = sorted({1, length // 4, length // 2, answer - 2, answer - 1, answer})
    return tokens + [Knockout(keys=(answer - 3, answer - 1)), Knockout(keys=(0,), queries=())]


@pytest.mark.parametrize("block_from", ["all", "answer"])
def test_each_saving_switched_off_gives_the_same_numbers(case, block_from):
    loaded, prompt, vision_attention = case
    analysis = Analysis(loaded, prompt, block_from, vision_attention)
    _, tf = analysis.baseline(3)
    naive, fast = NaiveEngine(analysis, tf), FastEngine(analysis, tf)
    assert fast.answer_rows_only  # the last layer's K/V are made exactly as the layer makes them
    others = [FastEngine(analysis, tf, savings) for savings in SWITCHED_OFF]
    units = _units(analysis)
    num_layers = loaded.adapter.num_layers
    windows = windows_for(list(range(num_layers)), 1, num_layers) + [(0, num_layers - 1)]
    for window in windows:
        expected = naive.logprobs(window, units)  # (B, T, V)
        got = fast.logprobs(window, units)
        assert (got - expected).abs().max() <= 2e-5, window
        assert torch.equal(got[-1], fast.base_logprobs)  # a knockout that blocks nothing is the baseline row
        for savings, other in zip(SWITCHED_OFF, others):
            theirs = other.logprobs(window, units)
            assert (theirs - expected).abs().max() <= 2e-5, (window, savings)
            assert (theirs - got).abs().max() <= 2e-5, (window, savings)
            assert torch.equal(theirs[-1], other.base_logprobs)
    for savings, other in zip(SWITCHED_OFF, others):  # the unmasked pass is the same computation
        assert (other.base_logprobs - fast.base_logprobs).abs().max() <= 1e-6, savings


def test_the_last_layer_runs_only_the_answer_rows(vl_model, images):
    """The layer really gets T rows (so the saving is taken), and the rows before them only as keys/values."""
    analysis = Analysis(vl_model, build_prompt(vl_model, PROMPT, [images["wide"]]))
    _, tf = analysis.baseline(3)
    fast, whole = FastEngine(analysis, tf), FastEngine(analysis, tf, Savings(last_layer=False))
    seen = []
    last = vl_model.adapter.layers[-1]
    handle = last.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    try:
        fast.logprobs((0, 0), [1, 2])
        whole.logprobs((0, 0), [1, 2])
    finally:
        handle.remove()
    assert seen == [(2, len(tf.answer_ids)),  # the saving: the answer rows only
                    (2, tf.input_ids.shape[1] - 1)]  # without it: every position from the first knocked one


@pytest.mark.parametrize("shared_head", [True, False])
def test_several_batches_share_one_head_call(vl_model, images, shared_head):
    """``logprobs_batches``: each batch's rows as ``logprobs`` makes them (baseline rows for knockouts that
    change nothing, a batch of only those included), with the head called once for every computed row."""
    analysis = Analysis(vl_model, build_prompt(vl_model, PROMPT, [images["wide"]]))
    _, tf = analysis.baseline(3)
    fast = FastEngine(analysis, tf, Savings(shared_head=shared_head))
    nothing = Knockout(keys=(0,), queries=())
    answer = analysis.answer_start
    batches = [[1, 2, 3], [nothing], [answer - 1, nothing, answer - 2], [5]]
    calls = []
    handle = vl_model.adapter.lm_head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[:2]))
    try:
        for window in [(0, 0), (1, 2)]:
            calls.clear()
            got = fast.logprobs_batches(window, batches)
            rows = 3 + 2 + 1  # the knockouts that change something
            assert calls == ([(rows, len(tf.answer_ids))] if shared_head else [(3, 3), (2, 3), (1, 3)])
            for units, out in zip(batches, got):
                one = fast.logprobs(window, units)
                assert out.shape == one.shape
                assert (out - one).abs().max() <= 2e-5  # the head at another row count: last bits
                for unit, row in zip(units, out):
                    if unit is nothing:
                        assert torch.equal(row, fast.base_logprobs)
    finally:
        handle.remove()


def test_a_bfloat16_head_is_the_log_softmax_of_its_logits_bit_for_bit(tmp_path):
    """In bfloat16 the head's log-softmax runs a few rows at a time (no float32 copy of every logit): each row is
    the log-softmax of its float32 logits, bit for bit."""
    loaded = load_model(str(build_demo(tmp_path, False)), False, "cpu", "bfloat16")
    analysis = Analysis(loaded, build_prompt(loaded, PROMPT, []))
    _, tf = analysis.baseline(3)
    fast = FastEngine(analysis, tf)
    rows = torch.randn(9, 3, loaded.adapter.decoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rows = rows.to(torch.bfloat16)  # 9 knockouts: not a multiple of the rows taken at a time
    with torch.no_grad():
        got, logits = fast._head(rows), loaded.adapter.logits(rows)
    assert logits.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert torch.equal(got, torch.log_softmax(logits.float(), -1))


def test_grouped_query_sdpa_equals_copied_heads():
    """SDPA's grouped-query path with a boolean (B, 1, Q, K) mask == the heads copied by ``repeat_kv``."""
    torch.manual_seed(0)
    batch, heads, kv_heads, q_len, k_len, dim = 3, 8, 2, 5, 11, 16
    query = torch.randn(batch, heads, q_len, dim)
    key, value = torch.randn(batch, kv_heads, k_len, dim), torch.randn(batch, kv_heads, k_len, dim)
    q_pos = torch.arange(k_len - q_len, k_len)
    allowed = (torch.arange(k_len)[None, :] <= q_pos[:, None])[None, None].repeat(batch, 1, 1, 1)  # (B, 1, Q, K)
    allowed[0, 0, :, 3] = False
    allowed[1, 0, 2:, :4] = False
    grouped = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, enable_gqa=True)
    copied = F.scaled_dot_product_attention(query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=allowed)
    assert (grouped - copied).abs().max() <= 1e-6


def test_grouped_query_sdpa_only_where_it_keeps_the_fast_kernel():
    cpu, other = torch.empty(1), torch.empty(1, device="meta")  # "meta" stands for any accelerator
    assert _gqa_in_sdpa(cpu, None) and _gqa_in_sdpa(cpu, torch.ones(1, dtype=torch.bool))
    assert _gqa_in_sdpa(other, None)
    assert not _gqa_in_sdpa(other, torch.ones(1, dtype=torch.bool, device="meta"))  # a mask: math kernel on CUDA
