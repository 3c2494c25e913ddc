"""``--estimate K`` in a run: the estimated map, the exact cells, the quality figures, the files, bad input.

The exact cells of an ``--estimate`` run are the full sweep's values for the same cells (other batches, so
within float rounding with the fast engine; bit for bit with the naive one, which runs each knockout alone). The
cells are the K largest by |estimate| and a seeded random sample of the rest; the quality figures are recomputed
here from the cells; results with null metrics load, save, and write their CSV and viewer page.
"""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest

from mask_impact import Analyzer, InvalidArgument, KnockoutResult
from mask_impact.cli import main
from mask_impact.config import DEMO_IMAGE
from mask_impact.estimate import spearman
from tests.support import cli_error, one_error_worded_twice

OPTIONS = dict(mask_mode="both", window=2, num_tokens=3, generate_top=2, progress=False)


@pytest.fixture(scope="module")
def analyzer(vl_model):
    return Analyzer(vl_model)


@pytest.fixture(scope="module")
def full(analyzer, images):
    return analyzer.run("What is in the picture?", images=[images["square"]], **OPTIONS)


# float32's unit roundoff (2**-23), and how many such roundings of a log-probability's size a cell may differ by
# when its knockout shares a batch with other knockouts: the layers' matmuls group their sums otherwise (another
# batch, another thread count). Measured on the tiny model (|log p| ≈ 12): at most 1.2e-6 nats, 1/18 of the bound.
FLOAT32_EPS = float(np.finfo(np.float32).eps)
ROUNDINGS = 8


def float32_rounding(data: dict, name: str, w: int, u: int) -> float:
    """The most that float32 rounding can move metric ``name`` of cell (w, u) between two batchings, from the
    sizes of the log-probabilities it is made of: each answer step's log p and knocked-out log p_KO (at least 1:
    a log-softmax subtracts logits of order 1, so even log p ≈ 0 carries their rounding), ``ROUNDINGS`` units of
    float32 roundoff each. ``logprob_drop`` sums the steps' differences and ``kl`` averages per-step sums
    weighted by probabilities (so neither exceeds the sum); ``prob_change_pct`` = 100·(p_KO/p − 1) moves by
    100·(p_KO/p) times the first step's error."""
    base = data["baseline"]["logprobs"]
    knocked = [lp - step for lp, step in zip(base, data["steps"]["logprob_drop"][w][u])]
    per_step = [ROUNDINGS * FLOAT32_EPS * (max(1.0, abs(a)) + max(1.0, abs(b))) for a, b in zip(base, knocked)]
    if name == "prob_change_pct":
        ratio = math.exp(knocked[0] - base[0])
        return 100 * ratio * per_step[0] + ROUNDINGS * FLOAT32_EPS * 100 * max(1.0, ratio)
    return sum(per_step)


def _exact_cells(result) -> set[tuple[int, int]]:
    grid = result.data["metrics"]["logprob_drop"]
    return {(w, u) for w, row in enumerate(grid) for u, value in enumerate(row) if value is not None}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_the_exact_cells_are_the_full_sweeps(analyzer, images, full, engine):
    if engine == "naive":
        options = dict(OPTIONS, layers="0,2")
        full = analyzer.run("What is in the picture?", images=[images["square"]], engine="naive", **options)
    else:
        options = OPTIONS
    result = analyzer.run("What is in the picture?", images=[images["square"]], estimate=6, estimate_sample=5,
                          estimate_seed=3, engine=engine, **options)
    block = result.data["estimate"]
    cells = _exact_cells(result)
    assert cells == {tuple(c) for c in block["exact_cells"]["top"] + block["exact_cells"]["sample"]}
    assert len(cells) == 11 and block["top_k"] == 6 and block["sample"] == 5
    for name, grid in result.data["metrics"].items():
        for w, row in enumerate(grid):
            for u, value in enumerate(row):
                expected = full.data["metrics"][name][w][u]
                if (w, u) not in cells:
                    assert value is None
                elif engine == "naive" or not isinstance(value, float):
                    assert value == expected, (name, w, u)
                else:  # other batches: float32 rounding of the numbers that went into the cell, no more
                    tolerance = float32_rounding(full.data, name, w, u)
                    assert abs(value - expected) <= tolerance, (name, w, u, value - expected, tolerance)
    # generation ran under the largest exact cells only
    assert result.data["generations"] and all((result.windows.index(tuple(g["window"])), g["unit"]) in cells
                                              for g in result.data["generations"])


