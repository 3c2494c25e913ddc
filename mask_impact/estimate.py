"""Gradient triage of the whole knockout map (``--estimate K``): attribution patching on the attention edges.

    result = Analyzer.demo().run("What color is the shape?", images=["testimg.png"], estimate=10)
    result.data["estimate"]["logprob_drop"]    # every (window, unit) cell, estimated; metrics: the exact ones

A knockout removes, at each layer of its window, the keys ``K`` from the queries ``Q`` and renormalises: with
``a`` the attention probabilities of one head after the softmax and ``A_q = Σ_{k∈K, k≠q} a_{q,k}`` (a query never
loses itself), it changes ``a_{q,k}`` by ``-a_{q,k}`` for the blocked keys and by ``a_{q,k}·A_q/(1-A_q)`` for the
others. That change of the attention pattern is exact; only its effect on the answer is linearised. With
``g = ∂(Σ_t log p(y_t))/∂a`` from one backward pass of the teacher-forced answer (the exact engine's scoring),
``P = g·a`` and ``G_q = Σ_k P_{q,k}``, the first-order change of the answer's summed log-prob is

    Σ_heads Σ_{q∈Q} [A_q·G_q − Σ_{k∈K, k≠q} P_{q,k}] / (1 − A_q)

per layer, summed over the window's layers; the estimated ``logprob_drop`` is minus that (DESIGN.md §6). This
is attribution patching (Nanda 2023; Kramár et al. 2024, "AtP*") with the change of the pattern computed
exactly rather than through the softmax's gradient, as AtP*'s fix for saturated attention does. One forward and
one backward pass give every cell of every window.

The probabilities come from the project's own registered attention (knockout.py, reference path), so each
layer's mask (causal, sliding window, bidirectional images) is the model's own; they are read in float32, after
the softmax. Each layer's reduction runs in a gradient hook as soon as that layer's gradient exists, so only one
layer's ``g`` is alive at a time; the probabilities themselves are kept by autograd for the backward pass
(``L × heads × S × S`` float32, what the reference attention's backward needs anyway). The weights' gradients
are never computed (the parameters are frozen for the pass).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from .engine import Analysis, TeacherForced, _to
from .knockout import apply_plan, knockout_attention_installed
from .spec import Knockout


@dataclass(frozen=True)
class UnitIndex:
    """The units as flat index tensors: every (unit, key) pair, and each unit's query positions."""

    keys: torch.Tensor  # (N,) key positions, all units one after the other
    owner: torch.Tensor  # (N,) the unit each key belongs to
    queries: torch.Tensor  # (S, U) float: 1 where the unit blocks that query
    count: int  # U

    @classmethod
    def of(cls, knockouts: list[Knockout], length: int, device: torch.device) -> UnitIndex:
        keys = [sorted(set(knockout.keys)) for knockout in knockouts]
        flat = torch.tensor([k for unit in keys for k in unit], dtype=torch.long, device=device)
        owner = torch.tensor([u for u, unit in enumerate(keys) for _ in unit], dtype=torch.long, device=device)
        queries = torch.stack([knockout.query_mask(length) for knockout in knockouts], dim=1)  # (S, U)
        return cls(flat, owner, queries.to(device, torch.float32), len(knockouts))


