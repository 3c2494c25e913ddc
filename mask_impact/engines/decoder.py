"""The decoder stage (``--stage decoder``, the default): attention knockouts over windows of decoder layers, and its
two engines (docs/DESIGN.md §4).

Scoring is teacher-forced (engine.py): the sequence ``prompt + y_1 .. y_{T-1}`` is run once per knockout and the
next-token distributions are read at the T answer positions ``P-1 .. P+T-2``, which predict ``y_1 .. y_T``.

``NaiveEngine`` is the oracle: one full forward of the whole model per knockout, attention computed the obvious way
(``engine.whole_model_logprobs``). ``FastEngine`` computes the same numbers with three reuses that are exact because
a knockout in window ``[a, b]`` of position ``p`` cannot change anything below layer ``a`` nor any position before
``p`` (causal attention):

1. one unmasked pass caches the hidden state entering every layer and every layer's K/V; each layer gets the mask
   the model itself builds for it (causal, or a sliding window), built once for the whole sequence by the adapter,
   and a suffix pass takes that mask's rows from its first query on;
2. a batch of knockouts (one per row) starts from the cached input of layer ``a`` and runs only layers
   ``a .. L-1``, adding DeepStack features after layers 0..2 as the model does;
3. only positions ``>= min p`` of the batch are recomputed: the keys/values before it are the cached ones; only the
   answer positions go through the final norm and the head.

``Savings`` lists the further exact savings, each on by default and switchable so the benchmark can measure it. The
last layer's output is read only at the answer positions, so it computes queries, attention and MLP for those rows
only; the keys/values of the positions before them are made by the layer's own norm, projections, k-norm and rotary
(checked bit for bit against the layer's own at set-up, else the layer runs whole). The other stages' fast engines
(pixels.py, vit.py, deepstack.py) run the decoder through ``FastEngine`` too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from ..config import parse_layers, windows_for
from ..engine import Analysis, TeacherForced, to_device, whole_model_logprobs
from ..knockout import AttentionPlan, apply_plan, knockout_attention_installed
from ..spec import Knockout
from .base import Engine, StagePlan, window_labels


class NaiveEngine(Engine):
    """The oracle: one full forward of the whole model per knockout, attention computed explicitly."""

    def __init__(self, analysis: Analysis, tf: TeacherForced):
        self.analysis, self.tf = analysis, tf
        self.base_logprobs = self._forward(analysis.plan(reference=True))[0]  # (T, V)

    def _forward(self, plan: AttentionPlan) -> torch.Tensor:
        return whole_model_logprobs(self.analysis, self.tf, plan)

    def first_affected(self, unit: int | Knockout) -> int | None:
        return self.analysis.first_affected(unit)

    def logprobs(self, window: tuple[int, int], units: list[int | Knockout]) -> torch.Tensor:
        """(B, T, V) answer log-probs, one row per knockout (a bare position: that token's knockout)."""
        rows = [self._forward(self.analysis.plan(window, [unit], reference=True)) for unit in units]
        return torch.cat(rows, dim=0)


class _RecordKV:
    """Stands in for the KV cache during the unmasked pass: keeps every layer's K/V."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key, value  # (1, nkv, S, hs)
        return key, value


class _PrefixKV:
    """Stands in for the KV cache during a suffix pass: cached K/V before ``start``, fresh after. A layer that
    runs only its last rows finds the K/V of the rows it skips in ``skipped`` (made by ``_keys_values``)."""

    def __init__(self, record: _RecordKV, start: int, batch: int) -> None:
        self.record, self.start, self.batch = record, start, batch
        self.skipped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        cached_k = self.record.keys[layer_idx][:, :, : self.start].expand(self.batch, -1, -1, -1)
        cached_v = self.record.values[layer_idx][:, :, : self.start].expand(self.batch, -1, -1, -1)
        skipped_k, skipped_v = self.skipped.get(layer_idx, (key[:, :, :0], value[:, :, :0]))
        return (torch.cat([cached_k, skipped_k, key], dim=2),  # (B, nkv, S, hs)
                torch.cat([cached_v, skipped_v, value], dim=2))


def _keys_values(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The K/V a decoder layer's attention makes of ``hidden`` (B, Q, H) entering the layer, without its
    queries: the layer's own input norm, k/v projections, k-norm (if any) and its family's rotary function.
    None for a layer not built that way (``FastEngine`` also checks the result against the layer's own)."""
    attention = getattr(layer, "self_attn", None)
    rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if not all(hasattr(obj, name) for obj, name in ((layer, "input_layernorm"), (attention, "k_proj"),
                                                     (attention, "v_proj"), (attention, "head_dim"))) or rotary is None:
        return None
    normed = layer.input_layernorm(hidden)
    shape = (*hidden.shape[:-1], -1, attention.head_dim)
    key = attention.k_proj(normed).view(shape)
    if getattr(attention, "k_norm", None) is not None:
        key = attention.k_norm(key)
    value = attention.v_proj(normed).view(shape).transpose(1, 2)  # (B, nkv, Q, hs)
    key = key.transpose(1, 2)
    _, key = rotary(key, key, cos.to(key.device), sin.to(key.device))  # (B, nkv, Q, hs); a device map moves layers
    return key, value


@dataclass(frozen=True)
class Savings:
    """Exact savings of the fast engine beyond the reuses (all on; the benchmark switches them off one by one).

    last_layer: the last decoder layer computes queries, attention and MLP for the answer rows only.
    gqa:        SDPA shares each key/value head among its query heads instead of copies (``AttentionPlan.gqa``).
    shared_head: several batches' answer rows go through the head in one matrix product (``logprobs_batches``).
    """

    last_layer: bool = True
    gqa: bool = True
    shared_head: bool = True


class FastEngine(Engine):
    """Same numbers as ``NaiveEngine``, computing only what a knockout can change."""

    shares_head = True  # logprobs_batches: one call of the head for a group of batches

    def __init__(self, analysis: Analysis, tf: TeacherForced, savings: Savings = Savings()):
        self.analysis, self.tf, self.savings = analysis, tf, savings
        adapter, device = analysis.loaded.adapter, analysis.loaded.device
        with torch.no_grad():
            inputs = adapter.layer_inputs(tf.input_ids.to(device), to_device(tf.model_kwargs, device))
            # (cos, sin) of each layer, each (1, S, hs): one rotary embedding for all, or one per layer type
            self.rope = adapter.position_embeddings(inputs.hidden, inputs.rope_position_ids.to(device))
            with knockout_attention_installed(adapter.attention_configs()):  # masks as built for our attention
                # (1, 1, S, S) or None (plain causal) per layer
                self.masks = adapter.layer_masks(inputs.hidden, inputs.visual_mask)
        self.visual_mask = inputs.visual_mask  # (S,) or None
        self.image_embeds = None if inputs.visual_mask is None else inputs.hidden[0, inputs.visual_mask]  # (n_vis, H)
        self.deepstack = [self._scatter(inputs.visual_mask, rows) for rows in inputs.deepstack]  # (S, H) each
        self.deepstack_rows = list(inputs.deepstack)  # per level: (n_vis, H)
        self.layer_inputs: list[torch.Tensor] = []  # (1, S, H) entering each layer
        self.kv = _RecordKV()
        self.base_logprobs = self._run(inputs.hidden, 0, 0, self.kv, self._plan(), record=True)[0]  # (T, V)
        self.answer_rows_only = savings.last_layer and self._keys_values_exact()

    def _plan(self, window: tuple[int, int] | None = None, knockouts: list[Knockout] | None = None) -> AttentionPlan:
        return replace(self.analysis.plan(window, knockouts), gqa=self.savings.gqa)

    @torch.no_grad()
    def _keys_values_exact(self) -> bool:
        """Whether ``_keys_values`` makes the last layer's K/V exactly as the layer itself did in the unmasked pass."""
        last = self.analysis.loaded.adapter.num_layers - 1
        made = _keys_values(self.analysis.loaded.adapter.layers[last], self.layer_inputs[last], *self.rope[last])
        return made is not None and torch.equal(made[0], self.kv.keys[last]) and torch.equal(made[1],
                                                                                            self.kv.values[last])

    @staticmethod
    def _scatter(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """DeepStack rows placed at the image positions, zero elsewhere (adding 0.0 is exact)."""
        full = rows.new_zeros(mask.shape[0], rows.shape[-1])
        full[mask.to(rows.device)] = rows
        return full

    @torch.no_grad()
    def _run(self, hidden: torch.Tensor, first_layer: int, start: int, kv, plan: AttentionPlan,
             record: bool = False, deepstack: list[torch.Tensor] | None = None, head: bool = True) -> torch.Tensor:
        """Layers ``first_layer ..`` over positions ``start ..``; returns (B, T, V) answer log-probs, or with
        ``head=False`` the last layer's (B, T, H) answer rows. ``deepstack``: per level, (B, S, H) features of
        each row in place of the prompt's own."""
        adapter = self.analysis.loaded.adapter
        last, answer_start = adapter.num_layers - 1, self.tf.answer_start
        with knockout_attention_installed(adapter.attention_configs()), apply_plan(plan):
            for index in range(first_layer, adapter.num_layers):
                if record:
                    self.layer_inputs.append(hidden)
                if index == last and not record and self.answer_rows_only and start < answer_start:
                    # only the answer rows of the last layer are read: the rows before them give keys/values only
                    skip = answer_start - start
                    cos, sin = self.rope[index]
                    kv.skipped[index] = _keys_values(adapter.layers[index], hidden[:, :skip],
                                                     cos[:, start:answer_start], sin[:, start:answer_start])
                    hidden, start = hidden[:, skip:], answer_start  # (B, T, H)
                # the queries are positions start.., the keys all positions: the mask rows of the queries
                mask = None if self.masks[index] is None else self.masks[index][:, :, start:]  # (1, 1, S - start, S)
                cos, sin = (part[:, start:] for part in self.rope[index])
                hidden = adapter.layers[index](hidden, attention_mask=mask, position_ids=None,
                                               past_key_values=kv, position_embeddings=(cos, sin))
                if index < len(self.deepstack):
                    added = self.deepstack[index][start:] if deepstack is None else deepstack[index][:, start:]
                    hidden = hidden + added.to(hidden.device, hidden.dtype)
        answer = hidden[:, self.tf.answer_positions - start]  # (B, T, H)
        return self._head(answer) if head else answer

    def _head(self, answer: torch.Tensor) -> torch.Tensor:
        """(B, T, V) log-probs of the last layer's answer rows (B, T, H): final norm, head, soft-capping."""
        logits = self.analysis.loaded.adapter.logits(answer)
        if logits.dtype == torch.float32:
            return torch.log_softmax(logits, dim=-1)
        # a few rows at a time: no float32 copy of all the logits (as large as the result) to write and read back;
        # each row's log-softmax is the same (bit for bit on a CPU; 3-4x faster there in bfloat16)
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for rows, into in zip(logits.split(4), out.split(4)):
            torch.log_softmax(rows.float(), dim=-1, out=into)
        return out

    def first_affected(self, unit: int | Knockout) -> int | None:
        return self.analysis.first_affected(unit)

    def logprobs(self, window: tuple[int, int], units: list[int | Knockout]) -> torch.Tensor:
        """(B, T, V) answer log-probs, one batch row per knockout (a bare position: that token's knockout).

        A knockout that can change nothing (no blocked pair is one its layers' masks allow) is the baseline
        row itself, not a recomputation of it: that would differ in the last bits."""
        return self.logprobs_batches(window, [units])[0]

    @torch.no_grad()
    def logprobs_batches(self, window: tuple[int, int], batches: list[list[int | Knockout]]) -> list[torch.Tensor]:
        """``logprobs`` of each batch, the decoder layers run batch by batch and the head once for all of them.

        A batch's rows are bounded by what its layers' activations may take (``next_batch``); the head's are
        only the answer rows, and its weight (vocabulary × hidden) is read once per call, so several batches'
        rows in one matrix product run nearer the machine's matmul rate."""
        outs, computed = [], []  # per batch (B, T, V); per batch with acting rows (batch, rows, (B', T, H) states)
        for b, units in enumerate(batches):
            knockouts = [self.analysis.knockout(unit) for unit in units]
            firsts = [k.first_affected(self.analysis.vision_groups) for k in knockouts]
            flags = self._acting(window, knockouts, firsts)
            acting = [k for k, acts in zip(knockouts, flags) if acts]
            outs.append(self.base_logprobs[None].expand(len(units), -1, -1))
            if not acting:
                continue
            # positions before the earliest change are the cached ones; the answer positions are always computed
            start = min(min(first for first, acts in zip(firsts, flags) if acts), self.analysis.answer_start)
            hidden = self.layer_inputs[window[0]][:, start:].expand(len(acting), -1, -1)  # (B', S - start, H)
            kv = _PrefixKV(self.kv, start, len(acting))
            answer = self._run(hidden, window[0], start, kv, self._plan(window, acting), head=False)  # (B', T, H)
            computed.append((b, [i for i, acts in enumerate(flags) if acts], answer))
        if not computed:
            return outs
        if self.savings.shared_head:
            parts = self._head(torch.cat([a for _, _, a in computed])).split([len(rows) for _, rows, _ in computed])
        else:
            parts = [self._head(answer) for _, _, answer in computed]
        for (b, rows, _), part in zip(computed, parts):
            if len(rows) == outs[b].shape[0]:
                outs[b] = part
            else:
                outs[b] = outs[b].clone().index_copy_(0, torch.tensor(rows, device=part.device), part)
        return outs

    def visual_logprobs(self, start: int, embeds: torch.Tensor, deepstack: list[torch.Tensor]) -> torch.Tensor:
        """(B, T, V) answer log-probs with each row's own image features: ``embeds`` (B, n_vis, H) entering
        layer 0 at the image positions, ``deepstack`` per level (B, n_vis, H) added after its layer. Positions
        before ``start`` (at most the first image position whose features differ) are the cached ones."""
        start = min(start, self.analysis.answer_start)
        batch = embeds.shape[0]
        hidden = self.layer_inputs[0].expand(batch, -1, -1).clone()  # (B, S, H)
        mask = self.visual_mask.to(hidden.device)
        hidden[:, mask] = embeds.to(hidden.device, hidden.dtype)
        rows = []
        for level in deepstack:
            full = level.new_zeros(batch, mask.shape[0], level.shape[-1])  # adding 0.0 elsewhere is exact
            full[:, mask.to(level.device)] = level
            rows.append(full)
        kv = _PrefixKV(self.kv, start, batch)
        return self._run(hidden[:, start:], 0, start, kv, self._plan(), deepstack=rows)

    def _acting(self, window: tuple[int, int], knockouts: list[Knockout], firsts: list[int | None]) -> list[bool]:
        """Per knockout: whether some layer of the window allows a pair it blocks (else it changes nothing)."""
        flags = [first is not None for first in firsts]
        masks = self.masks[window[0]: window[1] + 1]
        if not any(flags) or any(mask is None for mask in masks):  # a plain causal layer: first_affected says it
            return flags
        length = masks[0].shape[-1]
        queries = torch.stack([k.query_mask(length) for k in knockouts]).to(masks[0].device, torch.float32)  # (B, S)
        keys = torch.stack([k.key_mask(length) for k in knockouts]).to(masks[0].device)  # (B, S)
        acts = torch.zeros(len(knockouts), dtype=torch.bool, device=keys.device)
        for mask in masks:  # (1, 1, S, S) allowed pairs, e.g. within a sliding window
            reach = queries @ mask[0, 0].to(torch.float32) - queries  # (B, K) blocked queries allowed to see k, k itself not
            acts |= ((reach > 0) & keys).any(dim=-1)
        return [flag and bool(act) for flag, act in zip(flags, acts.tolist())]


def plan(loaded, config, fast: bool) -> StagePlan:
    num_layers = loaded.adapter.num_layers
    windows = windows_for(parse_layers(config.layers, num_layers), config.window, num_layers)
    return StagePlan(windows, windows, window_labels(windows, "layer", "layers"),
                     lambda analysis, tf, units: (FastEngine if fast else NaiveEngine)(analysis, tf),
                     lambda analysis, engine, w, unit, knockout, n: analysis.generate(
                         n, analysis.plan(windows[w], [knockout]))[0], takes_knockouts=True)
