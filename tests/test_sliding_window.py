"""Sliding-window decoders (Mistral, Qwen2/Qwen3 with ``use_sliding_window``): the identities still hold.

Each decoder layer attends through the mask its model builds for it (plain causal, or causal within the
last ``sliding_window`` keys). The prompt is several windows long, so a knockout that ignored the window
would show. Tiny random-weight models, float32, built offline and loaded through ``from_pretrained``.
"""

from __future__ import annotations

import json

import pytest
import torch

from mask_impact.cli import main
from mask_impact.config import UsageError
from mask_impact.demo import build_demo, build_tokenizer, tiny_text_config
from mask_impact.engine import Analysis
from mask_impact.inputs import build_prompt
from mask_impact.knockout import knockout_attention_installed
from mask_impact.models import load_model
from tests.test_identities import _assert_engines_agree, _plan_logits, assert_no_knockout_is_native

PROMPT = "A=3, B=7, C=1. What is B?"
WINDOW = 4
FULL, SLIDE = "full_attention", "sliding_attention"
SLIDING = {  # family: (model_type, config overrides); the Qwens mix sliding and full layers
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "qwen3": ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "layer_types": [FULL, SLIDE, SLIDE, FULL]}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "layer_types": [SLIDE, FULL, SLIDE, SLIDE]}),
}


def _build(tmp_path_factory, family: str):
    model_type, overrides = SLIDING[family]
    return build_demo(tmp_path_factory.mktemp(f"sliding_{family}"), False, text_model_type=model_type,
                      text_config=overrides)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: _build(tmp_path_factory, family) for family in SLIDING}


@pytest.fixture(scope="module")
def models(folders):
    return {family: load_model(str(folder), False, device="cpu", dtype="float32") for family, folder in folders.items()}


@pytest.fixture(params=list(SLIDING))
def case(request, models):
    loaded = models[request.param]
    prompt = build_prompt(loaded, PROMPT, [])
    assert prompt.length > 4 * loaded.model.config.sliding_window  # the window really cuts the prompt
    return loaded, prompt


def test_registered_attention_without_knockout_is_the_native_forward(case):
    assert_no_knockout_is_native(*case)


def test_baseline_is_native_greedy_generation(case):
    loaded, prompt = case
    ids, _ = Analysis(loaded, prompt).generate(8)  # decoding runs well past the window
    with torch.no_grad():
        native = loaded.model.generate(input_ids=prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids),
                                       max_new_tokens=8, do_sample=False)[0, prompt.length:]
    assert ids == native.tolist()[: len(ids)]


