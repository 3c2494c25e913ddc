"""The sweep: every (window, unit) knockout, scored, then the top ones generated for real.

One generic loop over the window × unit grid, in the spirit of TransformerLens' patching sweeps:
the engine says what the answer log-probs become under a batch of knockouts, the metric registry
turns those into numbers. A unit is a token, a word, an image region, a whole image, a named group
or a flow (units.py). Batches are runs of consecutive units (so the engine's suffix reuse wastes
little); an out-of-memory error halves the batch and retries the same knockouts, keeping everything
already finished.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .config import RunConfig, UsageError
from .errors import NotCorrect, mention, mention_name
from .engine import Analysis, Baseline, TeacherForced, reused_image_features
from .inputs import Prompt
from .metrics import CONTRAST, PRIMARY, STEPS, compute_all, compute_steps, logit_diff_change, metric_names, starts_with
from .models import LoadedModel
from .shard import NOT_LAUNCHED
from .units import Unit, build_units



@dataclass
class RunResult:
    baseline: Baseline
    windows: list[tuple[int, int]]
    units: list[Unit]
    metrics: dict[str, list[list]]  # name → [window][unit]
    steps: dict[str, list[list]] = field(default_factory=dict)  # name → [window][unit][answer step]
    window_labels: list[str] = field(default_factory=list)
    generations: list[dict] = field(default_factory=list)
    batch_size: int = 0
    elapsed_s: float = 0.0
    num_layers: int = 0
    answer_start: int = 0
    processes: int = 1  # that computed the cells (accelerate launch); the numbers do not depend on it
    estimate: dict | None = None  # --estimate: the estimated map and its quality (estimate.Triage.block)
    target: Baseline | None = None  # --target: the answer scored, its log-probs without knockout
    contrast: Baseline | None = None  # --contrast: the foil, the same
    correct: bool | None = None  # --target: whether the greedy answer starts with it


def bytes_per_row(loaded: LoadedModel, sequence_length: int) -> int:
    """Working memory of one knockout row in one layer's forward (activations, scores and mask)."""
    config = loaded.adapter.decoder.config
    element = torch.finfo(loaded.dtype).bits // 8
    activations = sequence_length * (6 * config.hidden_size + 3 * config.intermediate_size) * element
    scores = 2 * config.num_attention_heads * sequence_length * sequence_length * 4  # scores + mask, worst case
    return activations + scores


