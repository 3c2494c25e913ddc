"""Knockouts before the decoder: occlusion of the image the model sees (``--stage pixels``), and the routes by
which the image reaches the decoder (``--stage deepstack``).

The processor turns each image into ``pixel_values``: one row per 16×16 patch of the *resized* image (its
temporal copies included), ordered image by image, then t, then decoder token (row, column of the merged
grid), then the 2×2 patches inside that token (``PatchLayout``). Occlusion replaces a unit's rows by a
fill and runs the model on the result, so the pixels replaced are exactly the unit's patches: occluding the
original picture instead would blur the unit's edges through the resize.

Fills (``--fill``): ``mean`` (the image's mean colour, the default), ``black``, ``blur`` (a Gaussian blur of
the resized image with σ = one patch side, so the unit keeps its average colour but loses its detail) and
``noise`` (uniform random pixels, seeded by the unit's index, so a rerun draws the same noise).

``PixelEngine`` re-runs the vision tower on a batch of occluded copies of one image at a time and the
decoder from that image's first position (everything before it is the cached unmasked pass);
``NaivePixelEngine`` is its oracle: one full forward of the whole model per unit, pixels replaced in the
input. A unit whose fill equals the pixels it replaces changes nothing and is the baseline row itself.

DeepStack: Qwen3-VL adds features from early ViT layers to the decoder's hidden states at the image positions
after decoder layers 0, 1, 2 (``deepstack_visual_indexes``), beside the main visual embedding that enters layer
0. ``--stage deepstack`` removes, per unit, the DeepStack feature of one level (or of all levels), or keeps them
and replaces the unit's main embedding by its image's mean embedding (the mean ablation of Neo et al.): the rows
of the result say which route carries the unit's information. ``DeepStackEngine`` recomputes the decoder from
the unit's first position with the altered features; ``NaiveDeepStackEngine`` runs the whole model with the
vision tower's output altered by a forward hook.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .engine import Analysis, FastEngine, TeacherForced, _to
from .knockout import apply_plan, knockout_attention_installed

FILLS = ("mean", "blur", "black", "noise")
STAGES = ("decoder", "vision-encoder", "pixels", "deepstack")


@dataclass
class PatchLayout:
    """Where each image's patches sit among ``pixel_values``' rows."""

    offsets: list[int]  # first row of each image
    grids: list[tuple[int, int, int]]  # (t, h, w) in patches
    merge: int  # spatial merge size: a decoder token is merge × merge patches

    @classmethod
    def of(cls, prompt, merge: int) -> PatchLayout:
        grids = [tuple(image.grid_thw) for image in prompt.images]
        offsets, row = [], 0
        for t, h, w in grids:
            offsets.append(row)
            row += t * h * w
        return cls(offsets, grids, merge)

    def rows(self, image: int) -> range:
        t, h, w = self.grids[image]
        return range(self.offsets[image], self.offsets[image] + t * h * w)

    def token_rows(self, image: int, n: int) -> list[int]:
        """The rows of the patches that make image ``image``'s ``n``-th decoder token."""
        size = self.merge * self.merge
        first = self.offsets[image] + n * size
        return list(range(first, first + size))

    def cell(self, row: int) -> tuple[int, int, int, int]:
        """(image, t, patch row, patch column) of a ``pixel_values`` row."""
        image = max(i for i, offset in enumerate(self.offsets) if offset <= row)
        _, h, w = self.grids[image]
        n, sub = divmod(row - self.offsets[image], self.merge * self.merge)
        per_frame = (h // self.merge) * (w // self.merge)
        t, rest = divmod(n, per_frame)
        block_row, block_col = divmod(rest, w // self.merge)
        dy, dx = divmod(sub, self.merge)
        return image, t, block_row * self.merge + dy, block_col * self.merge + dx


def token_numbers(prompt) -> dict[int, tuple[int, int]]:
    """Prompt position of each vision token → (image, its index among that image's tokens)."""
    counts: dict[int, int] = {}
    numbers = {}
    for tok in prompt.tokens:
        if tok.modality == "vision":
            numbers[tok.index] = (tok.image, counts.get(tok.image, 0))
            counts[tok.image] = counts.get(tok.image, 0) + 1
    return numbers


def patch_rows(prompt, layout: PatchLayout, positions: list[int]) -> list[int]:
    """The ``pixel_values`` rows of the patches under the decoder tokens at ``positions``."""
    numbers = token_numbers(prompt)
    return sorted(row for p in positions for row in layout.token_rows(*numbers[p]))


class Filler:
    """What a unit's patches are replaced with, in the processor's normalised units."""

    def __init__(self, loaded, pixel_values: torch.Tensor, layout: PatchLayout, fill: str):
        processor = loaded.processor.image_processor
        self.pixel_values, self.layout, self.fill = pixel_values, layout, fill
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32)  # (C,)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32)
        self.scale = processor.rescale_factor
        self.channels = len(processor.image_mean)
        self.patch = processor.patch_size
        self._blurred: dict[int, torch.Tensor] = {}

    def _shaped(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(rows.shape[0], self.channels, -1)  # (n, C, T·P·P)

    def values(self, rows: list[int], seed: int) -> torch.Tensor:
        """(len(rows), D) replacement rows."""
        original = self.pixel_values[rows].float()
        if self.fill == "mean":
            image = self.layout.cell(rows[0])[0]
            pixels = self._shaped(self.pixel_values[list(self.layout.rows(image))].float())
            colour = pixels.double().mean(dim=(0, 2)).float()  # (C,); in float64 so a uniform image keeps its value
            out = colour[None, :, None].expand(len(rows), -1, self._shaped(original).shape[-1])
        elif self.fill == "black":
            colour = (0.0 * self.scale - self.mean) / self.std
            out = colour[None, :, None].expand(len(rows), -1, self._shaped(original).shape[-1])
        elif self.fill == "noise":
            generator = torch.Generator().manual_seed(seed)
            temporal = self._shaped(original).shape[-1] // (self.patch * self.patch)
            noise = torch.randint(0, 256, (len(rows), self.channels, 1, self.patch * self.patch), generator=generator)
            noise = (noise.float() * self.scale - self.mean[None, :, None, None]) / self.std[None, :, None, None]
            out = noise.expand(-1, -1, temporal, -1).reshape(len(rows), self.channels, -1)  # same in every frame
        else:
            out = torch.stack([self._blurred_row(row) for row in rows])
        return out.reshape(original.shape).to(self.pixel_values.dtype)

    def _blurred_row(self, row: int) -> torch.Tensor:
        image = self.layout.cell(row)[0]
        if image not in self._blurred:
            self._blurred[image] = self._blur(image)
        return self._blurred[image][row - self.layout.offsets[image]]

    def _blur(self, image: int) -> torch.Tensor:
        """The image's rows, Gaussian-blurred as a picture (σ = one patch side, edges reflected)."""
        from torchvision.transforms.functional import gaussian_blur

        t, h, w = self.layout.grids[image]
        m, p, c = self.layout.merge, self.patch, self.channels
        rows = self.pixel_values[list(self.layout.rows(image))].float()
        temporal = rows.shape[-1] // (c * p * p)
        # rows: (t, h/m, w/m, m, m) patches of (C, T, P, P) → pictures (t·T, C, h·P, w·P)
        grid = rows.reshape(t, h // m, w // m, m, m, c, temporal, p, p)
        picture = grid.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * temporal, c, h * p, w * p)
        kernel = min(4 * p + 1, 2 * ((min(h, w) * p - 1) // 2) + 1)  # odd, shorter than the picture
        blurred = gaussian_blur(picture, [kernel, kernel], [float(p), float(p)])
        back = blurred.reshape(t, temporal, c, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return back.reshape(rows.shape)


class _Patches:
    """What the patch-level engines share (occlusion and the vision encoder): the patch layout, the fill, where each
    image starts and its tokens lie among the visual features, and the decoder run with one image's features
    replaced."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, fill: str, units: list):
        self.analysis, self.tf = analysis, tf
        loaded = analysis.loaded
        self.pixel_values = tf.model_kwargs["pixel_values"]
        self.grid = tf.model_kwargs["image_grid_thw"]
        self.layout = PatchLayout.of(analysis.prompt, loaded.model.config.vision_config.spatial_merge_size)
        self.filler = Filler(loaded, self.pixel_values, self.layout, fill)
        self.seeds = {id(unit): unit.index for unit in units}
        vision = [tok for tok in analysis.prompt.tokens if tok.modality == "vision"]
        self.image_start = {image: min(t.index for t in vision if t.image == image) for image in {t.image for t in
                                                                                                 vision}}
        self.token_slices = {}
        count = 0
        for image in sorted(self.image_start):
            n = sum(t.image == image for t in vision)
            self.token_slices[image] = slice(count, count + n)
            count += n

    def first_affected(self, unit) -> int:
        return self.image_start[unit.image]

    def knocked_out(self, window: tuple[int, int], unit):
        """The model with ``unit``'s patches knocked out in the ViT layers of ``window`` (for generation)."""
        images = range(len(self.layout.grids))
        return vit_plan(self.analysis.loaded, VisionPlan(range(window[0], window[1] + 1),
                                                         _chunk_keys(self.layout, unit, images)))

    def _decode(self, image: int, embeds: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        """(B, T, V) answer log-probs with ``image``'s features replaced per row: ``embeds`` (B, n_tok, H) and, per
        DeepStack level, (B, n_tok, H); the other images keep theirs (``self.fast``: the decoder's cache)."""
        span, batch = self.token_slices[image], embeds.shape[0]
        full = self.fast.image_embeds[None].expand(batch, -1, -1).clone()  # (B, n_vis, H)
        full[:, span] = embeds.to(full.dtype)
        deepstack = []
        for cached, level in zip(self.fast.deepstack_rows, levels):
            rows = cached[None].expand(batch, -1, -1).clone()
            rows[:, span] = level.to(rows.dtype)
            deepstack.append(rows)
        return self.fast.visual_logprobs(self.image_start[image], full, deepstack)

    def occluded(self, unit) -> torch.Tensor:
        """The model's ``pixel_values`` with ``unit``'s patches filled."""
        pixel_values = self.pixel_values.clone()
        pixel_values[unit.patches] = self.filler.values(unit.patches, self.seeds.get(id(unit), unit.index))
        return pixel_values


class PixelEngine(_Patches):
    """Occlusion through the vision tower, then the decoder from the image's first position."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, fill: str, units: list):
        super().__init__(analysis, tf, fill, units)
        self.fast = FastEngine(analysis, tf)
        self.base_logprobs = self.fast.base_logprobs

    @torch.no_grad()
    def logprobs(self, window, units: list) -> torch.Tensor:
        """(B, T, V) answer log-probs, one row per unit (``window`` is not used: occlusion has no layers)."""
        out = self.base_logprobs[None].expand(len(units), -1, -1).clone()
        inner = self.analysis.loaded.model.model
        device = self.analysis.loaded.device
        for image in sorted({unit.image for unit in units}):
            rows = [i for i, unit in enumerate(units) if unit.image == image]
            images = [self.occluded(units[i])[list(self.layout.rows(image))] for i in rows]  # (n_i, D) each
            original = self.pixel_values[list(self.layout.rows(image))]
            acting = [i for i, pixels in zip(rows, images) if not torch.equal(pixels, original)]
            if not acting:
                continue
            batch = torch.cat([pixels for i, pixels in zip(rows, images) if i in acting]).to(device)
            grid = self.grid[image: image + 1].repeat(len(acting), 1).to(device)
            features = inner.get_image_features(batch, grid, return_dict=True)
            embeds = torch.stack(features.pooler_output)  # (B', n_tok, H)
            levels = [level.reshape(len(acting), -1, level.shape[-1]) for level in deepstack_of(features)]
            out[torch.tensor(acting)] = self._decode(image, embeds, levels).to(out.device)
        return out


class NaivePixelEngine(_Patches):
    """The oracle: one full forward of the whole model per unit, with the occluded pixels as its input."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, fill: str, units: list):
        super().__init__(analysis, tf, fill, units)
        self.base_logprobs = self._forward(self.pixel_values)[0]

    @torch.no_grad()
    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        loaded = self.analysis.loaded
        kwargs = dict(self.tf.model_kwargs, pixel_values=pixel_values)
        inputs = _to(dict(input_ids=self.tf.input_ids, **kwargs), loaded.device)
        with knockout_attention_installed(loaded.adapter.attention_configs()), \
                apply_plan(self.analysis.plan(reference=True)):
            logits = loaded.model(**inputs).logits  # (1, S, V)
        return F.log_softmax(logits[:, self.tf.answer_positions].float(), dim=-1)  # (1, T, V)

    def logprobs(self, window, units: list) -> torch.Tensor:
        return torch.cat([self._forward(self.occluded(unit)) for unit in units], dim=0)


def merge_size(prompt) -> int:
    """Patches per side of a decoder token, from the first image's grid and token count."""
    t, h, w = prompt.images[0].grid_thw
    tokens = sum(tok.image == 0 for tok in prompt.tokens if tok.modality == "vision")
    return round((t * h * w / tokens) ** 0.5)


def patch_box(prompt, layout: PatchLayout, row: int, exact: bool = False) -> list[float]:
    """A patch's box in original-image pixels (rounded to 0.01 for reading, unless ``exact``)."""
    image, _, patch_row, patch_col = layout.cell(row)
    info = prompt.images[image]
    _, h, w = layout.grids[image]
    side_x, side_y = info.width / w, info.height / h  # a patch's size, mapped back by the resize ratio
    box = [patch_col * side_x, patch_row * side_y, (patch_col + 1) * side_x, (patch_row + 1) * side_y]
    return box if exact else [round(v, 2) for v in box]


def pixel_units(prompt, choice, groups: dict, make_unit) -> list:
    """The units of an occlusion run: patches, tokens (their patches), regions, images or groups."""
    from .config import UsageError
    from .units import overlaps, regions

    layout = PatchLayout.of(prompt, merge_size(prompt))
    vision = [tok.index for tok in prompt.tokens if tok.modality == "vision"]
    numbers = token_numbers(prompt)
    if choice.kind == "patch":
        rows = sorted((row for p in vision for row in layout.token_rows(*numbers[p])), key=layout.cell)
        owner = {row: p for p in vision for row in layout.token_rows(*numbers[p])}
        units = []
        for index, row in enumerate(rows):
            image, t, patch_row, patch_col = layout.cell(row)
            label = f"image{image + 1}{f' t{t}' if t else ''} p{patch_row},{patch_col}"
            unit = make_unit(index, "patch", label, [owner[row]])
            unit.patches, unit.box = [row], patch_box(prompt, layout, row)
            units.append(unit)
        return units
    if choice.kind == "groups":
        parts = []
        for group in groups.values():
            outside = [p for p in group.positions if p not in numbers]
            if outside or group.tail is not None:
                raise UsageError(f"--group {group.name}: this stage removes image patches, but the group holds "
                                 f"position {outside[0] if outside else 'answer'}, which is not an image token")
            if len({numbers[p][0] for p in group.positions}) > 1:
                raise UsageError(f"--group {group.name} holds tokens of several images; this stage removes the patches "
                                 "of one image at a time: give one group per image")
            rows = patch_rows(prompt, layout, group.positions)
            if group.box is not None:  # a pixel box: its own patches, finer than the tokens
                rows = [row for row in rows if overlaps(patch_box(prompt, layout, row, exact=True), group.box)]
            parts.append(("group", group.name, group.positions, rows, group.box))
    else:
        size = None if choice.kind == "image" else choice.size if choice.kind == "region" else 1  # token: 1×1
        grouped = regions(prompt, vision, size)
        parts = [(choice.kind, None, keys, patch_rows(prompt, layout, keys), None) for keys in grouped]
    units = []
    for index, (kind, label, keys, rows, box) in enumerate(parts):
        unit = make_unit(index, kind, label, keys)
        unit.patches = rows
        unit.box = box or unit.box
        units.append(unit)
    return units


# --- DeepStack: which route carries a unit's information ---------------------------------------------------------

def deepstack_routes(levels: int, num_layers: int) -> list[tuple[str, int | None]]:
    """The rows of a ``--stage deepstack`` result: each level removed, all of them, then the main embedding."""
    return [("deepstack", level) for level in range(levels)] + [("deepstack", None), ("main", None)]


def route_window(route: tuple[str, int | None], levels: int, num_layers: int) -> tuple[int, int]:
    """The decoder layers a route's removal acts at: after layer ``level``, after layers 0..levels-1, or from the
    first layer on (the main embedding)."""
    kind, level = route
    if kind == "main":
        return (0, num_layers - 1)
    return (level, level) if level is not None else (0, levels - 1)


def route_label(route: tuple[str, int | None]) -> str:
    kind, level = route
    if kind == "main":
        return "main embedding → image mean"
    return f"DeepStack after layer {level}" if level is not None else "all DeepStack levels"


class _Routes:
    """What both DeepStack engines share: each row's main embeddings and DeepStack features."""

    def __init__(self, analysis: Analysis, tf: TeacherForced):
        self.analysis, self.tf = analysis, tf
        vision = [tok for tok in analysis.prompt.tokens if tok.modality == "vision"]
        self.order = {tok.index: n for n, tok in enumerate(vision)}  # position → row among the visual features
        self.images = torch.tensor([tok.image for tok in vision])  # (n_vis,)

    def first_affected(self, unit) -> int:
        return min(unit.keys)

    def rows(self, unit) -> torch.Tensor:
        return torch.tensor([self.order[p] for p in unit.keys])

    def altered(self, route, unit, embeds: torch.Tensor, deepstack: list[torch.Tensor]):
        """``embeds`` (n_vis, H) and ``deepstack`` (per level (n_vis, H)) as ``route`` leaves them for ``unit``."""
        kind, level = route
        rows = self.rows(unit)
        if kind == "main":  # the unit's main embedding replaced by its image's mean (Neo et al.'s mean ablation)
            embeds = embeds.clone()
            for image in self.images[rows].unique():
                mean = embeds[self.images == image].double().mean(0).to(embeds.dtype)
                embeds[rows[self.images[rows] == image]] = mean
            return embeds, deepstack
        deepstack = [features.clone() if level is None or index == level else features
                     for index, features in enumerate(deepstack)]
        for index, features in enumerate(deepstack):
            if level is None or index == level:
                features[rows] = 0.0
        return embeds, deepstack

    @contextlib.contextmanager
    def hooked(self, route, unit):
        """The model, with its vision tower's output altered as ``route`` says for ``unit`` (a forward hook)."""
        def alter(module, args, output):  # pooler_output: (n_vis, H); deepstack_features: per level (n_vis, H)
            output.pooler_output, output.deepstack_features = self.altered(
                route, unit, output.pooler_output, list(output.deepstack_features))
            return output

        hook = self.analysis.loaded.model.model.visual.register_forward_hook(alter)
        try:
            yield
        finally:
            hook.remove()


class DeepStackEngine(_Routes):
    """The decoder from the unit's first position, with the route's features altered per row."""

    def __init__(self, analysis: Analysis, tf: TeacherForced):
        super().__init__(analysis, tf)
        self.fast = FastEngine(analysis, tf)
        self.base_logprobs = self.fast.base_logprobs

    @torch.no_grad()
    def logprobs(self, route, units: list) -> torch.Tensor:
        altered = [self.altered(route, unit, self.fast.image_embeds, self.fast.deepstack_rows) for unit in units]
        embeds = torch.stack([e for e, _ in altered])  # (B, n_vis, H)
        deepstack = [torch.stack([d[level] for _, d in altered]) for level in range(len(self.fast.deepstack_rows))]
        start = min(self.first_affected(unit) for unit in units)
        return self.fast.visual_logprobs(start, embeds, deepstack)


class NaiveDeepStackEngine(_Routes):
    """The oracle: the whole model per unit, the vision tower's output altered by a forward hook."""

    def __init__(self, analysis: Analysis, tf: TeacherForced):
        super().__init__(analysis, tf)
        self.base_logprobs = self._forward(None, None)[0]

    @torch.no_grad()
    def _forward(self, route, unit) -> torch.Tensor:
        loaded = self.analysis.loaded
        inputs = _to(dict(input_ids=self.tf.input_ids, **self.tf.model_kwargs), loaded.device)
        with contextlib.ExitStack() as stack:
            if route is not None:
                stack.enter_context(self.hooked(route, unit))
            with knockout_attention_installed(loaded.adapter.attention_configs()), \
                    apply_plan(self.analysis.plan(reference=True)):
                logits = loaded.model(**inputs).logits  # (1, S, V)
        return F.log_softmax(logits[:, self.tf.answer_positions].float(), dim=-1)  # (1, T, V)

    def logprobs(self, route, units: list) -> torch.Tensor:
        return torch.cat([self._forward(route, unit) for unit in units], dim=0)


# --- the vision encoder: attention knockouts between patches -----------------------------------------------------

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
    visual = loaded.model.model.visual
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


class VisionEncoderEngine(_Patches):
    """ViT knockouts: each ViT layer's input cached once; a batch of knockouts starting at ViT layer ``a`` re-runs
    layers ``a ..`` for its rows (the units' own image only), the mergers, then the decoder from that image's first
    position. A row whose visual features come out unchanged is the baseline row itself."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, units: list):
        super().__init__(analysis, tf, "mean", units)
        self.fast = FastEngine(analysis, tf)
        self.base_logprobs = self.fast.base_logprobs
        visual = analysis.loaded.model.model.visual
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
        visual = self.analysis.loaded.model.model.visual
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


def deepstack_of(features) -> list[torch.Tensor]:
    """The vision tower's DeepStack features, per level (none for a family without DeepStack)."""
    from .families.qwen_vl import deepstack_levels

    return deepstack_levels(features)


class NaiveVisionEncoderEngine(_Patches):
    """The oracle: the whole model per knockout, the ViT attention written out with the plan's blocks."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, units: list):
        super().__init__(analysis, tf, "mean", units)
        self.base_logprobs = self._forward(None)[0]

    @torch.no_grad()
    def _forward(self, plan: VisionPlan | None) -> torch.Tensor:
        loaded = self.analysis.loaded
        inputs = _to(dict(input_ids=self.tf.input_ids, **self.tf.model_kwargs), loaded.device)
        with vit_plan(loaded, plan), knockout_attention_installed(loaded.adapter.attention_configs()), \
                apply_plan(self.analysis.plan(reference=True)):
            logits = loaded.model(**inputs).logits  # (1, S, V)
        return F.log_softmax(logits[:, self.tf.answer_positions].float(), dim=-1)  # (1, T, V)

    def logprobs(self, window: tuple[int, int], units: list) -> torch.Tensor:
        images = range(len(self.layout.grids))
        return torch.cat([self._forward(VisionPlan(range(window[0], window[1] + 1),
                                                   _chunk_keys(self.layout, unit, images), reference=True))
                          for unit in units], dim=0)


# --- how each stage's sweep runs ----------------------------------------------------------------------------------

@dataclass
class StagePlan:
    """A stage's sweep: what its engine gets for each row of the result (a layer window, or a DeepStack route),
    the rows as windows and as names, how to make its engine, and how to generate under one of its cells."""

    rows: list
    windows: list[tuple[int, int]]
    labels: list[str]
    make_engine: object  # (analysis, tf, units) -> engine
    generate: object  # (analysis, engine, row index, unit, knockout, num_tokens) -> token ids


def stage_plan(loaded, config) -> StagePlan:
    """The plan of ``config.stage``; the layer options are checked here, before any work."""
    from .config import UsageError, parse_layers, windows_for
    from .engine import NaiveEngine

    num_layers = loaded.adapter.num_layers
    fast = config.engine == "fast"
    if config.stage not in loaded.adapter.stages:
        why = {"deepstack": " (it has no DeepStack)", "vision-encoder": " (its ViT knockout is not defined for it)"}
        raise UsageError(f"--stage {config.stage} is not available for {loaded.adapter.name} models"
                         f"{why.get(config.stage, '')}; it supports --stage {', '.join(loaded.adapter.stages)}")
    if config.stage == "pixels":  # occlusion has no layers: one row, the whole model
        windows = [(0, num_layers - 1)]
        return StagePlan(windows, windows, [f"occluded ({config.fill})"],
                         lambda analysis, tf, units: (PixelEngine if fast else NaivePixelEngine)(
                             analysis, tf, config.fill, units),
                         lambda analysis, engine, w, unit, knockout, n: analysis.generate(
                             n, pixel_values=engine.occluded(unit))[0])
    if config.stage == "vision-encoder":  # --layers and --window count the vision tower's layers
        depth = len(loaded.model.model.visual.blocks)
        try:
            windows = windows_for(parse_layers(config.layers, depth), config.window, depth)
        except UsageError as error:
            raise UsageError(f"{error} (with --stage vision-encoder, layers are the vision tower's {depth})") from None

        def generate_vit(analysis, engine, w, unit, knockout, n):
            with engine.knocked_out(windows[w], unit):
                return analysis.generate(n)[0]

        return StagePlan(windows, windows, [f"ViT layers {a}–{b}" if a != b else f"ViT layer {a}" for a, b in windows],
                         lambda analysis, tf, units: (VisionEncoderEngine if fast else NaiveVisionEncoderEngine)(
                             analysis, tf, units), generate_vit)
    if config.stage == "deepstack":
        levels = len(loaded.model.config.vision_config.deepstack_visual_indexes)
        routes = deepstack_routes(levels, num_layers)

        def generate_route(analysis, engine, w, unit, knockout, n):
            with engine.hooked(routes[w], unit):
                return analysis.generate(n)[0]

        return StagePlan(routes, [route_window(route, levels, num_layers) for route in routes],
                         [route_label(route) for route in routes],
                         lambda analysis, tf, units: (DeepStackEngine if fast else NaiveDeepStackEngine)(analysis, tf),
                         generate_route)
    windows = windows_for(parse_layers(config.layers, num_layers), config.window, num_layers)
    return StagePlan(windows, windows, [f"layers {a}–{b}" if a != b else f"layer {a}" for a, b in windows],
                     lambda analysis, tf, units: (FastEngine if fast else NaiveEngine)(analysis, tf),
                     lambda analysis, engine, w, unit, knockout, n: analysis.generate(
                         n, analysis.plan(windows[w], [knockout]))[0])