def test_generation_under_a_knockout_is_greedy_decoding_by_full_forwards(case):
    """Cached decoding under a knockout == re-running the whole sequence each step (no cache at all)."""
    loaded, prompt = case
    analysis = Analysis(loaded, prompt)
    for window, position in (((0, 3), prompt.length - 3), ((1, 2), prompt.length - 2)):
        plan = analysis.plan(window, [position], reference=True)
        ids, _ = analysis.generate(6, plan)
        sequence = prompt.input_ids
        for expected in ids:
            logits = _plan_logits(loaded, sequence, {}, plan)
            assert int(logits[-1].argmax()) == expected
            sequence = torch.cat([sequence, torch.tensor([[expected]])], dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("window_size", [1, 3])
@pytest.mark.parametrize("block_from", ["all", "answer"])
def test_fast_engine_equals_naive_reference(case, block_from, window_size):
    loaded, prompt = case
    _assert_engines_agree(loaded, prompt, "text", block_from, window_size, "causal")


def _windowed_masks(loaded, length: int) -> list[torch.Tensor]:
    """Each layer's allowed keys, written out independently of transformers: causal, within the window if sliding."""
    config = loaded.model.config
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    if config.model_type == "mistral":
        types = [SLIDE] * config.num_hidden_layers
    else:
        types = config.layer_types
    return [(k <= q) & ((k > q - config.sliding_window) | (kind == FULL)) for kind in types]  # (S, S)


def test_layer_masks_are_the_windows_and_plain_causal_layers_stay_none(case, text_model):
    loaded, prompt = case
    hidden = loaded.adapter.decoder.embed_tokens(prompt.input_ids)  # (1, S, H)
    with knockout_attention_installed(loaded.adapter.attention_configs()):
        masks = loaded.adapter.layer_masks(hidden)
        plain = text_model.adapter.layer_masks(text_model.adapter.decoder.embed_tokens(prompt.input_ids))
    expected = _windowed_masks(loaded, prompt.length)
    for kind, mask, want in zip(loaded.adapter.layer_types, masks, expected):
        if kind == FULL:
            assert mask is None  # sdpa's is_causal path stays the fast one
        else:
            assert mask.dtype == torch.bool and torch.equal(mask[0, 0], want)
    assert plain == [None] * text_model.adapter.num_layers


def test_a_sliding_layer_without_its_mask_is_refused(models):
    loaded = models["mistral"]
    attention = loaded.adapter.layers[0].self_attn
    hidden = torch.zeros(1, 2 * WINDOW, loaded.model.config.hidden_size)  # (1, S, H)
    rotary = loaded.adapter.rotary(hidden, torch.arange(2 * WINDOW)[None])
    with knockout_attention_installed(loaded.adapter.attention_configs()), pytest.raises(RuntimeError, match="window"):
        attention(hidden, position_embeddings=rotary, attention_mask=None)


def test_knockout_at_all_layers_equals_deleting_the_token_inside_its_original_windows(case):
    """KO(all layers, p) == deleting token p while every other token keeps its position id *and its window*.

    Plain deletion (DESIGN.md identity 3) does not hold on sliding layers: there, deleting p slides one
    more old token into the window of each query within ``sliding_window`` after p, which a knockout does not.
    """
    loaded, prompt = case
    analysis = Analysis(loaded, prompt)
    _, tf = analysis.baseline(3)
    length = tf.input_ids.shape[1]
    masks = _windowed_masks(loaded, length)
    every_layer = (0, loaded.adapter.num_layers - 1)
    for p in (1, 3, length // 2, length - 4):
        knocked = _plan_logits(loaded, tf.input_ids, {}, analysis.plan(every_layer, [p], reference=True))
        keep = torch.tensor([i for i in range(length) if i != p])
        kept = [mask[keep][:, keep][None, None] for mask in masks]  # (1, 1, S-1, S-1) each
        if loaded.model.config.model_type == "mistral":  # one mask for every layer
            attention_mask = kept[0]
        else:  # Qwen2/Qwen3 take one mask per layer type
            attention_mask = {kind: kept[loaded.model.config.layer_types.index(kind)]
                              for kind in set(loaded.model.config.layer_types)}
        with torch.no_grad():
            deleted = loaded.model(input_ids=tf.input_ids[:, keep], position_ids=keep[None],
                                   attention_mask=attention_mask).logits[0]  # (S-1, V)
        after = keep > p
        assert (knocked[keep[after]] - deleted[after]).abs().max() <= 1e-4, p


def test_unknown_layer_types_are_refused_at_load(tmp_path):
    config = tiny_text_config(build_tokenizer(), "qwen3", 4,
                              layer_types=["full_attention", "chunked_attention", "full_attention", "full_attention"])
    config.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="chunked_attention"):
        load_model(str(tmp_path), False, device="cpu", dtype="float32")


def test_cli_fast_and_naive_engines_agree(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = {}
    for engine in ("fast", "naive"):
        argv = ["--model", str(folders["mistral"]), "--prompt", PROMPT, "--num-tokens", "3", "--engine", engine,
                "--device", "cpu", "--dtype", "float32", "--output", engine, "--no-progress", "--generate-top", "0"]
        assert main(argv, False) == 0, capsys.readouterr().err
        results[engine] = json.loads((tmp_path / "output" / f"{engine}.json").read_text())
    fast, naive = results["fast"], results["naive"]
    assert fast["baseline"]["token_ids"] == naive["baseline"]["token_ids"]
    for name in ("logprob_drop", "prob_change_pct", "kl"):
        got, want = torch.tensor(fast["metrics"][name]), torch.tensor(naive["metrics"][name])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), name
    assert fast["metrics"]["top1_changed"] == naive["metrics"]["top1_changed"]
    assert max(abs(v) for row in naive["metrics"]["logprob_drop"] for v in row) > 0.05


def test_a_knockout_no_window_lets_through_is_the_baseline_exactly(models):
    """On sliding layers a key further back than the window is invisible to the answer: knocking it out from
    the answer's queries must give the baseline itself (found by a hostile test: -1e-7 KL from recomputing)."""
    from mask_impact.engines.decoder import FastEngine, NaiveEngine
    from mask_impact.spec import Knockout

    loaded = models["mistral"]
    prompt = build_prompt(loaded, PROMPT, [])
    analysis = Analysis(loaded, prompt, block_from="answer")
    _, tf = analysis.baseline(3)
    fast, naive = FastEngine(analysis, tf), NaiveEngine(analysis, tf)
    far, near = Knockout.token(0), Knockout.token(analysis.answer_start - 1)
    for window in ((0, 1), (1, 3)):
        got = fast.logprobs(window, [far, near, far])
        assert torch.equal(got[0], fast.base_logprobs) and torch.equal(got[2], fast.base_logprobs)
        assert (got[1] - naive.logprobs(window, [near])[0]).abs().max() <= 2e-5
        assert not torch.equal(got[1], fast.base_logprobs)  # the near key is inside the window: it acts
