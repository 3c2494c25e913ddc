"""The vision encoder (``--stage vision-encoder``): attention knockouts between an image's patches in the ViT.

At every ViT layer of the window, every other position of the unit's image (a CLS token included) is blocked from
the unit's patches, through an attention function registered in transformers' ``AttentionInterface``
(``vit_knockout_attention``) and called by the tower's own attention modules. Chunks (one image's sequence each) are
met in order: the packed images of a Qwen tower, one attention call each, or the batch of a CLIP or SigLIP tower,
one call for all. The family's adapter says where each patch row sits in its image's sequence
(``vision_sequence``), which blocks reach the features (``vision_depth``) and how to re-run them
(``vision_rerun``). ``VisionEncoderEngine`` caches each ViT layer's input once and re-runs the layers from the
window's first for a batch of knockouts of one image (Qwen: one stacked chunk, split into a batched SDPA call; CLIP,
SigLIP: a batch of copies), the tower's head (mergers, projector), then the decoder from that image's first
position; ``NaiveVisionEncoderEngine`` is its oracle: the whole model per knockout, the ViT attention written out.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..config import parse_layers, windows_for
from ..engine import Analysis, TeacherForced, whole_model_logprobs
from .decoder import FastEngine
from ..errors import UsageError, mention, message_of
from .base import StagePlan, window_labels
from ..patches import PatchLayout
from .pixels import Patches


VIT_ATTENTION = "mask_impact_vit"
_ACTIVE_VIT_PLAN: contextvars.ContextVar[VisionPlan | None] = contextvars.ContextVar("mask_impact_vit", default=None)


@dataclass
class VisionPlan:
    """What the registered ViT attention blocks: at every ViT layer of ``layers``, in each image's sequence (a
    "chunk", met in order: a packed tower's images one attention call each, a batched tower's all in one call),
    every position but itself is blocked from the chunk's knocked-out patches (``chunks``: per chunk, (n,) True at
    their positions in the sequence; None: the chunk is untouched).

    ``stacked``: the vision tower is given one chunk of ``len(chunks)`` equal images of ``stacked`` patches each (a
    batch of knockouts of one image); the attention splits it into a batch of images and runs them in one SDPA call,
    at every ViT layer, each image among its own patches only (a plain layer: as if they were separate chunks)."""

    layers: range
    chunks: list[torch.Tensor | None]
    reference: bool = False
    stacked: int | None = None  # the fast engine's batch: one chunk holding len(chunks) copies of an image this long

    def __post_init__(self) -> None:
        self.calls: dict[int, int] = {}

    def next_chunks(self, layer: int, count: int, length: int) -> list[torch.Tensor | None]:
        """The next ``count`` chunks at ``layer`` (one attention call over a batch of ``count`` sequences)."""
        index = self.calls.get(layer, 0)
        self.calls[layer] = index + count
        chunks = [self.chunks[(index + b) % len(self.chunks)] for b in range(count)]
        for b, keys in enumerate(chunks):
            if keys is not None and keys.shape[0] != length:
                raise RuntimeError(f"ViT layer {layer}: chunk {index + b} has {length} positions, the plan "
                                   f"{keys.shape[0]}")
        return chunks


def vit_knockout_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """The vision tower's attention with the active ``VisionPlan``'s blocks; plain SDPA elsewhere."""
    plan = _ACTIVE_VIT_PLAN.get()
    layer = getattr(module, "mask_impact_layer", None)
    if plan is not None and plan.stacked is not None:
        return _stacked_attention(plan, layer in plan.layers, query, key, value, scaling)
    batch, length = query.shape[0], query.shape[2]
    chunks = plan.next_chunks(layer, batch, length) if plan is not None and layer in plan.layers else [None] * batch
    if all(keys is None for keys in chunks) and not (plan is not None and plan.reference):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None:
        raise RuntimeError("the vision tower passed its attention a mask; the ViT knockout assumes none")
    eye = torch.eye(length, dtype=torch.bool, device=query.device)
    keys = torch.stack([torch.zeros(length, dtype=torch.bool) if chunk is None else chunk.cpu()
                        for chunk in chunks]).to(query.device)  # (B, n)
    blocked = keys[:, None, None, :] & ~eye  # (B, 1, Q, K): every other position from the knocked-out patches
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if plan.reference:
        scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, nh, n, n)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(weights, value)
    else:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=~blocked, scale=scale)
    return output.transpose(1, 2).contiguous(), None


def _stacked_attention(plan: VisionPlan, knocks: bool, query, key, value, scaling: float | None):
    """A stacked chunk (1, nh, B·n, hs) as B images of n patches: one SDPA call, each image's own blocks."""
    batch, length = len(plan.chunks), plan.stacked
    heads, dim = query.shape[1], query.shape[-1]

    def split(states: torch.Tensor) -> torch.Tensor:
        return states[0].reshape(heads, batch, length, dim).transpose(0, 1)  # (B, nh, n, hs)

    mask = None
    if knocks:
        eye = torch.eye(length, dtype=torch.bool, device=query.device)
        keys = torch.stack([torch.zeros(length, dtype=torch.bool) if chunk is None else chunk
                            for chunk in plan.chunks]).to(query.device)  # (B, n)
        mask = ~(keys[:, None, None, :] & ~eye)  # (B, 1, n, n) allowed: every other patch loses the row's keys
    scale = scaling if scaling is not None else dim ** -0.5
    output = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask, scale=scale)
    return output.transpose(1, 2).reshape(1, batch * length, heads, dim), None  # (1, B·n, nh, hs)


