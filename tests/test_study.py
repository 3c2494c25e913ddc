"""Studies (``--dataset``): the aggregates against an independent recomputation, the bootstrap's coverage, every
dataset format alike, resume, ``--only-correct``, bad input, and the demo study's planted truth."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from mask_impact import Analyzer, StudyResult
from mask_impact.aggregate import aggregate, bootstrap_draws, interval
from mask_impact.cli import main
from mask_impact.demo_tasks import write_shape_dataset

FLOWS = ["--flow", "image->last", "--flow", "question->last", "--flow", "image->question"]


@pytest.fixture(scope="module")
def analyzer():
    return Analyzer.demo(vision=True)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Six fresh shape pictures with their gold colours (shapes.jsonl: prompt, image, target)."""
    return write_shape_dataset(tmp_path_factory.mktemp("shapes"), 6, seed=7)


def study(tmp_path, dataset, *argv, name="s") -> dict:
    code = main(["--demo", "--dataset", str(dataset), "--output-dir", str(tmp_path), "--output", name,
                 "--no-progress", "--no-html", *argv], True)
    assert code == 0
    return json.loads((tmp_path / name / "study.json").read_text())


def row_table(folder, names) -> "pandas.DataFrame":  # noqa: F821
    import pandas

    frames = []
    for name in names:
        frame = pandas.read_csv(folder / f"{name}.csv")
        frame["row"] = name
        frames.append(frame)
    return pandas.concat(frames)


def test_flow_aggregates_equal_a_pandas_recomputation_from_the_row_csvs(tmp_path, shapes):
    data = study(tmp_path, shapes, *FLOWS, "--window", "3")
    assert data["rows"] == {"total": 6, "measured": 6, "excluded": 0, "failed": 0, "limit": None, "sample": None,
                            "seed": 0}
    table = row_table(tmp_path / "s", [entry["name"] for entry in data["row_table"]])
    with open(tmp_path / "s" / "study.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == len(data["aggregates"]) == 3 * 3 * 4  # flows × windows × (metrics less first_divergence)
    for entry, line in zip(data["aggregates"], written):
        assert line["unit"] == entry["unit"] and float(line["mean"]) == pytest.approx(entry["mean"], rel=1e-12)
        cells = table[(table.label == entry["unit"]) & (table.layer_start == entry["layer_start"])
                      & (table.layer_end == entry["layer_end"])][entry["metric"]].astype(float)
        assert entry["n"] == len(cells) == 6 and entry["mean"] == pytest.approx(cells.mean(), rel=1e-9, abs=1e-12)
        assert entry["ci_low"] <= entry["mean"] <= entry["ci_high"]
    results = [json.loads((tmp_path / "s" / f"{e['name']}.json").read_text()) for e in data["row_table"]]
    assert aggregate(results, 8, 0.95, 2000, 0) == data["aggregates"]  # the bootstrap again: bit for bit
    assert aggregate(results, 8, 0.95, 2000, 1) != data["aggregates"]  # (and it is random: another seed differs)


def test_image_tokens_are_averaged_on_a_grid_of_the_picture_and_by_modality(tmp_path, shapes):
    data = study(tmp_path, shapes, "--mask-mode", "both", "--layers", "2", "--limit", "3")
    table = row_table(tmp_path / "s", ["row1", "row2", "row3"])
    drops = [e for e in data["aggregates"] if e["metric"] == "logprob_drop"]
    vision = table[table.modality == "vision"].copy()
    vision["cell"] = ["image1 grid r%d c%d" % (min(7, int((y0 + y1) / 2 / 128 * 8)), min(7, int((x0 + x1) / 2 / 128 * 8)))
                      for x0, y0, x1, y1 in zip(vision.x0, vision.y0, vision.x1, vision.y1)]
    expected = vision.groupby(["cell", "row"]).logprob_drop.mean().groupby("cell").mean()
    grid = {e["unit"]: e for e in drops if e["kind"] == "grid"}
    assert len(grid) == 16 == len(expected)  # the demo's 4×4 tokens of 32 px: one in every other cell of 8×8
    for cell, mean in expected.items():
        assert grid[cell]["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12) and grid[cell]["n"] == 3
    for modality in ("text", "vision", "special"):
        per_row = table[(table.modality == modality) & (table.kind == "token")].groupby("row").logprob_drop.mean()
        entry = next(e for e in drops if e["unit"] == f"tokens:{modality}")
        assert entry["mean"] == pytest.approx(per_row.mean(), rel=1e-9, abs=1e-12) and entry["n"] == 3


def test_the_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    covered, studies = 0, 400
    for number in range(studies):
        values = rng.normal(2.0, 3.0, size=40)  # a study of 40 rows whose true mean is 2
        _, mean, low, high = interval(values, bootstrap_draws(40, 1000, number), 0.95)
        covered += low <= 2.0 <= high
    # a percentile bootstrap of n=40 covers slightly under 95%; 400 studies: sd of the rate 1.1 points
    assert 0.90 <= covered / studies <= 0.985, covered
    narrow = sum(low <= 2.0 <= high for low, high in (interval(rng.normal(2.0, 3.0, 40), bootstrap_draws(40, 1000, k),
                                                               0.5)[2:] for k in range(200)))
    assert 0.38 <= narrow / 200 <= 0.62  # a 50% interval covers about half: the level is what it says


def test_every_dataset_format_gives_the_same_study(analyzer, tmp_path, shapes):
    """JSON Lines, CSV (image lists as JSON), Parquet (pictures as bytes), a datasets folder (Image feature), a
    list of dicts: the same rows, the same aggregates."""
    import pandas

    records = [json.loads(line) for line in shapes.read_text().splitlines()][:3]
    options = dict(flows=["image->last", "question->last"], layers="1", progress=False)
    reference = analyzer.study(str(shapes), limit=3, **options).data["aggregates"]
    renamed = [{"question": r["prompt"], "picture": json.dumps([str(shapes.parent / r["image"])]), "gold": r["target"]}
               for r in records]
    pandas.DataFrame(renamed).to_csv(tmp_path / "rows.csv", index=False)
    fields = {"prompt": "question", "image": "picture", "target": "gold"}
    assert analyzer.study(str(tmp_path / "rows.csv"), fields=fields, **options).data["aggregates"] == reference
    as_bytes = [{"prompt": r["prompt"], "image": {"bytes": (shapes.parent / r["image"]).read_bytes(), "path": None},
                 "target": r["target"]} for r in records]
    pandas.DataFrame(as_bytes).to_parquet(tmp_path / "rows.parquet")
    assert analyzer.study(str(tmp_path / "rows.parquet"), **options).data["aggregates"] == reference
    import datasets

    pictures = [Image.open(shapes.parent / r["image"]) for r in records]
    saved = datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in records], "image": pictures,
                                        "target": [r["target"] for r in records]},
                                       features=datasets.Features({"prompt": datasets.Value("string"),
                                                                   "image": datasets.Image(),
                                                                   "target": datasets.Value("string")}))
    saved.save_to_disk(str(tmp_path / "saved"))
    assert analyzer.study(str(tmp_path / "saved"), **options).data["aggregates"] == reference
    in_memory = [dict(r, image=str(shapes.parent / r["image"])) for r in records]
    assert analyzer.study(in_memory, **options).data["aggregates"] == reference


