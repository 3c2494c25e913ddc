"""Scoring a given answer (``--target``) and a foil (``--contrast``): the same engines, the same identities."""

from __future__ import annotations

import json

import pytest
import torch

from mask_impact import Analyzer, InvalidArgument
from mask_impact.cli import main
from mask_impact.config import DEMO_IMAGE, DEMO_PROMPT_VL
from mask_impact.engine import Analysis
from mask_impact.engines.decoder import NaiveEngine
from mask_impact.metrics import starts_with

SETTINGS = dict(layers="0-2", flows=["image->last", "question->last", "image->question"], progress=False)


@pytest.fixture(scope="module")
def analyzer():
    return Analyzer.demo(vision=True)


def run(analyzer, **options):
    return analyzer.run(DEMO_PROMPT_VL, images=[str(DEMO_IMAGE)], **{**SETTINGS, **options}).data


def test_a_target_equal_to_the_greedy_answer_reproduces_the_untargeted_numbers(analyzer):
    plain = run(analyzer, num_tokens=1)
    assert plain["baseline"]["text"] == "red" and "target" not in plain
    targeted = run(analyzer, num_tokens=1, target="red")
    assert targeted["target"]["token_ids"] == plain["baseline"]["token_ids"] and targeted["correct"] is True
    assert targeted["metrics"] == plain["metrics"] and targeted["steps"] == plain["steps"]  # bit for bit
    assert targeted["target"]["logprobs"] == plain["baseline"]["logprobs"]
    assert targeted["baseline"] == plain["baseline"]  # the greedy answer as before, its log-probs included
    assert [g["text"] for g in targeted["generations"]] == [g["text"] for g in plain["generations"]]
    assert all(g["correct"] == starts_with(g["text"], "red") for g in targeted["generations"])


def test_target_scoring_fast_equals_naive_and_an_independent_forward(analyzer):
    fast = run(analyzer, target="blue", contrast="red")
    naive = run(analyzer, target="blue", contrast="red", engine="naive")
    assert fast["correct"] is False and fast["baseline"]["text"] == "red"  # the greedy answer is still recorded
    # the log-probs agree to float32 rounding (2e-5, as in test_identities); a percentage of a probability of e^-19
    # turns that into 1e-3 of a per cent
    for name, tolerance in (("logprob_drop", 2e-4), ("prob_change_pct", 5e-3), ("kl", 2e-4),
                            ("logit_diff_change", 2e-4)):
        for got, want in zip(fast["metrics"][name], naive["metrics"][name]):
            assert got == pytest.approx(want, abs=tolerance, rel=1e-4), name
    assert fast["metrics"]["top1_changed"] == naive["metrics"]["top1_changed"]
    assert fast["target"]["logprobs"] == pytest.approx(naive["target"]["logprobs"], abs=1e-5)
    # independently: the model's own forward (its own attention) on prompt + target, read at the target's steps
    loaded = analyzer.loaded
    analysis = Analysis(loaded, __import__("mask_impact.inputs", fromlist=["build_prompt"]).build_prompt(
        loaded, DEMO_PROMPT_VL, [str(DEMO_IMAGE)], False, None, None, False, 5))
    ids = loaded.tokenizer("blue", add_special_tokens=False)["input_ids"]
    assert fast["target"]["token_ids"] == ids
    tf = analysis.teacher_forced(ids)
    with torch.no_grad():
        logits = loaded.model(input_ids=tf.input_ids, **tf.model_kwargs).logits[0, tf.answer_positions]
    own = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
    assert fast["target"]["logprobs"] == pytest.approx(own.tolist(), abs=1e-4)
    assert NaiveEngine(analysis, tf).base_logprobs.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist() == \
        pytest.approx(own.tolist(), abs=1e-4)


def test_logit_diff_change_is_the_foils_drop_less_the_targets(analyzer):
    """Σ log p(t) − Σ log p(f) changes by −drop(t) + drop(f): the two targets' own runs give it."""
    paired = run(analyzer, target="red", contrast="blue")
    red, blue = run(analyzer, target="red"), run(analyzer, target="blue")
    assert paired["metrics"]["logprob_drop"] == red["metrics"]["logprob_drop"]
    change = paired["metrics"]["logit_diff_change"]
    expected = [[b - r for b, r in zip(rb, rr)] for rb, rr in zip(blue["metrics"]["logprob_drop"],
                                                                    red["metrics"]["logprob_drop"])]
    for got, want in zip(change, expected):
        assert got == pytest.approx(want, abs=1e-4)
    # the image carries the colour: cutting image->last at every layer moves the model from red towards blue
    assert min(change[w][0] for w in range(3)) < -0.5
    assert paired["contrast"]["text"] == "blue" and len(paired["contrast"]["logprobs"]) == 1