AttentionInterface.register(VIT_ATTENTION, vit_knockout_attention)


@contextlib.contextmanager
def vit_plan(loaded, plan: VisionPlan | None):
    """Route the vision tower's attention through ``vit_knockout_attention`` with ``plan`` active."""
    adapter = loaded.adapter
    for index, layer in enumerate(adapter.vision_layers):
        adapter.vision_attention(layer).mask_impact_layer = index
    configs = adapter.vision_attention_configs()
    saved = [config._attn_implementation_internal for config in configs]
    token = _ACTIVE_VIT_PLAN.set(plan)
    try:
        for config in configs:
            config._attn_implementation_internal = VIT_ATTENTION
        yield
    finally:
        for config, value in zip(configs, saved):
            config._attn_implementation_internal = value
        _ACTIVE_VIT_PLAN.reset(token)


def image_sequences(adapter, layout: PatchLayout) -> list[tuple[int, torch.Tensor, int]]:
    """Per image: its sequence's length in the tower, where each of its patch rows sits in it, and how many such
    sequences (views) it takes (positions run over its views' sequences end to end)."""
    return [(*adapter.vision_sequence(grid), adapter.vision_views(grid)) for grid in layout.grids]


def _chunk_keys(sequences: list[tuple[int, torch.Tensor, int]], layout: PatchLayout, unit,
                images: range) -> list[torch.Tensor | None]:
    """Per sequence (chunk) of the images of one forward, in order (an image's views one after the other): the
    unit's patches at their positions in that sequence (None where it has none)."""
    chunks = []
    for image in images:
        rows = layout.rows(image)
        length, positions, views = sequences[image]
        inside = [row - rows.start for row in unit.patches if row in rows]
        keys = torch.zeros(views * length, dtype=torch.bool)
        keys[positions[inside]] = True
        for view in keys.split(length):
            chunks.append(view if view.any() else None)
    return chunks


