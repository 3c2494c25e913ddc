"""The vision encoder (``--stage vision-encoder``): attention knockouts between an image's patches in the ViT.

At every ViT layer of the window, every other patch of the unit's image is blocked from the unit's patches,
through an attention function registered in transformers' ``AttentionInterface`` (``vit_knockout_attention``)
and called by the tower's own attention modules; chunks (the packed images of the tower's sequence) are met in
order. ``VisionEncoderEngine`` caches each ViT layer's input once and re-runs the layers from the window's first
for a batch of knockouts of one image (one stacked chunk, split into a batched SDPA call), the mergers, then the
decoder from that image's first position; ``NaiveVisionEncoderEngine`` is its oracle: the whole model per
knockout, the ViT attention written out.
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
from ..engine import Analysis, FastEngine, TeacherForced, whole_model_logprobs
from ..errors import UsageError
from .base import StagePlan, window_labels
from ..patches import PatchLayout
from .pixels import Patches, deepstack_of


VIT_ATTENTION = "mask_impact_vit"
_ACTIVE_VIT_PLAN: contextvars.ContextVar[VisionPlan | None] = contextvars.ContextVar("mask_impact_vit", default=None)


@dataclass
class VisionPlan:
    """What the registered ViT attention blocks: at every ViT layer of ``layers``, in each packed image (a
    "chunk" of the vision tower's sequence, met in order), every patch but itself is blocked from the chunk's
    knocked-out patches (``chunks``: per chunk, (n,) True at them; None: the chunk is untouched).

    ``stacked``: the vision tower is given one chunk of ``len(chunks)`` equal images of ``stacked`` patches each (a
    batch of knockouts of one image); the attention splits it into a batch of images and runs them in one SDPA call,
    at every ViT layer, each image among its own patches only (a plain layer: as if they were separate chunks)."""

    layers: range
    chunks: list[torch.Tensor | None]
    reference: bool = False
    stacked: int | None = None  # the fast engine's batch: one chunk holding len(chunks) copies of an image this long

    def __post_init__(self) -> None:
        self.calls: dict[int, int] = {}

    def next_chunk(self, layer: int, length: int) -> torch.Tensor | None:
        index = self.calls.get(layer, 0)
        self.calls[layer] = index + 1
        keys = self.chunks[index % len(self.chunks)]
        if keys is not None and keys.shape[0] != length:
            raise RuntimeError(f"ViT layer {layer}: chunk {index} has {length} patches, the plan {keys.shape[0]}")
        return keys


def vit_knockout_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """The vision tower's attention with the active ``VisionPlan``'s blocks; plain SDPA elsewhere."""
    plan = _ACTIVE_VIT_PLAN.get()
    layer = getattr(module, "mask_impact_layer", None)
    if plan is not None and plan.stacked is not None:
        return _stacked_attention(plan, layer in plan.layers, query, key, value, scaling)
    keys = plan.next_chunk(layer, query.shape[2]) if plan is not None and layer in plan.layers else None
    if keys is None and not (plan is not None and plan.reference):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    length = query.shape[2]
    eye = torch.eye(length, dtype=torch.bool, device=query.device)
    blocked = torch.zeros(length, length, dtype=torch.bool, device=query.device) if keys is None else \
        keys.to(query.device)[None, :] & ~eye  # (Q, K): every other patch from the knocked-out ones
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if plan.reference:
        scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (1, nh, n, n)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(weights, value)
    else:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=~blocked[None, None], scale=scale)
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
    visual = loaded.adapter.vision_tower
    for index, block in enumerate(visual.blocks):
        block.attn.mask_impact_layer = index
    config = visual.config
    saved = config._attn_implementation_internal
    token = _ACTIVE_VIT_PLAN.set(plan)
    try:
        config._attn_implementation_internal = VIT_ATTENTION
        yield
    finally:
        config._attn_implementation_internal = saved
        _ACTIVE_VIT_PLAN.reset(token)


def _chunk_keys(layout: PatchLayout, unit, images: range) -> list[torch.Tensor | None]:
    """Per image chunk of one forward: the unit's patches among that image's rows (None where it has none)."""
    chunks = []
    for image in images:
        rows = layout.rows(image)
        keys = torch.zeros(len(rows), dtype=torch.bool)
        inside = [row - rows.start for row in unit.patches if row in rows]
        keys[inside] = True
        chunks.append(keys if inside else None)
    return chunks


class _KnockedOutPatches(Patches):
    """Patches, and the model with a unit's patches knocked out in a window of ViT layers (for generation)."""

    def knocked_out(self, window: tuple[int, int], unit):
        images = range(len(self.layout.grids))
        return vit_plan(self.analysis.loaded, VisionPlan(range(window[0], window[1] + 1),
                                                         _chunk_keys(self.layout, unit, images)))


class VisionEncoderEngine(_KnockedOutPatches):
    """ViT knockouts: each ViT layer's input cached once; a batch of knockouts starting at ViT layer ``a`` re-runs
    layers ``a ..`` for its rows (the units' own image only), the mergers, then the decoder from that image's first
    position. A row whose visual features come out unchanged is the baseline row itself."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, units: list):
        super().__init__(analysis, tf, "mean", units)
        self.fast = FastEngine(analysis, tf)
        self.base_logprobs = self.fast.base_logprobs
        visual = analysis.loaded.adapter.vision_tower
        self.inputs: list[tuple] = []  # per ViT layer: (hidden (N, D), the block's keyword arguments)

        def record(module, args, kwargs):
            self.inputs.append((args[0] if args else kwargs["hidden_states"], dict(kwargs)))

        hooks = [block.register_forward_pre_hook(record, with_kwargs=True) for block in visual.blocks]
        try:
            with torch.no_grad(), vit_plan(analysis.loaded, None):
                grid = self.grid.to(analysis.loaded.device)
                self.features = visual(self.pixel_values.to(analysis.loaded.device, visual.dtype), grid_thw=grid,
                                       return_dict=True)
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
        """ViT layers ``window[0] ..`` over ``image`` for each unit: (B, n_tok, H) embeddings and, per DeepStack
        level, (B, n_tok, H) features."""
        visual = self.analysis.loaded.adapter.vision_tower
        first = window[0]
        rows = self.layout.rows(image)
        batch = len(units)
        hidden, kwargs = self.inputs[first]
        hidden = hidden[rows.start: rows.stop].repeat(batch, 1)  # (B·n, D), one image per row
        cos, sin = kwargs["position_embeddings"]
        kwargs = dict(kwargs, position_embeddings=(cos[rows.start: rows.stop].repeat(batch, 1),
                                                   sin[rows.start: rows.stop].repeat(batch, 1)),
                      cu_seqlens=torch.tensor([0, batch * len(rows)], dtype=torch.int32, device=hidden.device),
                      max_seqlen=batch * len(rows))  # one stacked chunk: the attention splits it per row
        kwargs.pop("hidden_states", None)
        plan = VisionPlan(range(window[0], window[1] + 1), [_chunk_keys(self.layout, unit, range(image, image + 1))[0]
                                                            for unit in units], stacked=len(rows))
        tokens = self.token_slices[image]
        levels = []
        with vit_plan(self.analysis.loaded, plan):
            for index in range(first, len(visual.blocks)):
                hidden = visual.blocks[index](hidden, **kwargs)
                if index in getattr(visual, "deepstack_visual_indexes", ()):
                    level = visual.deepstack_visual_indexes.index(index)
                    levels.append((level, visual.deepstack_merger_list[level](hidden)))
            embeds = visual.merger(hidden).reshape(batch, -1, self.fast.image_embeds.shape[-1])
        computed = dict(levels)
        deepstack = []
        for level, cached in enumerate(deepstack_of(self.features)):  # levels below the window are unchanged
            if level in computed:
                deepstack.append(computed[level].reshape(batch, -1, cached.shape[-1]))
            else:
                deepstack.append(cached[tokens][None].expand(batch, -1, -1))
        return embeds, deepstack


class NaiveVisionEncoderEngine(_KnockedOutPatches):
    """The oracle: the whole model per knockout, the ViT attention written out with the plan's blocks."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, units: list):
        super().__init__(analysis, tf, "mean", units)
        self.base_logprobs = self._forward(None)[0]

    def _forward(self, plan: VisionPlan | None) -> torch.Tensor:
        with vit_plan(self.analysis.loaded, plan):
            return whole_model_logprobs(self.analysis, self.tf)

    def logprobs(self, window: tuple[int, int], units: list) -> torch.Tensor:
        images = range(len(self.layout.grids))
        return torch.cat([self._forward(VisionPlan(range(window[0], window[1] + 1),
                                                   _chunk_keys(self.layout, unit, images), reference=True))
                          for unit in units], dim=0)


def plan(loaded, config, fast: bool) -> StagePlan:
    """``--layers`` and ``--window`` count the vision tower's layers."""
    depth = loaded.adapter.vision_depth
    try:
        windows = windows_for(parse_layers(config.layers, depth), config.window, depth)
    except UsageError as error:
        raise UsageError(f"{error} (with --stage vision-encoder, layers are the vision tower's {depth})") from None

    def generate(analysis, engine, w, unit, knockout, n):
        with engine.knocked_out(windows[w], unit):
            return analysis.generate(n)[0]

    return StagePlan(windows, windows, window_labels(windows, "ViT layer", "ViT layers"),
                     lambda analysis, tf, units: (VisionEncoderEngine if fast else NaiveVisionEncoderEngine)(
                         analysis, tf, units), generate)