def layer_change(weights: torch.Tensor, grads: torch.Tensor, units: UnitIndex, strength: float = 1.0) -> torch.Tensor:
    """(U,) first-order change of the answer's summed log-prob when each unit is knocked out at this layer.

    ``weights``, ``grads``: (1, nh, S, S) attention probabilities and their gradients (queries and keys over the
    whole sequence). ``strength`` s < 1 estimates a partial knockout instead: the blocked probabilities scaled by
    1 − s and the row renormalised, whose exact change of the pattern gives s·(A·G − Σ P)/(1 − s·A) (s = 1: the
    knockout; its derivative at s = 0 is what the tests compare with finite differences)."""
    a, g = weights[0].float(), grads[0].float()  # (nh, S, S)
    heads, length = a.shape[0], a.shape[-1]
    p = g * a  # (nh, S, S)
    total = p.sum(-1, keepdim=True)  # (nh, S, 1): G_q
    diagonal = torch.arange(length, device=a.device)[:, None] == units.keys[None, :]  # (S, N): never blocked
    a_keys = a[:, :, units.keys].masked_fill(diagonal, 0.0)  # (nh, S, N)
    p_keys = p[:, :, units.keys].masked_fill(diagonal, 0.0)
    removed = a.new_zeros(heads, length, units.count).index_add_(2, units.owner, a_keys)  # (nh, S, U): A_q
    lost = a.new_zeros(heads, length, units.count).index_add_(2, units.owner, p_keys)  # (nh, S, U)
    # a query left with (almost) no weight: the renormalisation's factor is huge, kept finite
    change = strength * (removed * total - lost) / (1.0 - strength * removed).clamp_min(1e-12)  # (nh, S, U)
    return (change.sum(0) * units.queries).sum(0)  # (U,)


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The parameters need no gradient for the pass (no weight gradients computed); restored after."""
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    try:
        for parameter in trained:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in trained:
            parameter.requires_grad_(True)


def answer_logprob(analysis: Analysis, tf: TeacherForced, on_weights) -> torch.Tensor:
    """Σ_t log p(y_t) of the teacher-forced answer, the whole model run with the reference attention, whose
    probabilities pass through ``on_weights(layer, weights)``."""
    loaded = analysis.loaded
    inputs = _to(dict(input_ids=tf.input_ids, **tf.model_kwargs), loaded.device)
    plan = replace(analysis.plan(reference=True), on_weights=on_weights)
    with knockout_attention_installed(loaded.adapter.attention_configs()), apply_plan(plan):
        logits = loaded.model(**inputs, logits_to_keep=len(tf.answer_ids)).logits  # (1, T, V)
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V)
    return logprobs.gather(-1, tf.answer_ids.to(logprobs.device)[:, None]).sum()


def layer_changes(analysis: Analysis, tf: TeacherForced, knockouts: list, strength: float = 1.0) -> torch.Tensor:
    """(L, U) first-order change of Σ_t log p(y_t) when unit u is knocked out at layer l alone (units: ``Knockout``s
    or bare positions, as the engines take them; ``strength``: see ``layer_change``). A window's estimate is the
    sum over its layers."""
    loaded = analysis.loaded
    length = tf.input_ids.shape[1]
    units = UnitIndex.of([analysis.knockout(k) for k in knockouts], length, loaded.device)
    changes = torch.zeros(loaded.adapter.num_layers, units.count, dtype=torch.float64)
    first: list[torch.Tensor] = []

    def record(layer: int, weights: torch.Tensor) -> torch.Tensor:
        if not weights.requires_grad:  # the first layer: the graph starts at its probabilities
            weights.requires_grad_(True)
            first.append(weights)
        saved = weights.detach()

        def reduce(grads: torch.Tensor) -> None:  # runs as soon as this layer's gradient exists
            changes[layer] += layer_change(saved, grads, units, strength).double().cpu()

        weights.register_hook(reduce)
        return weights

    with frozen(loaded.model), torch.enable_grad():
        total = answer_logprob(analysis, tf, record)
        torch.autograd.grad(total, first)
    return changes


RANKING = "the largest exact logprob_drop first (the knockouts that hurt the answer most)"
CONFIDENCE = 0.95  # of the interval of the cells missed by the triage


@dataclass
class Triage:
    """The estimated map and the cells the exact engine computes: the ``top_k`` with the largest estimated effect
    (|estimated logprob_drop|: a knockout that helps the answer is as much worth a look, and the sign of a large,
    saturated effect is the least reliable part of a first-order estimate), then ``sample`` random other cells
    (seeded)."""

    drops: list[list[float]]  # [window][unit] estimated logprob_drop
    top: list[tuple[int, int]]
    sample: list[tuple[int, int]]
    requested: int
    seed: int
    seconds: float
    flops: float
    notes: list[str] = field(default_factory=list)

    def describe(self, what: str) -> str:
        """One line: what the estimate cost and what the exact engine computes now."""
        return (f"estimate: every one of {len(self.drops) * len(self.drops[0]):,} knockouts ({len(self.drops)} windows"
                f" × {len(self.drops[0])} {what}) from one forward and backward pass, about {self.flops / 1e12:.3g} "
                f"TFLOP, {self.seconds:.2f} s; now exactly: the {len(self.top)} largest and {len(self.sample)} random "
                "others")

    @property
    def cells(self) -> list[tuple[int, int]]:
        return sorted(self.top + self.sample)

    def block(self, metrics: dict[str, list[list]]) -> dict:
        """The result's ``estimate`` block, with the estimate's quality against the exact cells."""
        exact = metrics["logprob_drop"]
        cells = self.cells
        estimated = [self.drops[w][u] for w, u in cells]
        measured = [exact[w][u] for w, u in cells]
        sample = [(self.drops[w][u], exact[w][u]) for w, u in self.sample]
        return {
            "method": "attribution patching on the attention edges (first order in the attention probabilities, "
                      "exact renormalisation)",
            "logprob_drop": self.drops,
            "top_k": len(self.top), "requested_top_k": self.requested, "sample": len(self.sample), "seed": self.seed,
            "exact_cells": {"top": [list(cell) for cell in self.top], "sample": [list(cell) for cell in self.sample]},
            "spearman": spearman(estimated, measured),
            "spearman_sample": spearman([e for e, _ in sample], [m for _, m in sample]),
            "ranking": RANKING,
            "computed_top_k_recall": self.recall(exact),
            "missed_above_top_k": self.missed(exact),
            "seconds": round(self.seconds, 3),
            "tflop": self.flops / 1e12,
            "notes": self.notes,
        }

    def ranked(self, exact: list[list]) -> list[tuple[int, int]]:
        """The computed cells, the largest exact ``logprob_drop`` first (the knockouts that hurt the answer most)."""
        return sorted(self.cells, key=lambda cell: (-exact[cell[0]][cell[1]], cell))

    def recall(self, exact: list[list]) -> float | None:
        """Of the ``top_k`` computed cells with the largest exact drop, the share the estimate put in its top ``top_k``
        (None without a sample to compare with). Only computed cells are ranked, so this is an upper bound of the
        recall over the whole map; ``missed`` says how many cells that were not computed may rank above them."""
        if not self.sample or not self.top:
            return None
        return len(set(self.ranked(exact)[: len(self.top)]) & set(self.top)) / len(self.top)

    def missed(self, exact: list[list], level: float = CONFIDENCE) -> dict | None:
        """How many cells that were not computed have an exact drop above the smallest of the top ``top_k`` computed
        ones (the ``threshold``): estimated from the random sample, which is drawn uniformly from every cell
        outside the top, with an exact confidence interval (None without a sample, or with every cell computed).

        Of the R cells outside the top, X lie above the threshold; the n sampled hold h of them (hypergeometric),
        so ``estimate`` = h·(R − n)/n is the expected count among the R − n never computed, and the interval is
        the exact one of X (``hypergeometric_interval``) less the h already seen. The threshold itself comes from
        the computed cells, the sample among them; the count is taken at that threshold."""
        rest = len(self.drops) * len(self.drops[0]) - len(self.top)
        uncomputed = rest - len(self.sample)
        if not self.sample or not self.top or uncomputed == 0:
            return None
        w, u = self.ranked(exact)[len(self.top) - 1]
        threshold = exact[w][u]
        hits = sum(exact[w][u] > threshold for w, u in self.sample)
        low, high = hypergeometric_interval(rest, len(self.sample), hits, level)
        return {"threshold": threshold, "sample": len(self.sample), "sample_above": hits, "not_computed": uncomputed,
                "estimate": hits * uncomputed / len(self.sample), "ci": [low - hits, high - hits], "level": level}


def hypergeometric_interval(population: int, draws: int, hits: int, level: float = CONFIDENCE) -> tuple[int, int]:
    """The exact (Clopper–Pearson) interval for X, the marked items of a ``population`` of which ``draws`` taken
    without replacement held ``hits``: the X for which neither tail probability of seeing ``hits`` is below
    (1 − ``level``)/2. Its coverage is at least ``level`` whatever X is."""
    tail = (1 - level) / 2
    total = math.comb(population, draws)

    def at_most(marked: int) -> float:  # P(H <= hits | X = marked)
        return sum(math.comb(marked, k) * math.comb(population - marked, draws - k)
                   for k in range(0, hits + 1)) / total

    def at_least(marked: int) -> float:  # P(H >= hits | X = marked)
        return 1.0 if hits == 0 else 1.0 - sum(math.comb(marked, k) * math.comb(population - marked, draws - k)
                                               for k in range(0, hits)) / total

    lowest, highest = hits, population - (draws - hits)  # the X that could have given this draw
    low = _first(lowest, highest, lambda marked: at_least(marked) > tail)  # at_least grows with X
    high = _first(lowest, highest, lambda marked: at_most(marked) <= tail) - 1  # at_most shrinks with X
    return low, high


def _first(low: int, high: int, holds) -> int:
    """The smallest integer in [low, high] where a monotone condition ``holds`` (high + 1 where it never does)."""
    end = high + 1
    while low < end:
        middle = (low + end) // 2
        if holds(middle):
            end = middle
        else:
            low = middle + 1
    return low


def triage_cells(analysis: Analysis, tf: TeacherForced, knockouts: list, windows: list[tuple[int, int]],
                 config) -> Triage:
    """``triage`` with a run's settings (``--estimate``, ``--estimate-sample``, ``--estimate-seed``); what was clamped
    is said on stderr."""
    chosen = triage(analysis, tf, knockouts, windows, config.estimate, config.estimate_sample, config.estimate_seed)
    for note in chosen.notes:
        print(f"note: {note}", file=sys.stderr)
    return chosen


def triage(analysis: Analysis, tf: TeacherForced, knockouts: list, windows: list[tuple[int, int]], top_k: int,
           sample: int | None, seed: int) -> Triage:
    """Estimate every (window, unit) cell and choose the cells the exact engine computes (``sample`` None: as many
    random cells as top cells)."""
    started = time.perf_counter()
    changes = layer_changes(analysis, tf, knockouts)  # (L, U)
    drops = [(-changes[a: b + 1].sum(0)).tolist() for a, b in windows]  # (W, U)
    seconds = time.perf_counter() - started
    every = [(w, u) for w in range(len(windows)) for u in range(len(knockouts))]
    notes = []
    if top_k >= len(every):
        notes.append(f"--estimate {top_k} is at least the {len(every)} cells: every cell is computed exactly")
    ranked = sorted(every, key=lambda cell: (-abs(drops[cell[0]][cell[1]]), cell))
    top = sorted(ranked[:top_k])
    rest = sorted(set(every) - set(top))
    wanted = len(top) if sample is None else sample
    if wanted > len(rest) and sample is not None:
        notes.append(f"--estimate-sample {sample} is more than the {len(rest)} other cells: all of them are sampled")
    chosen = sorted(random.Random(seed).sample(rest, min(wanted, len(rest))))
    length = tf.input_ids.shape[1]
    units = [analysis.knockout(k) for k in knockouts]
    flops = estimate_flops(analysis.loaded.adapter.decoder.config, length, len(tf.answer_ids),
                           sum(len(set(k.keys)) for k in units))
    return Triage(drops, top, chosen, top_k, seed, seconds, flops, notes)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties get their mean rank); None with fewer than 3 pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def estimate_flops(config, length: int, answer: int, keys: int) -> float:
    """Matmul and reduction FLOPs of the estimate over a teacher-forced sequence of ``length`` tokens: the decoder's
    forward with the reference attention (full S×S scores), the backward to the activations only (no weight
    gradients; it stops at layer 0's probabilities), the head on the ``answer`` positions, and the per-layer
    reduction over ``keys`` (unit, key) pairs. The vision tower's forward, as in the baseline, is not counted."""
    h, i, nh, nkv, vocab = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                            config.num_key_value_heads, config.vocab_size)
    hd = getattr(config, "head_dim", None) or h // nh
    layers = config.num_hidden_layers
    qkv = 2 * h * (nh + 2 * nkv) * hd * length
    rest = 2 * (h * nh * hd + 3 * h * i) * length  # the output projection and the MLP
    attention = 4 * nh * hd * length * length  # scores, and probabilities @ values (full S×S)
    head = 2 * h * vocab * answer
    forward = layers * (qkv + rest + attention) + head
    # backward to the activations only: each linear layer's input gradient once, both operands of both attention
    # matmuls; layer 0 stops at its probabilities (only their gradient, through probabilities @ values)
    backward = head + (layers - 1) * (qkv + rest + 2 * attention) + rest + attention / 2
    reduction = layers * nh * (6 * length * length + 6 * length * keys)  # elementwise, gathers, sums
    return forward + backward + reduction


def forward_flops(config, length: int, answer: int) -> float:
    """One plain forward of the decoder over ``length`` tokens (causal attention: half the S×S scores), head on the
    ``answer`` positions: the unit in which the estimate's cost is stated."""
    h, i, nh, nkv, vocab = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                            config.num_key_value_heads, config.vocab_size)
    hd = getattr(config, "head_dim", None) or h // nh
    linear = 2 * (h * (2 * nh + 2 * nkv) * hd + 3 * h * i) * length
    return config.num_hidden_layers * (linear + 2 * nh * hd * length * (length + 1)) + 2 * h * vocab * answer
