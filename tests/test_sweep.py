"""The sweep loop: batching, out-of-memory recovery, ranking."""

from __future__ import annotations

import pytest
import torch

from mask_impact.config import UsageError
from mask_impact.engine import Analysis
from mask_impact.engines.base import Engine
from mask_impact.engines.decoder import FastEngine
from mask_impact.inputs import build_prompt
from mask_impact.sweep import next_batch, score_knockouts, top_knockouts
from mask_impact.units import positions_for


@pytest.fixture(scope="module")
def engine(vl_model, images):
    prompt = build_prompt(vl_model, "What's in this image?", [images["wide"]])
    analysis = Analysis(vl_model, prompt)
    _, tf = analysis.baseline(3)
    return FastEngine(analysis, tf)


class RunsOutOfMemory(Engine):
    """An engine that fails like CUDA does when a batch has more than ``limit`` rows (one batch per call, as every
    engine but the decoder's fast one takes them)."""

    def __init__(self, engine, limit):
        self.engine, self.limit, self.calls = engine, limit, []
        self.tf, self.analysis, self.base_logprobs = engine.tf, engine.analysis, engine.base_logprobs
        self.first_affected = engine.first_affected

    def logprobs(self, window, positions):
        self.calls.append(len(positions))
        if len(positions) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.engine.logprobs(window, positions)


def test_out_of_memory_halves_the_batch_and_keeps_every_result(engine, monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    positions = positions_for(engine.analysis.prompt, "both")
    windows = [(0, 0), (2, 3)]
    expected, expected_steps, _ = score_knockouts(engine, windows, positions, 64, progress=False)
    failing = RunsOutOfMemory(engine, limit=5)
    got, got_steps, batch_size = score_knockouts(failing, windows, positions, 40, progress=False)
    first_fit = next(i for i, rows in enumerate(failing.calls) if rows <= 5)
    assert batch_size == 5 and first_fit >= 2  # 40 → 20 → 10 → 5 (batches also stop at the waste bound)
    assert max(failing.calls[first_fit:]) <= 5
    for w in range(len(windows)):  # the per-step drops add up to the summed one, whatever the batches
        for i in range(len(positions)):
            assert sum(got_steps["logprob_drop"][w][i]) == pytest.approx(got["logprob_drop"][w][i], abs=1e-5)
            assert got_steps["logprob_drop"][w][i] == pytest.approx(expected_steps["logprob_drop"][w][i], abs=1e-4)
            assert len(got_steps["logprob_drop"][w][i]) == len(engine.tf.answer_ids)
    for name in expected:
        for want_row, got_row in zip(expected[name], got[name]):
            assert got_row == pytest.approx(want_row, abs=1e-4) if name not in ("top1_changed", "first_divergence") \
                else got_row == want_row


def test_out_of_memory_at_batch_one_is_raised(engine, monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(UsageError, match="out of memory with one knockout per forward"):  # one line, no traceback
        score_knockouts(RunsOutOfMemory(engine, limit=0), [(0, 0)], [1, 2], 4, progress=False)


def test_batches_are_consecutive_and_bound_their_wasted_work(engine):
    positions = positions_for(engine.analysis.prompt, "both")
    length = engine.tf.input_ids.shape[1]
    done, batches = 0, []
    while done < len(positions):
        batch = next_batch(engine, positions, done, batch_size=8, waste=0.1, min_rows=2)
        batches.append(batch)
        done += len(batch)
    assert [p for batch in batches for p in batch] == positions
    for batch in batches:
        assert 1 <= len(batch) <= 8
        if len(batch) > 2:
            assert batch[-1] - batch[0] <= max(1.0, 0.1 * (length - batch[0]))


def test_top_knockouts_rank_by_logprob_drop():
    metrics = {"logprob_drop": [[0.1, 3.0, -1.0], [2.0, 0.0, 5.0]]}
    assert top_knockouts(metrics, 3) == [(1, 2), (0, 1), (1, 0)]  # (window, unit) indices


def test_the_flops_said_before_a_sweep_are_the_ones_the_engine_runs(engine):
    """``sweep_flops``'s projections, MLPs and head equal torch's FLOP counter over the fast engine's calls, exactly
    (the counter does not see the CPU's attention kernel; the attention term counts the causal pairs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mask_impact.spec import Knockout
    from mask_impact.sweep import sweep_flops

    analysis, tf = engine.analysis, engine.tf
    length, last = tf.input_ids.shape[1], analysis.answer_start
    for window, units in [((0, 0), [Knockout.token(3)]), ((1, 2), [Knockout.token(4), Knockout.token(4)]),
                          ((0, 0), [Knockout.token(last - 1)]), ((2, 2), [Knockout.token(last)])]:
        with FlopCounterMode(display=False) as counter:
            engine.logprobs(window, units)
        linear, attention, head = sweep_flops(analysis.loaded, [window], units, length, analysis.first_affected,
                                              tf.answer_start, len(tf.answer_ids))
        assert counter.get_total_flops() == linear + head, window
        assert attention > 0


def _bench_sweep(monkeypatch):
    """benchmarks/bench_sweep.py as a module (it is a script: not on the path)."""
    import importlib.util
    import sys

    from tests.support import ROOT

    spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "benchmarks" / "bench_sweep.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_sweep", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_s_flops_only_token_sweep_is_the_configuration_asked(capsys, monkeypatch):
    """``bench_sweep.py --flops-only``: the token sweep's TFLOP is the one a real run of the same options prints as
    its needed matmul work (``--mask-mode text --window 2 --block-from answer`` on 2 layers at 256 px: 0.1895, as
    measured; it printed 2.295, every token with --block-from all), one window per layer (``--window 9`` on 36
    layers: 36 windows, it said 4), and the text and vision tokens' sweeps add up to both's."""
    import re

    bench = _bench_sweep(monkeypatch)

    def token_sweep(*options: str) -> tuple[float, str]:
        monkeypatch.setattr("sys.argv", ["bench_sweep.py", "--arch", "qwen3-vl-4b", "--flops-only", *options])
        bench.main()
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("token sweep"))
        return float(re.search(r"needed ([\d.,e+]+) TFLOP", line).group(1).replace(",", "")), line

    small = ["--num-layers", "2", "--image-size", "256"]
    assert token_sweep(*small, "--mask-mode", "text", "--window", "2", "--block-from", "answer")[0] == 0.1895
    assert token_sweep(*small)[0] == 1.573  # the real run's 1.573 (0.9507 layers, 0.6223 head)
    both, text, vision = (token_sweep(*small, "--mask-mode", mode, "--block-from", "answer")[0]
                          for mode in ("both", "text", "vision"))
    assert text + vision == pytest.approx(both, rel=1e-3) and text < vision < both
    assert "x 36 windows of 9 layer(s)" in token_sweep("--window", "9")[1]
    with pytest.raises(UsageError, match="--image-size 0"):  # was taken as no size given: the default, 1024
        bench.check_sizes(bench.argparse.Namespace(arch="qwen3-vl-4b", image_size=0))