def test_a_target_of_several_tokens_scores_each(analyzer, tmp_path):
    data = run(analyzer, target="red shape", num_tokens=2)
    ids = analyzer.loaded.tokenizer("red shape", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2 and data["target"]["token_ids"] == ids
    assert all(len(cell) == len(ids) for row in data["steps"]["logprob_drop"] for cell in row)
    for w, row in enumerate(data["metrics"]["logprob_drop"]):
        for i, value in enumerate(row):
            assert sum(data["steps"]["logprob_drop"][w][i]) == pytest.approx(value, abs=1e-4)


def test_the_command_line_records_the_target_and_refuses_bad_ones(tmp_path, capsys):
    assert main(["--demo", "--target", " RED ", "--layers", "2", "--output-dir", str(tmp_path), "--output", "t",
                 "--no-progress"], True) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["correct"] is True and data["meta"]["settings"]["target"] == " RED "
    assert data["meta"]["fingerprint"]["settings.target"] == " RED "
    assert "target: ' RED ' (the greedy answer starts with it" in capsys.readouterr().out
    for argv, message in ((["--target", "  "], ": is empty; give the answer's text"),
                          (["--contrast", "blue"], "--contrast is the foil of a --target: give --target too"),
                          (["--target", "red", "--contrast", "red "], "is the --target itself")):
        assert main(["--demo", *argv, "--output-dir", str(tmp_path), "--output", "bad"], True) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(InvalidArgument, match="contrast"):
        Analyzer.demo(vision=True).run(DEMO_PROMPT_VL, images=[str(DEMO_IMAGE)], contrast="blue", progress=False)


def test_correct_is_a_normalised_prefix():
    assert starts_with("  Red shape.", "red") and starts_with("red", " RED ")
    assert starts_with("a  big\nred", "A big red") and not starts_with("blue", "red")
    assert not starts_with("re", "red")


def test_a_yaml_batch_takes_target_and_contrast(tmp_path):
    config = tmp_path / "runs.yaml"
    config.write_text("defaults:\n  demo: true\n  layers: '2'\n  flows: ['image->last']\nruns:\n"
                      "  - {name: gold, target: red, contrast: blue}\n  - {name: plain}\n")
    assert main(["--config", str(config), "--output-dir", str(tmp_path), "--no-progress", "--no-html"], True) == 0
    gold = json.loads((tmp_path / "runs" / "gold.json").read_text())
    plain = json.loads((tmp_path / "runs" / "plain.json").read_text())
    assert gold["target"]["text"] == "red" and gold["contrast"]["text"] == "blue" and "target" not in plain
    assert "logit_diff_change" in gold["metrics"] and "logit_diff_change" not in plain["metrics"]
    index = json.loads((tmp_path / "runs" / "index.json").read_text())
    assert index["runs"][0]["target"] == "red" and index["runs"][0]["correct"] is True


def test_a_runs_set_up_runs_the_vision_tower_once_and_changes_no_number(analyzer, monkeypatch):
    """The baseline's generation, the engine's unmasked pass and the foil's engine see the same picture: its
    features are computed once (engine.reused_image_features), and every number is what recomputing them gives."""
    import contextlib

    from mask_impact import sweep

    calls = []
    hook = analyzer.loaded.model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        reused = run(analyzer, target="red", contrast="blue", mask_mode="both", flows=[], layers="1-2", generate_top=0)
        once = len(calls)
        monkeypatch.setattr(sweep, "reused_image_features", lambda loaded: contextlib.nullcontext())
        calls.clear()
        again = run(analyzer, target="red", contrast="blue", mask_mode="both", flows=[], layers="1-2", generate_top=0)
    finally:
        hook.remove()
    assert once == 1 and len(calls) == 3  # the generation's prefill, the target's engine, the foil's engine
    assert reused["metrics"] == again["metrics"] and reused["steps"] == again["steps"]
    assert reused["baseline"] == again["baseline"] and reused["target"] == again["target"]