def test_the_api_and_the_command_line_agree_and_save_load_round_trips(analyzer, tmp_path, shapes):
    cli = study(tmp_path, shapes, "--flow", "image->last", "--layers", "1-2", "--limit", "4", "--seed", "3",
                "--ci", "0.9")
    api = analyzer.study(str(shapes), flows="image->last", layers="1-2", limit=4, seed=3, ci=0.9, progress=False)
    assert api.data["aggregates"] == cli["aggregates"] and api.data["accuracy"] == cli["accuracy"]
    assert len(api.runs) == 4 and api.runs[0].answer == cli["row_table"][0]["answer"]
    frame = api.to_pandas()
    assert list(frame.columns[:4]) == ["unit", "kind", "window_label", "layer_start"] and len(frame) == 2 * 4
    api.save(tmp_path / "saved")
    again = StudyResult.load(tmp_path / "saved")
    assert again.data["aggregates"] == api.data["aggregates"] and [r.data for r in again.runs] == \
        [json.loads(json.dumps(r.data)) for r in api.runs]
    figures = api.plot(tmp_path / "fig")
    assert list(figures) == ["curves"] and np.asarray(Image.open(figures["curves"]).convert("L")).std() > 20


def test_a_study_resumed_after_a_stop_equals_the_uninterrupted_one(tmp_path, shapes):
    whole = study(tmp_path, shapes, "--flow", "image->last", "--layers", "2", "--limit", "4")
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "s", stopped)
    for name in ("row3.json", "row3.csv", "row4.json", "row4.csv", "study.json", "study.csv"):
        (stopped / name).unlink()
    resumed = study(tmp_path, shapes, "--flow", "image->last", "--layers", "2", "--limit", "4", "--resume",
                    name="stopped")
    assert resumed["aggregates"] == whole["aggregates"] and resumed["rows"] == whole["rows"]
    index = json.loads((stopped / "index.json").read_text())
    assert [run.get("note") for run in index["runs"]] == ["kept from an earlier run"] * 2 + [None, None]


def test_only_correct_measures_the_rows_answered_correctly(tmp_path, shapes):
    records = [json.loads(line) for line in shapes.read_text().splitlines()][:4]
    records[1]["target"] = records[3]["target"] = "nothing"  # answered wrongly: not measured
    dataset = shapes.parent / "wrong.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = study(tmp_path, dataset, "--flow", "image->last", "--layers", "2", "--only-correct")
    assert data["rows"]["measured"] == 2 and data["rows"]["excluded"] == 2
    assert data["accuracy"] == {"rows": 4, "correct": 2, "value": 0.5}
    assert [e["status"] for e in data["row_table"]] == ["done", "done", "excluded", "excluded"]
    assert all(e["n"] == 2 for e in data["aggregates"])