def test_the_cells_and_the_quality_figures(analyzer, images, full):
    result = analyzer.run("What is in the picture?", images=[images["square"]], estimate=8, **OPTIONS)
    block = result.data["estimate"]
    estimate = result.estimate  # (W, U)
    assert estimate.shape == full.metric().shape and np.isfinite(estimate).all()
    # the top cells: the largest |estimate| (ties by position); the sample: seeded, among the others, K of them
    order = sorted(np.ndindex(*estimate.shape), key=lambda c: (-abs(estimate[c]), c))
    assert sorted(map(tuple, block["exact_cells"]["top"])) == sorted(order[:8])
    rest = sorted(set(order[8:]))
    assert [tuple(c) for c in block["exact_cells"]["sample"]] == sorted(random.Random(0).sample(rest, 8))
    exact = full.metric()
    cells = sorted(map(tuple, block["exact_cells"]["top"] + block["exact_cells"]["sample"]))
    assert block["spearman"] == pytest.approx(spearman([estimate[c] for c in cells], [exact[c] for c in cells]),
                                              abs=1e-6)
    sample = [tuple(c) for c in block["exact_cells"]["sample"]]
    assert block["spearman_sample"] == pytest.approx(
        spearman([estimate[c] for c in sample], [exact[c] for c in sample]), abs=1e-6)
    # the recall among the computed cells: ranked by the signed drop, largest first (the run's own exact values)
    own = result.metric()
    largest = sorted(cells, key=lambda c: (-own[c], c))[:8]
    assert block["computed_top_k_recall"] == pytest.approx(len(set(largest) & set(order[:8])) / 8, abs=1e-9)
    assert block["ranking"].startswith("the largest exact logprob_drop first") and "top_k_recall" not in block
    # the cells never computed above the top 8's smallest exact drop: the sample's count scaled to them, and an
    # interval that holds the true count, which the full sweep knows
    threshold = own[largest[-1]]
    missed = block["missed_above_top_k"]
    hits = sum(own[c] > threshold for c in sample)
    never = [c for c in np.ndindex(*exact.shape) if c not in set(cells)]
    truth = sum(exact[c] > threshold for c in never)
    assert missed["threshold"] == threshold and missed["sample_above"] == hits and missed["sample"] == 8
    assert missed["not_computed"] == len(never) == exact.size - 16 and missed["level"] == 0.95
    assert missed["estimate"] == pytest.approx(hits * len(never) / 8, abs=1e-12)
    assert missed["ci"][0] <= truth <= missed["ci"][1], (missed, truth)
    assert block["tflop"] > 0 and block["seconds"] > 0 and block["notes"] == []
    assert result.data["meta"]["settings"]["estimate"] == 8
    assert result.data["meta"]["fingerprint"]["settings.estimate"] == 8


def test_more_cells_than_the_map_are_every_cell(analyzer, images, full, capsys):
    result = analyzer.run("What is in the picture?", images=[images["square"]], estimate=10 ** 6, **OPTIONS)
    block = result.data["estimate"]
    count = full.metric().size
    assert block["top_k"] == count and block["requested_top_k"] == 10 ** 6 and block["sample"] == 0
    assert block["computed_top_k_recall"] is None and block["missed_above_top_k"] is None
    assert "every cell is computed exactly" in block["notes"][0]
    assert "every cell is computed exactly" in capsys.readouterr().err
    assert not np.isnan(result.metric()).any()
    # with every cell exact, Spearman is over the whole map
    assert block["spearman"] == pytest.approx(spearman(result.estimate.ravel().tolist(),
                                                       full.metric().ravel().tolist()), abs=1e-6)