def auto_batch_size(loaded: LoadedModel, sequence_length: int) -> int:
    """Rows per forward that fit comfortably: half the free memory of the tightest GPU a layer runs on (one, or
    those of a device map), or 1 GiB on the CPU."""
    per_row = bytes_per_row(loaded, sequence_length)
    placed = getattr(loaded.model, "hf_device_map", None)
    gpus = ({torch.device("cuda", d) for d in placed.values() if isinstance(d, int)} if placed
            else {loaded.device} if loaded.device.type == "cuda" else set())
    if gpus:
        budget = min(torch.cuda.mem_get_info(gpu)[0] for gpu in gpus) // 2
    else:
        budget = 1 << 30
    return int(max(1, min(256, budget // per_row)))


def sweep_flops(loaded: LoadedModel, windows: list[tuple[int, int]], units: list, length: int, first_affected,
                answer_start: int, answer_length: int) -> tuple[float, float, float]:
    """Matmul FLOPs the fast engine needs, (the layers' projections and MLPs, their attention, the head): per
    knockout, layers a..L-2 over the positions it can change (``first_affected(unit)``: where that is, None if
    nowhere); the last layer's keys/values over those positions and its queries, attention and MLP over the answer
    positions only (nothing else of it is read); the head over the answer positions. Attention counts the causal
    (query, key) pairs. The first and last parts equal what torch's FLOP counter sees the engine run (a test)."""
    config = loaded.adapter.decoder.config
    h, i, nh, nkv = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads)
    hd = getattr(config, "head_dim", None) or h // nh
    kv_linear = 2 * 2 * h * nkv * hd
    per_token_linear = 2 * 2 * h * nh * hd + kv_linear + 2 * 3 * h * i  # q,o + k,v + mlp
    num_layers = loaded.adapter.num_layers
    linear, attention, head = 0.0, 0.0, 0.0
    for a, _ in windows:
        for unit in units:
            start = first_affected(unit)
            if start is None:
                continue
            queries = length - start
            keys = queries * (start + length + 1) / 2  # Σ over queries q of (q + 1) keys
            last = max(start, answer_start)  # the last layer's query rows
            last_keys = (length - last) * (last + length + 1) / 2
            linear += (num_layers - 1 - a) * queries * per_token_linear
            linear += (last - start) * kv_linear + (length - last) * per_token_linear
            attention += 4 * nh * hd * ((num_layers - 1 - a) * keys + last_keys)
            head += 2 * answer_length * h * config.vocab_size
    return linear, attention, head


def cell_cost(loaded: LoadedModel, engine, rows: list, knockouts: list, decoder: bool):
    """Relative cost of a (row, unit) cell, to give each process of a launch an equal part: the layers from the
    decoder window's first on (1 in the other stages), times the positions the knockout recomputes."""
    length = engine.tf.input_ids.shape[1]
    firsts = [engine.first_affected(knockout) for knockout in knockouts]

    def cost(w: int, i: int) -> float:
        layers = loaded.adapter.num_layers - rows[w][0] if decoder else 1
        return layers * (1 + length - (length if firsts[i] is None else firsts[i]))

    return cost


def describe_plan(loaded: LoadedModel, engine, windows: list, knockouts: list, batch_size: int, what: str) -> str:
    """One line saying how much work the sweep is, before it starts (``what``: the units, named)."""
    length = engine.tf.input_ids.shape[1]
    flops = sum(sweep_flops(loaded, windows, knockouts, length, engine.first_affected, engine.tf.answer_start,
                            len(engine.tf.answer_ids)))
    rows = min(batch_size, len(knockouts))
    memory = bytes_per_row(loaded, length) * rows
    return (f"sweep: {len(windows)} windows × {len(knockouts)} {what} = {len(windows) * len(knockouts):,} "
            f"knockouts over {length} tokens, about {flops / 1e12:.3g} TFLOP, up to {rows} rows per forward (about "
            f"{memory / 2**30:.2g} GiB of working memory)")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's error, or the CPU allocator's (a RuntimeError, or Python's MemoryError)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                                 or "out of memory" in text.lower())


HEAD_ROWS = 512  # answer rows per head call: the head's weight (vocabulary × hidden) is read once per call


def next_batch(engine, knockouts: list, done: int, batch_size: int, waste: float = 0.1, min_rows: int = 16) -> list:
    """Up to ``batch_size`` consecutive knockouts whose rows waste at most ``waste`` of their queries.

    A batch recomputes every row from the smallest first-affected position of the batch, so a row
    whose own knockout starts later computes some queries for nothing; bounding that keeps the
    suffix reuse worth having. ``min_rows`` keeps batches large enough that per-call overhead does not
    dominate on short sequences.
    """
    length = engine.tf.input_ids.shape[1]

    def first(knockout) -> int:  # one that changes nothing joins any batch (the engine skips it)
        position = engine.first_affected(knockout)
        return length if position is None else position

    start = first(knockouts[done])
    allowed = max(1.0, waste * (length - start))
    end = done + 1
    while end < min(len(knockouts), done + batch_size) and (
            end - done < min_rows or first(knockouts[end]) - start <= allowed):
        end += 1
    return knockouts[done:end]


def next_group(engine, knockouts: list, done: int, batch_size: int, head_rows: int = HEAD_ROWS) -> list[list]:
    """Consecutive batches (``next_batch``) from ``done`` on, until they hold ``head_rows`` answer rows: the
    batches whose answer rows share one call of the head (``FastEngine.logprobs_batches``)."""
    group, taken, steps = [], done, len(engine.tf.answer_ids)
    while taken < len(knockouts) and (not group or (taken - done) * steps < head_rows):
        group.append(next_batch(engine, knockouts, taken, batch_size))
        taken += len(group[-1])
    return group


def score_knockouts(engine, windows: list, knockouts: list, batch_size: int, progress: bool = True, store=None,
                    labels: list[str] | None = None, costs=None,
                    on_progress: Callable[[int, int], None] | None = None,
                    cells: list[tuple[int, int]] | None = None, contrast=None) -> tuple[dict, dict, int]:
    """Metrics for every (window, knockout) cell (or only ``cells``); returns them (name → [window][unit], None
    where not computed), the per-step ones (name → [window][unit][step]) and the batch size that finally fit.
    A knockout is a ``Knockout`` (or a bare position: that token's knockout); they are the units of the
    result, in order. ``progress`` shows a tqdm bar; ``on_progress(done, total)`` is called with the
    (window, knockout) cells finished after every head group (``next_group``; ``done`` grows to ``total``).

    With a ``store`` (see resume.py), the cells it already holds are taken from it and every newly finished
    batch is saved to it before the next one starts. In a launched run (shard.py) this process computes only
    its part of the missing cells (``costs(w, i)`` weighs the parts); the main process follows the others'
    files, and returns when every cell is in; the other processes return theirs only.

    ``cells``: only these (window, knockout) cells are computed (``--estimate``); the others stay None.
    ``contrast``: the same stage's engine on the foil's answer (``--contrast``): each batch runs through it too, for
    the metric ``logit_diff_change``.
    """
    answer = engine.tf.answer_ids
    count = len(knockouts)
    shard = store.shard if store is not None else NOT_LAUNCHED
    names = metric_names() + ([CONTRAST] if contrast is not None else [])
    metrics = {name: [[None] * count for _ in windows] for name in names}
    steps = {name: [[None] * count for _ in windows] for name in STEPS}
    missing = set()

    def fill(finished_cells: dict) -> int:  # how many of them were missing
        before = len(missing)
        for (w, i), values in finished_cells.items():
            if (w, i) in missing:
                missing.discard((w, i))
                for name, value in values.items():
                    grids = steps if name in STEP_NAMES else metrics
                    grids[name.removeprefix("steps.")][w][i] = value
        return before - len(missing)

    every = sorted(cells if cells is not None else ((w, i) for w in range(len(windows)) for i in range(count)))
    missing.update(every)
    total = len(missing)
    fill(store.saved if store is not None else {})
    todo = sorted(missing)
    mine = shard.part(todo, [costs(w, i) if costs else 1.0 for w, i in todo])
    finished = total - len(missing)
    bar = tqdm(total=total, initial=finished, unit="knockout", disable=not progress or not shard.is_main,
               dynamic_ncols=True)

    def advance(cells: int) -> None:
        nonlocal finished
        finished += cells
        bar.update(cells)
        if on_progress is not None and cells:
            on_progress(finished, total)
    grouped, head_rows = engine.shares_head, HEAD_ROWS
    walked: dict[int, list[int]] = {}  # window -> the knockouts this process walks in it, in order
    for row, i in every if shard.count == 1 else mine:
        walked.setdefault(row, []).append(i)
    try:
        for w in sorted({w for w, _ in mine}):
            bar.set_description(labels[w] if labels else f"layers {windows[w][0]}-{windows[w][1]}")
            # One process walks the groups an uninterrupted run makes (all the row's cells) and computes each group
            # that misses a cell whole: the head's float grouping depends on a group's rows, so a run stopped
            # between the records of one group resumes to the same bits. A launch's process takes its part.
            indices = walked[w]
            pending = [knockouts[i] for i in indices]
            done = 0
            while done < len(indices):
                group = next_group(engine, pending, done, batch_size, head_rows) if grouped else [
                    next_batch(engine, pending, done, batch_size)]
                size = sum(map(len, group))
                new = sum((w, i) in missing for i in indices[done: done + size])
                if not new:  # every cell of the group was saved by an earlier run
                    done += size
                    continue
                try:
                    knocked_batches = engine.logprobs_batches(windows[w], group)  # (B, T, V) each
                    foil_batches = ([None] * len(group) if contrast is None
                                    else contrast.logprobs_batches(windows[w], group))
                except (RuntimeError, MemoryError) as error:
                    if not is_out_of_memory(error):
                        raise
                    if batch_size == 1 and len(group) == 1:
                        raise UsageError("out of memory with one knockout per forward; use a shorter prompt, a "
                                         f"smaller image ({mention('max_pixels')}), or a device with more memory"
                                         ) from None
                    batch_size, head_rows = max(1, batch_size // 2), max(1, head_rows // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                for chunk, knocked, foil_knocked in zip(group, knocked_batches, foil_batches):
                    values = compute_all(engine.base_logprobs, knocked, answer)
                    if contrast is not None:
                        values[CONTRAST] = [float(v) for v in logit_diff_change(
                            engine.base_logprobs, knocked, answer, contrast.base_logprobs, foil_knocked,
                            contrast.tf.answer_ids).cpu()]
                    per_step = compute_steps(engine.base_logprobs, knocked, answer)
                    cells = indices[done: done + len(chunk)]
                    for grids, computed in ((metrics, values), (steps, per_step)):
                        for name, column in computed.items():
                            for i, value in zip(cells, column):
                                grids[name][w][i] = value
                    missing.difference_update((w, i) for i in cells)
                    if store is not None:
                        store.record(w, cells, values, batch_size, per_step)
                    done += len(chunk)
                advance(new + (fill(store.follow()) if shard.count > 1 and shard.is_main else 0))
        while shard.count > 1 and shard.is_main and missing:  # the other processes' parts
            advance(fill(store.follow()))
            if missing:
                time.sleep(0.05)
    finally:
        bar.close()
    return metrics, steps, batch_size


STEP_NAMES = {f"steps.{name}" for name in STEPS}  # how a saved cell names its per-step values (resume.py)


def top_knockouts(metrics: dict[str, list[list]], k: int) -> list[tuple[int, int]]:
    """The k (window index, unit index) pairs with the largest primary metric."""
    values = metrics[PRIMARY]
    scored = [(values[w][i], w, i) for w in range(len(values)) for i in range(len(values[w]))
              if values[w][i] is not None]
    scored.sort(key=lambda item: -item[0])
    return [(w, i) for _, w, i in scored[:k]]


def run(loaded: LoadedModel, prompt: Prompt, config: RunConfig, store=None,
        on_progress: Callable[[int, int], None] | None = None) -> RunResult:
    """Baseline → knockout sweep → generation under the top knockouts (``store``: resume state;
    ``on_progress(done, total)``: see ``score_knockouts``)."""
    started = time.perf_counter()
    from .stages import stage_plan

    plan = stage_plan(loaded, config)  # the rows of the result, its engine, generation under a cell
    decoder = plan.takes_knockouts  # the decoder's engines take Knockouts; the other stages take the units
    analysis = Analysis(loaded, prompt, config.block_from, config.vision_attention)
    units = build_units(prompt, loaded.tokenizer, config, analysis.answer_start)
    if config.block_from == "answer" and decoder:  # the units say what really runs
        for unit in units:
            restricted = analysis.knockout(unit.knockout())
            unit.queries, unit.queries_from = list(restricted.queries), restricted.queries_from
    knockouts = [unit.knockout() for unit in units] if decoder else units  # the stages take units as they are
    if decoder:
        check_blocks_something(analysis, units, knockouts, config)
    # the decoder's set-up sees the pictures the baseline's generation saw: their features are computed once
    with reused_image_features(loaded) if decoder else nullcontext():
        # a --target run scores the target: the greedy answer's log-probs come from its generation, not a forward
        baseline, tf = analysis.baseline(config.num_tokens, logprobs=config.target is not None)
        target = foil = contrast = correct = None
        if config.target is not None:  # the metrics are about the target; the greedy answer is recorded beside it
            correct = starts_with(baseline.text, config.target)
            if config.only_correct and not correct:
                raise NotCorrect(baseline.text, config.target)
            target, tf = given_answer(analysis, config.target, "target")
        engine = plan.make_engine(analysis, tf, units)
        scored = target or baseline
        scored.logprobs = answer_logprobs(engine.base_logprobs, tf)
        if config.contrast is not None:
            foil, foil_tf = given_answer(analysis, config.contrast, "contrast")
            contrast = plan.make_engine(analysis, foil_tf, units)
            foil.logprobs = answer_logprobs(contrast.base_logprobs, foil_tf)
    batch_size = config.batch_size or auto_batch_size(loaded, tf.input_ids.shape[1])
    if store is not None:
        store.check_baseline(baseline.token_ids)
        batch_size = store.batch_size(batch_size)
        store.start(baseline.token_ids, batch_size)
    triage = None
    if config.estimate is not None:
        from .estimate import triage_cells

        triage = triage_cells(analysis, tf, knockouts, plan.windows, config)
    if config.progress and (store is None or store.shard.is_main):
        what = "flows" if config.flows else "units" if config.unit != "token" or not decoder else "positions"
        tqdm.write(describe_plan(loaded, engine, plan.windows, knockouts, batch_size, what) if triage is None
                   else triage.describe(what), file=sys.stderr)
    metrics, steps, batch_size = score_knockouts(engine, plan.rows, knockouts, batch_size, config.progress, store,
                                          plan.labels, cell_cost(loaded, engine, plan.rows, knockouts, decoder),
                                          on_progress, None if triage is None else triage.cells, contrast)
    if store is not None and not store.shard.is_main:
        return None  # its part is in its partial file; the main process writes the result
    generations = []
    for w, i in top_knockouts(metrics, config.generate_top):
        ids = plan.generate(analysis, engine, w, units[i], knockouts[i], config.num_tokens)
        text = loaded.tokenizer.decode(ids, skip_special_tokens=True)
        generations.append({"window": list(plan.windows[w]), "unit": i, "label": units[i].label, "text": text,
                            "token_ids": ids, **({"correct": starts_with(text, config.target)} if target else {})})
    return RunResult(baseline, plan.windows, units, metrics, steps, plan.labels, generations, batch_size,
                     time.perf_counter() - started, loaded.adapter.num_layers, analysis.answer_start,
                     store.shard.count if store is not None else 1, None if triage is None else triage.block(metrics),
                     target, foil, correct)


def answer_logprobs(logprobs: torch.Tensor, tf: TeacherForced) -> list[float]:
    """The (T,) log-probs of ``tf``'s answer tokens in (T, V) answer log-probs, as a list."""
    return logprobs.gather(-1, tf.answer_ids[:, None].to(logprobs.device))[:, 0].tolist()


def given_answer(analysis: Analysis, text: str, option: str) -> tuple[Baseline, TeacherForced]:
    """A given answer (``--target``, ``--contrast``) as a ``Baseline`` record (its log-probs filled in later) and
    its teacher-forced sequence."""
    ids = analysis.answer_ids(text, option)
    tokenizer = analysis.loaded.tokenizer
    return Baseline(ids, [tokenizer.decode([i]) for i in ids], text, [], False), analysis.teacher_forced(ids)


def check_blocks_something(analysis: Analysis, units: list[Unit], knockouts: list, config: RunConfig) -> None:
    """A group or flow whose queries can never see its keys would be a column of zeros: refused, with why."""
    if not (config.flows or config.unit == "groups"):
        return
    for unit, knockout in zip(units, knockouts):
        if analysis.first_affected(knockout) is None:
            run = analysis.knockout(knockout)  # as run: --block-from answer keeps only the answer's queries
            from_answer = mention("block_from", "answer")
            if not knockout.keys:
                why = ": it names no key"
            elif run.queries == () and run.queries_from is None:  # no query left to block
                why = (f" with {from_answer}: none of its queries is an answer position (that option keeps only "
                       "those)")
            else:  # every query at or before the first key: before it, or the key itself (never blocked)
                itself = " or is the first key itself (a position is never blocked from itself)" if min(
                    knockout.keys) in (run.queries or ()) else ""
                why = (f" with {from_answer}" if config.block_from == "answer" else "") + (
                    f": every query comes before every key{itself}, and attention only looks back")
            named = mention_name("flow" if unit.kind == "flow" else "group", unit.label)
            raise UsageError(f"{named} blocks nothing{why}")

