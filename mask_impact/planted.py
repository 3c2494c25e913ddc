"""Does the analysis find the planted answer? Checks on freshly drawn examples of the demo tasks.

For each example the model answers greedily, every candidate position is knocked out over a window,
and we record the rank (1 = largest ``logprob_drop``) of the position that really holds the answer:
the image token whose cell contains the shape, or the queried value in the recall prompt.
``python tools/planted_signal.py`` prints these figures for the shipped demo models.

With ``estimate=True`` the drops are the first-order estimate (estimate.py) instead of the exact sweep, and
the rank is by the estimate's magnitude, as ``--estimate`` chooses its cells. With ``triage=K`` the drops are the
exact sweep's and each example also records, for each K given, what an ``--estimate K`` run of the every-layer
window shows: the planted position's rank by exact drop among the cells that run computes exactly (its K largest
|estimate| and K random others, seed 0), or None when it does not compute the planted one.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .demo_tasks import QUESTIONS, draw_recall_example, draw_shape_example
from .engine import Analysis
from .engines.decoder import FastEngine
from .estimate import layer_changes, triage as triage_cells
from .inputs import build_prompt
from .metrics import logprob_drop


@dataclass
class PlantedReport:
    ranks: list[int] = field(default_factory=list)
    correct_answers: int = 0
    # per layer (window 1): mean drop of the planted position, and the largest drop among the others
    planted_by_layer: list[float] = field(default_factory=list)
    others_by_layer: list[float] = field(default_factory=list)
    # triage K -> per example, the planted position's rank among the cells --estimate K computes (None: not computed)
    triage_ranks: dict[int, list[int | None]] = field(default_factory=dict)
    cells: list[int] = field(default_factory=list)  # per example: the cells of the every-layer window (its units)

    @property
    def top1_rate(self) -> float:
        return sum(rank == 1 for rank in self.ranks) / len(self.ranks)

    def within(self, k: int) -> float:
        """How often the planted token ranks among the first ``k``."""
        return sum(rank <= k for rank in self.ranks) / len(self.ranks)

    @property
    def mean_rank(self) -> float:
        return sum(self.ranks) / len(self.ranks)

    def triage_top1_rate(self, k: int) -> float:
        """How often an ``--estimate k`` run's exact cells rank the planted position first."""
        return sum(rank == 1 for rank in self.triage_ranks[k]) / len(self.triage_ranks[k])

    def triage_computed_rate(self, k: int) -> float:
        """How often an ``--estimate k`` run computes the planted position's cell exactly at all."""
        return sum(rank is not None for rank in self.triage_ranks[k]) / len(self.triage_ranks[k])

    def computed_share(self, k: int) -> float:
        """The mean share of the window's cells an ``--estimate k`` run computes exactly (k largest, k random)."""
        return sum(min(2 * k, cells) / cells for cells in self.cells) / len(self.cells)


def _drops(analysis: Analysis, num_tokens: int, windows: list[tuple[int, int]], positions: list[int],
           estimate: bool = False):
    baseline, tf = analysis.baseline(num_tokens)
    if estimate:
        changes = layer_changes(analysis, tf, positions)  # (L, P)
        return baseline, tf, torch.stack([-changes[a: b + 1].sum(0) for a, b in windows]).abs().float()  # (W, P)
    engine = FastEngine(analysis, tf)
    rows = [logprob_drop(engine.base_logprobs, engine.logprobs(w, positions), tf.answer_ids) for w in windows]
    return baseline, tf, torch.stack(rows)  # (W, P)


def _triage_rank(analysis: Analysis, tf, positions: list[int], window: tuple[int, int], exact: torch.Tensor,
                 index: int, top_k: int) -> int | None:
    """The planted position's rank by exact drop among the cells ``--estimate top_k`` computes for ``window``
    (``estimate.triage``'s own choice: the top_k largest |estimate| and top_k random others, seed 0)."""
    computed = [unit for _, unit in triage_cells(analysis, tf, positions, [window], top_k, None, 0).cells]
    if index not in computed:
        return None
    return _rank(exact[computed], computed.index(index))


def _rank(values: torch.Tensor, index: int) -> int:
    return int((values > values[index]).sum()) + 1


def _accumulate(report: PlantedReport, drops: torch.Tensor, index: int) -> None:
    report.ranks.append(_rank(drops[0], index))
    report.cells.append(drops.shape[1])
    per_layer = drops[1:]
    others = torch.cat([per_layer[:, :index], per_layer[:, index + 1:]], dim=1)
    report.planted_by_layer.append(per_layer[:, index].tolist())
    report.others_by_layer.append(others.max(dim=1).values.tolist())


def _finish(report: PlantedReport) -> PlantedReport:
    count = len(report.planted_by_layer)
    report.planted_by_layer = [sum(col) / count for col in zip(*report.planted_by_layer)]
    report.others_by_layer = [sum(col) / count for col in zip(*report.others_by_layer)]
    return report


def vl_planted(loaded, question: str, count: int = 50, seed: int = 777, estimate: bool = False,
               triage: tuple[int, ...] = ()) -> PlantedReport:
    """Rank of the shape's image token among all image tokens, window = every layer."""
    rng = random.Random(seed)
    layers = loaded.adapter.num_layers
    windows = [(0, layers - 1)] + [(layer, layer) for layer in range(layers)]
    report = PlantedReport()
    with tempfile.TemporaryDirectory() as folder:
        for number in range(count):
            example = draw_shape_example(rng)
            path = Path(folder) / f"{number}.png"
            example.image.save(path)
            prompt = build_prompt(loaded, QUESTIONS[question], [str(path)])
            vision = [tok.index for tok in prompt.tokens if tok.modality == "vision"]
            analysis = Analysis(loaded, prompt)
            baseline, tf, drops = _drops(analysis, 3, windows, vision, estimate)
            report.correct_answers += baseline.text.strip() == example.answer(question)
            _accumulate(report, drops, example.token_index)
            for k in triage:
                report.triage_ranks.setdefault(k, []).append(
                    _triage_rank(analysis, tf, vision, windows[0], drops[0], example.token_index, k))
    return _finish(report)


def text_planted(loaded, count: int = 50, seed: int = 777, estimate: bool = False,
                 triage: tuple[int, ...] = ()) -> PlantedReport:
    """Rank of the queried value's token among all prompt tokens, window = every layer."""
    rng = random.Random(seed)
    layers = loaded.adapter.num_layers
    windows = [(0, layers - 1)] + [(layer, layer) for layer in range(layers)]
    report = PlantedReport()
    tokenizer = loaded.tokenizer
    for _ in range(count):
        example = draw_recall_example(rng)
        prompt = build_prompt(loaded, example.prompt, [])
        text = tokenizer.decode(prompt.input_ids[0])
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        target = text.index(example.prompt) + example.value_char_index
        value_position = next(i for i, (start, end) in enumerate(offsets) if start <= target < end)
        positions = list(range(prompt.length))
        analysis = Analysis(loaded, prompt)
        baseline, tf, drops = _drops(analysis, 2, windows, positions, estimate)
        report.correct_answers += baseline.text.strip() == example.answer
        _accumulate(report, drops, value_position)
        for k in triage:
            report.triage_ranks.setdefault(k, []).append(
                _triage_rank(analysis, tf, positions, windows[0], drops[0], value_position, k))
    return _finish(report)