def test_per_row_groups_define_a_flow_in_each_row(tmp_path):
    """Recall prompts (text demo): the queried key's value is a group of each row, ``value->last`` a flow."""
    rows = [{"prompt": "A=3, B=7, C=1. What is B?", "target": "7", "group": "value=text:B=7"},
            {"prompt": "A=5, B=2, C=8. What is C?", "target": "8", "group": ["value=text:C=8"]}]
    dataset = tmp_path / "recall.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--demo", "--dataset", str(dataset), "--flow", "value->last", "--layers", "0-1", "--output-dir",
                 str(tmp_path), "--no-progress", "--no-html"], False) == 0
    data = json.loads((tmp_path / "recall" / "study.json").read_text())
    units = {e["unit"] for e in data["aggregates"]}
    assert units == {"value->last"} and all(e["n"] == 2 for e in data["aggregates"])
    first = json.loads((tmp_path / "recall" / "row1.json").read_text())
    keys = first["units"][0]["keys"]
    assert "".join(first["tokens"][p]["text"] for p in keys).strip() == "B=7"


def test_bad_datasets_say_what_is_wrong_in_one_line(tmp_path, shapes, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--dataset", str(shapes), "--fields", "prompt=question"], "has no column 'question'"),
        (["--dataset", str(shapes), "--fields", "promt=prompt"], "unknown field 'promt'; did you mean 'prompt'?"),
        (["--dataset", str(empty)], "has no rows"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--dataset", str(shapes), "--prompt-text", "hi"], "is given by each row of a --dataset"),
        (["--limit", "3"], "--limit belongs to a study: give --dataset FILE too"),
        (["--dataset", str(shapes), "--ci", "95"], "--ci must be a level between 0 and 1"),
        (["--dataset", str(shapes), "--window", "0"], "no row of"),
    ]
    for argv, message in cases:
        assert main(["--demo", *argv, "--output-dir", str(tmp_path), "--no-progress"], True) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert not any(tmp_path.glob("*/study.json"))


def test_a_bad_row_is_reported_and_the_others_are_measured(tmp_path, shapes, capsys):
    records = [json.loads(line) for line in shapes.read_text().splitlines()][:3]
    records[1]["image"] = "no-such.png"
    records[2]["prompt"] = ""
    dataset = shapes.parent / "bad_rows.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["--demo", "--dataset", str(dataset), "--flow", "image->last", "--layers", "2", "--output-dir",
                 str(tmp_path), "--no-progress", "--no-html"], True) == 1  # not every row was measured
    err = capsys.readouterr().err
    assert "row2: error:" in err and "no-such.png" in err and "row3: error: row 3: its prompt (prompt) is empty" in err
    data = json.loads((tmp_path / "bad_rows" / "study.json").read_text())
    assert data["rows"]["measured"] == 1 and data["rows"]["failed"] == 2 and all(e["n"] == 1 for e in
                                                                                 data["aggregates"])


@pytest.mark.slow
def test_the_demo_study_shows_the_planted_flows(tmp_path):
    """50 fresh pictures, the three flows of Zhang et al. over 3-layer windows of the 3-layer demo."""
    data = study(tmp_path, "demo-shapes", *FLOWS, "--window", "3", "--figures", "png", name="demo")
    assert data["rows"]["measured"] == 50 and data["accuracy"]["value"] >= 0.9
    change = {(e["unit"], e["window_label"]): e for e in data["aggregates"] if e["metric"] == "prob_change_pct"}
    every = change["image->last", "layers 0–2"]  # every layer: the picture never reaches the answer
    assert every["mean"] <= -80 and every["ci_high"] < -50
    assert change["question->last", "layers 0–1"]["ci_high"] < -90  # the demo carries the question at layer 0
    assert abs(change["question->last", "layers 1–2"]["mean"]) < 5  # and not after it
    side = change["image->question", "layers 0–2"]  # the image's route through the question: small
    assert abs(side["mean"]) < 15 and side["ci_low"] > every["ci_high"]
    assert (tmp_path / "demo" / "study.curves.png").stat().st_size > 10_000
    assert not math.isnan(every["ci_low"])


def test_a_study_is_named_after_its_file_and_refuses_what_it_cannot_take(tmp_path, shapes, capsys):
    dataset = tmp_path / "vqa.test.jsonl"
    row = json.loads(shapes.read_text().splitlines()[0])
    dataset.write_text(json.dumps(dict(row, image=str(shapes.parent / row["image"]))) + "\n")
    assert main(["--demo", "--dataset", str(dataset), "--flow", "image->last", "--layers", "2", "--output-dir",
                 str(tmp_path), "--no-progress", "--no-html"], True) == 0
    assert (tmp_path / "vqa.test" / "study.json").exists()  # the file's name less its suffix, not "vqa"
    for argv, message in ((["--dataset", "demo-shapes"], "is the demo's study: give --demo too"),
                          (["--demo", "--dataset", str(dataset), "--figures", "png", "--figure-option", "vmax=2"],
                           "a study's figures (--figures) take none yet")):
        assert main([*argv, "--output-dir", str(tmp_path / "no"), "--no-progress"], True) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "no").exists()
