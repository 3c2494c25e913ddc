"""The gradient triage (``--estimate``, estimate.py): its formula, its gradient, and what it is for.

1. The formula is the gradient applied to the knockout's own change of the attention pattern: Σ g·(a_KO − a),
   with a_KO the probabilities the registered attention really computes under the knockout, equals the
   estimate at that layer (the renormalisation's algebra, the diagonal rule, query sets).
2. The gradient and the window sum: a partial knockout (blocked probabilities scaled by 1 − ε and renormalised,
   through the same registered attention) changes the answer's log-prob, by central finite differences, as the
   estimate's derivative says.
3. In a result: the exact cells of an ``--estimate`` run equal the full sweep's, and the quality figures are
   those of the cells (tests/test_estimate_run.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from mask_impact.engine import Analysis
from mask_impact.estimate import UnitIndex, answer_logprob, layer_change, layer_changes, spearman
from mask_impact.inputs import build_prompt
from mask_impact.spec import Knockout
from tests.support import HANG_S


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory):
    """A Mistral whose sliding window (4) is much shorter than the prompt: blocked keys leave the window."""
    from mask_impact.demo import build_demo
    from mask_impact.models import load_model

    folder = build_demo(tmp_path_factory.mktemp("sliding_mistral"), False, text_model_type="mistral",
                        text_config={"sliding_window": 4})
    return load_model(str(folder), False, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def gemma3_model(tmp_path_factory):
    """Gemma 3 with images: the tokens of one image attend to each other both ways in the model's own masks, and
    sliding layers of 4 keys."""
    from mask_impact.models import load_model
    from tests.tiny import build_tiny

    return load_model(str(build_tiny(tmp_path_factory.mktemp("gemma3"), "gemma3")), True, device="cpu",
                      dtype="float32")


def _analysis(loaded, images, block_from="all", vision_attention="causal"):
    if loaded.is_vl:
        prompt = build_prompt(loaded, "What is in the picture, and where?", [images["square"]])
    else:
        prompt = build_prompt(loaded, "The quick brown fox jumps over the lazy dog. What jumps?", [])
    analysis = Analysis(loaded, prompt, block_from, vision_attention)
    _, tf = analysis.baseline(3)
    return analysis, tf


def _knockouts(analysis) -> list[Knockout]:
    """A token, a set of keys, a set of keys that includes queries of its own, a flow to the last position, a
    flow to the answer; a token and a flow near the end (within a sliding window of the answer)."""
    length = analysis.prompt.length
    last = length - 1
    return [Knockout.token(3), Knockout((2, 5, 6)), Knockout((4, 5, 6), (5, 6, last)),
            Knockout((1, 2, 3), (last,)), Knockout((7, 8), (), analysis.answer_start), Knockout.token(last - 2),
            Knockout((last - 4, last - 3), (last - 1, last))]


def _probabilities_and_gradients(analysis, tf) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's attention probabilities and the gradient of Σ_t log p(y_t) with respect to them."""
    weights = []

    def keep(layer, w):
        w = w.detach().requires_grad_(True) if not weights else w
        weights.append(w)
        return w

    from mask_impact.estimate import frozen

    with frozen(analysis.loaded.model), torch.enable_grad():
        total = answer_logprob(analysis, tf, keep)
        grads = torch.autograd.grad(total, weights)
    return [w.detach() for w in weights], list(grads)


def _under(analysis, tf, window, knockout, on_weights) -> float:
    """Σ_t log p(y_t) under ``knockout`` in ``window`` (None: none), probabilities through ``on_weights``."""
    from dataclasses import replace

    from mask_impact.engine import to_device
    from mask_impact.knockout import apply_plan, knockout_attention_installed

    loaded = analysis.loaded
    plan = analysis.plan(reference=True) if window is None else analysis.plan(window, [knockout], reference=True)
    plan = replace(plan, on_weights=on_weights)
    inputs = to_device(dict(input_ids=tf.input_ids, **tf.model_kwargs), loaded.device)
    with torch.no_grad(), knockout_attention_installed(loaded.adapter.attention_configs()), apply_plan(plan):
        logits = loaded.model(**inputs).logits[0, tf.answer_positions]  # (T, V)
    return float(torch.log_softmax(logits.float(), -1).gather(-1, tf.answer_ids[:, None]).sum())


@pytest.mark.parametrize("model, block_from, vision_attention", [
    ("vl_model", "all", "causal"), ("vl_model", "answer", "causal"), ("vl_model", "all", "bidirectional"),
    ("text_model", "all", "causal"), ("sliding_model", "all", "causal"), ("gemma3_model", "all", "causal")])
def test_the_estimate_is_the_gradient_applied_to_the_knockouts_own_change(request, images, model, block_from,
                                                                           vision_attention):
    loaded = request.getfixturevalue(model)
    analysis, tf = _analysis(loaded, images, block_from, vision_attention)
    weights, grads = _probabilities_and_gradients(analysis, tf)
    knockouts = _knockouts(analysis)
    length = tf.input_ids.shape[1]
    units = UnitIndex.of([analysis.knockout(k) for k in knockouts], length, loaded.device)
    for layer in (0, loaded.adapter.num_layers - 1):
        formula = layer_change(weights[layer], grads[layer], units)  # (U,)
        for u, knockout in enumerate(knockouts):
            seen = {}

            def capture(index, w):
                seen[index] = w
                return w

            _under(analysis, tf, (layer, layer), knockout, capture)
            change = seen[layer] - weights[layer]  # (1, nh, S, S): the layers below are untouched, so exact
            by_hand = float((grads[layer] * change).sum())
            assert formula[u].item() == pytest.approx(by_hand, rel=1e-4, abs=1e-7), (layer, knockout)
        assert formula.abs().max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vl_model", "text_model"])