def test_a_result_with_null_cells_saves_loads_and_writes_its_csv(analyzer, images, tmp_path):
    result = analyzer.run("What is in the picture?", images=[images["square"]], estimate=3, estimate_sample=2,
                          **OPTIONS)
    paths = result.save(tmp_path / "estimated")
    loaded = KnockoutResult.load(paths["json"])
    assert np.array_equal(loaded.estimate, result.estimate)
    assert np.isnan(loaded.metric()).sum() == loaded.metric().size - 5
    top = loaded.top(6)  # only the exact cells: the others have no value to rank
    assert len(top) == 5 and top[4]["logprob_drop"] == pytest.approx(np.nanmin(loaded.metric()))
    assert not any(math.isnan(cell["logprob_drop"]) for cell in top)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert list(rows[0])[-1] == "estimated_logprob_drop" and len(rows) == loaded.metric().size
    assert sum(row["logprob_drop"] != "" for row in rows) == 5
    for row in rows:
        w = loaded.windows.index((int(row["layer_start"]), int(row["layer_end"])))
        assert float(row["estimated_logprob_drop"]) == pytest.approx(loaded.estimate[w, int(row["unit"])], rel=1e-12)
    page = paths["html"].read_text(encoding="utf-8")
    assert '"estimate"' in page
    plain = analyzer.run("What is in the picture?", images=[images["square"]], **OPTIONS)
    assert "estimate" not in plain.data and plain.estimate is None
    assert "estimated_logprob_drop" not in plain.to_pandas().columns if _has_pandas() else True


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("flags,says", [
    (["--estimate", "0"], "--estimate 0: must be at least 1"),
    (["--estimate", "-3"], "--estimate -3: must be at least 1"),
    (["--estimate", "5", "--estimate-sample", "-1"], "--estimate-sample -1: must be 0 or more"),
    (["--estimate-sample", "4"], "--estimate-sample belongs to an --estimate run"),
    (["--estimate-seed", "4"], "--estimate-seed belongs to an --estimate run"),
    (["--estimate", "5", "--stage", "pixels"], "--stage pixels has no such estimate"),
    (["--estimate", "5", "--stage", "deepstack"], "--stage deepstack has no such estimate"),
    (["--estimate", "5", "--stage", "vision-encoder"], "--stage vision-encoder has no such estimate"),
])
def test_bad_estimate_settings_are_one_line(capsys, tmp_path, flags, says):
    err = cli_error(capsys, ["--demo", *flags, "--output-dir", str(tmp_path), "--no-progress"])
    assert says in err and not list(tmp_path.iterdir())
    keywords = {"--estimate": "estimate", "--estimate-sample": "estimate_sample", "--estimate-seed": "estimate_seed",
                "--stage": "stage"}
    options = {keywords[flag]: (int(value) if flag != "--stage" else value) for flag, value in zip(flags[::2], flags[1::2])}
    with pytest.raises(InvalidArgument) as caught:
        Analyzer.demo().run("What color is the shape?", images=[str(DEMO_IMAGE)], progress=False, **options)
    cli, api = err.removeprefix("error: ").strip(), str(caught.value)
    one_error_worded_twice(caught.value, cli)
    if says.split(" ", 2)[1].endswith(":"):  # an option's value (errors.OptionError): the same why, its subject
        assert api.split(": ", 1)[1] == cli.split(": ", 1)[1] and api.startswith(keywords[flags[-2]] + "=")


def test_the_command_line_writes_the_estimate(tmp_path, capsys):
    status = main(["--demo", "--mask-mode", "vision", "--estimate", "4", "--estimate-sample", "3",
                   "--output-dir", str(tmp_path), "--output", "run", "--no-progress"], True)
    out = capsys.readouterr().out
    assert status == 0 and "estimate: 4 largest and 3 random cells computed exactly" in out
    data = json.loads((tmp_path / "run.json").read_text())
    block = data["estimate"]
    assert len(block["logprob_drop"]) == len(data["windows"]) and len(block["logprob_drop"][0]) == len(data["units"])
    assert sum(v is not None for row in data["metrics"]["logprob_drop"] for v in row) == 7
    assert all(math.isfinite(v) for row in block["logprob_drop"] for v in row)
    assert data["meta"]["fingerprint"]["settings.estimate"] == 4