class _KnockedOutPatches(Patches):
    """Patches, and the model with a unit's patches knocked out in a window of ViT layers (for generation)."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, units: list):
        super().__init__(analysis, tf, "mean", units)
        self.sequences = image_sequences(analysis.loaded.adapter, self.layout)

    def plan_for(self, window: tuple[int, int], unit, reference: bool = False) -> VisionPlan:
        """The knockout of ``unit`` at ViT layers ``window`` over every image of the prompt."""
        return VisionPlan(range(window[0], window[1] + 1),
                          _chunk_keys(self.sequences, self.layout, unit, range(len(self.layout.grids))), reference)

    def knocked_out(self, window: tuple[int, int], unit):
        return vit_plan(self.analysis.loaded, self.plan_for(window, unit))


class VisionEncoderEngine(_KnockedOutPatches):
    """ViT knockouts: each ViT layer's input cached once; a batch of knockouts starting at ViT layer ``a`` re-runs
    layers ``a ..`` for its rows (the units' own image only), the mergers, then the decoder from that image's first
    position. A row whose visual features come out unchanged is the baseline row itself."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, units: list):
        super().__init__(analysis, tf, units)
        self.fast = FastEngine(analysis, tf)
        self.base_logprobs = self.fast.base_logprobs
        adapter, device = analysis.loaded.adapter, analysis.loaded.device
        self.recorded: list[tuple[tuple, dict]] = []  # per ViT layer: the block's arguments in the unmasked pass

        def record(module, args, kwargs):
            self.recorded.append((args, dict(kwargs)))

        hooks = [layer.register_forward_pre_hook(record, with_kwargs=True)
                 for layer in list(adapter.vision_layers)[:adapter.vision_depth]]
        try:
            with torch.no_grad(), vit_plan(analysis.loaded, None):
                self.features = adapter.image_features(self.pixel_values.to(device), self.grid.to(device))
        finally:
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def logprobs(self, window: tuple[int, int], units: list) -> torch.Tensor:
        out = self.base_logprobs[None].expand(len(units), -1, -1).clone()
        for image in sorted({unit.image for unit in units}):
            rows = [i for i, unit in enumerate(units) if unit.image == image]
            embeds, levels = self._encode(window, image, [units[i] for i in rows])
            span = self.token_slices[image]
            unchanged = [torch.equal(embeds[b], self.fast.image_embeds[span].to(embeds.dtype)) and all(
                torch.equal(level[b], cached[span].to(level.dtype)) for level, cached in
                zip(levels, self.fast.deepstack_rows)) for b in range(len(rows))]
            acting = [b for b, same in enumerate(unchanged) if not same]
            if not acting:
                continue
            pick = torch.tensor(acting)
            computed = self._decode(image, embeds[pick], [level[pick] for level in levels])
            out[torch.tensor([rows[b] for b in acting])] = computed.to(out.device)
        return out

    def _encode(self, window: tuple[int, int], image: int, units: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ViT layers ``window[0] ..`` over ``image`` for each unit: (B, n_tok, H) features and, per DeepStack
        level, (B, n_tok, H) features (the levels of layers below the window are the cached ones)."""
        adapter = self.analysis.loaded.adapter
        batch = len(units)
        chunks = [keys for unit in units for keys in _chunk_keys(self.sequences, self.layout, unit,
                                                                 range(image, image + 1))]  # each copy's views
        stacked = self.sequences[image][0] if adapter.vision_packed else None  # one stacked chunk, split per row
        plan = VisionPlan(range(window[0], window[1] + 1), chunks, stacked=stacked)
        with vit_plan(self.analysis.loaded, plan):
            embeds, computed = adapter.vision_rerun(self.recorded, window[0], image, self.layout.rows(image), batch,
                                                    self.grid[image])
        tokens = self.token_slices[image]
        deepstack = [computed[level] if level in computed else cached[tokens][None].expand(batch, -1, -1)
                     for level, cached in enumerate(adapter.deepstack_features(self.features))]
        return embeds, deepstack


class NaiveVisionEncoderEngine(_KnockedOutPatches):
    """The oracle: the whole model per knockout, the ViT attention written out with the plan's blocks."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, units: list):
        super().__init__(analysis, tf, units)
        self.base_logprobs = self._forward(None)[0]

    def _forward(self, plan: VisionPlan | None) -> torch.Tensor:
        with vit_plan(self.analysis.loaded, plan):
            return whole_model_logprobs(self.analysis, self.tf)

    def logprobs(self, window: tuple[int, int], units: list) -> torch.Tensor:
        return torch.cat([self._forward(self.plan_for(window, unit, reference=True)) for unit in units], dim=0)


def plan(loaded, config, fast: bool) -> StagePlan:
    """``--layers`` and ``--window`` count the vision tower's layers."""
    depth = loaded.adapter.vision_depth
    try:
        windows = windows_for(parse_layers(config.layers, depth), config.window, depth)
    except UsageError as error:
        raise UsageError(f"{message_of(error)} (with {mention('stage', 'vision-encoder')}, layers are "
                         f"{loaded.adapter.vision_depth_note()})") from None

    def generate(analysis, engine, w, unit, knockout, n):
        with engine.knocked_out(windows[w], unit):
            return analysis.generate(n)[0]

    return StagePlan(windows, windows, window_labels(windows, "ViT layer", "ViT layers"),
                     lambda analysis, tf, units: (VisionEncoderEngine if fast else NaiveVisionEncoderEngine)(
                         analysis, tf, units), generate)