def test_a_partial_knockout_changes_the_answer_as_the_estimate_says(request, images, model):
    """Central differences of the answer's log-prob under a partial knockout of strength ±ε, in every layer of the
    window, against the estimate's derivative (the per-layer estimates summed over the window)."""
    loaded = request.getfixturevalue(model)
    analysis, tf = _analysis(loaded, images)
    knockouts = _knockouts(analysis)
    layers = loaded.adapter.num_layers
    eps = 2e-2  # truncation O(ε²) below 0.1% here; float32 rounding of the log-prob about 1e-4 after dividing by 2ε
    derivative = (layer_changes(analysis, tf, knockouts, eps) - layer_changes(analysis, tf, knockouts, -eps)) / (2 * eps)
    length = tf.input_ids.shape[1]
    checked = 0
    for window in [(0, 0), (1, 2), (0, layers - 1)]:
        for u, knockout in enumerate(knockouts):
            knockout = analysis.knockout(knockout)
            blocked = (knockout.query_mask(length)[:, None] & knockout.key_mask(length)[None, :]
                       & ~torch.eye(length, dtype=torch.bool))  # (S, S): the diagonal is never blocked

            def weakened(strength):
                def reweight(layer, w):
                    if not window[0] <= layer <= window[1]:
                        return w
                    w = w * (1 - strength * blocked.to(w))  # (1, nh, S, S)
                    return w / w.sum(-1, keepdim=True)
                return reweight

            up, down = (_under(analysis, tf, None, None, weakened(s)) for s in (eps, -eps))
            measured = (up - down) / (2 * eps)
            expected = float(derivative[window[0]: window[1] + 1, u].sum())
            assert measured == pytest.approx(expected, rel=1e-2, abs=1.5e-4), (window, knockout, measured, expected)
            checked += abs(expected) > 1e-3
    assert checked >= 5  # the comparison is not between zeros


def test_spearman_is_the_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties: mean ranks (scipy's)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, None, 3, 4], [1, 5, 3, 4]) == pytest.approx(1.0)  # a missing exact cell is left out


def _hypergeometric(population: int, marked: int, draws: int, hits: int) -> float:
    return math.comb(marked, hits) * math.comb(population - marked, draws - hits) / math.comb(population, draws)


@pytest.mark.parametrize("population,draws", [(40, 20), (80, 10), (57, 1), (30, 30)])
def test_the_missed_cells_interval_is_exact_and_covers_every_count(population, draws):
    """The interval is every X under which neither tail of the seen hits is below 2.5% (checked by brute force), so
    it holds the true count with probability ≥ 95% whatever that count is; the count's estimate is unbiased."""
    from mask_impact.estimate import hypergeometric_interval

    possible = lambda marked: range(max(0, draws - (population - marked)), min(draws, marked) + 1)  # noqa: E731
    for hits in range(draws + 1):
        kept = [marked for marked in range(population + 1) if hits in possible(marked)
                and sum(_hypergeometric(population, marked, draws, h) for h in possible(marked) if h >= hits) > 0.025
                and sum(_hypergeometric(population, marked, draws, h) for h in possible(marked) if h <= hits) > 0.025]
        assert hypergeometric_interval(population, draws, hits) == (kept[0], kept[-1])
        assert kept == list(range(kept[0], kept[-1] + 1))
    for marked in range(population + 1):
        coverage = sum(_hypergeometric(population, marked, draws, h) for h in possible(marked)
                       if hypergeometric_interval(population, draws, h)[0] <= marked
                       <= hypergeometric_interval(population, draws, h)[1])
        assert coverage >= 0.95 - 1e-12, (marked, coverage)
        mean = sum(_hypergeometric(population, marked, draws, h) * h * (population - draws) / draws
                   for h in possible(marked))
        unseen = sum(_hypergeometric(population, marked, draws, h) * (marked - h) for h in possible(marked))
        assert mean == pytest.approx(unseen, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("argv,message", [(["--arch", "tiny", "--image-size", "100"], "--image-size 100"),
                                          (["--arch", "qwen3-vl-4b", "--flops-only", "--image-size", "0"],
                                           "--image-size 0"),
                                          (["--arch", "tiny", "--top", "0"], "--top 0: must be at least 1")])
def test_the_estimate_benchmark_refuses_a_bad_size_or_top_in_one_line(argv, message):
    """A size the model cannot take, or --top 0, is one line and exit status 2, as in bench_sweep.py (it was a
    UsageError traceback; --image-size 0 was taken as no size, the default 1024; --top 0 a ZeroDivisionError
    traceback after the whole exact sweep)."""
    import subprocess
    import sys

    from tests.support import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_estimate.py"), *argv], capture_output=True,
                          text=True, timeout=HANG_S)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith(f"error: {message}") and done.stderr.count("\n") == 1, done.stderr
