"""Occlusion (``--stage pixels``): the image the model sees, a unit's patches replaced by a fill.

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
The patch layout, the fills and the patch units are shared with the vision-encoder stage (``vit.py``).
"""

from __future__ import annotations

import torch

from ..engine import Analysis, TeacherForced, whole_model_logprobs
from .decoder import FastEngine
from ..patches import PatchLayout
from .base import Engine, StagePlan

FILLS = ("mean", "blur", "black", "noise")


class Filler:
    """What a unit's patches are replaced with, in the processor's normalised units."""

    def __init__(self, loaded, pixel_values: torch.Tensor, layout: PatchLayout, fill: str):
        processor = loaded.processor.image_processor
        self.pixel_values, self.layout, self.fill = pixel_values, layout, fill  # pixel_values: patch rows
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32)  # (C,)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32)
        self.scale = processor.rescale_factor
        self.channels = len(processor.image_mean)
        self.patch = loaded.adapter.patch_size
        self._blurred: dict[int, torch.Tensor] = {}

    def _shaped(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(rows.shape[0], self.channels, -1)  # (n, C, T·P·P)

    def values(self, rows: list[int], seed: int) -> torch.Tensor:
        """(len(rows), D) replacement rows."""
        original = self.pixel_values[rows].float()
        if self.fill == "mean":
            image = self.layout.cell(rows[0])[0]
            pixels = self._shaped(self.pixel_values[list(self.layout.colour_rows(image))].float())
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
        t, h, w = self.layout.grids[image]
        m, p, c = self.layout.merge, self.patch, self.channels
        rows = self.pixel_values[list(self.layout.rows(image))].float()
        layout = self.layout.layout_of(image)
        if layout is not None and "tiles" in layout:  # views: the base view one picture, the tiles another (their
            # padded canvas); a padded square (one view) is blurred as one picture below
            across, down = layout["tiles"]
            views = rows.reshape(t, h, w, c, p, p)
            base = _blurred(views[:1].permute(0, 3, 1, 4, 2, 5).reshape(1, c, h * p, w * p), p)
            canvas = views[1:].reshape(down, across, h, w, c, p, p).permute(4, 0, 2, 5, 1, 3, 6)
            tiles = _blurred(canvas.reshape(1, c, down * h * p, across * w * p), p)
            base = base.reshape(1, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
            tiles = tiles.reshape(c, down, h, p, across, w, p).permute(1, 4, 2, 5, 0, 3, 6)
            tiles = tiles.reshape(t - 1, h, w, c, p, p)
            return torch.cat([base, tiles]).reshape(rows.shape)
        temporal = rows.shape[-1] // (c * p * p)
        # rows: (t, h/m, w/m, m, m) patches of (C, T, P, P) → pictures (t·T, C, h·P, w·P)
        grid = rows.reshape(t, h // m, w // m, m, m, c, temporal, p, p)
        picture = grid.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * temporal, c, h * p, w * p)
        blurred = _blurred(picture, p)
        back = blurred.reshape(t, temporal, c, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return back.reshape(rows.shape)


class Patches(Engine):
    """What the patch-level engines share (occlusion and the vision encoder, ``vit.py``): the patch layout, the fill,
    where each image starts and its tokens lie among the visual features, and the decoder run with one image's
    features replaced."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, fill: str, units: list):
        self.analysis, self.tf = analysis, tf
        loaded = analysis.loaded
        self.grid = loaded.adapter.grid_of(analysis.prompt)
        self.pixel_values = loaded.adapter.patch_rows(tf.model_kwargs["pixel_values"], self.grid)  # (N, D): patches
        self.layout = PatchLayout.of(analysis.prompt, loaded.adapter.patch_merge)
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

    def occluded_rows(self, unit) -> torch.Tensor:
        """(N, D) the patch rows with ``unit``'s filled."""
        rows = self.pixel_values.clone()
        rows[unit.patches] = self.filler.values(unit.patches, self.seeds.get(id(unit), unit.index))
        return rows

    def occluded(self, unit) -> torch.Tensor:
        """The model's ``pixel_values`` with ``unit``'s patches filled."""
        return self.analysis.loaded.adapter.pixel_values_of(self.occluded_rows(unit))


class PixelEngine(Patches):
    """Occlusion through the vision tower, then the decoder from the image's first position."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, fill: str, units: list):
        super().__init__(analysis, tf, fill, units)
        self.fast = FastEngine(analysis, tf)
        self.base_logprobs = self.fast.base_logprobs

    @torch.no_grad()
    def logprobs(self, window, units: list) -> torch.Tensor:
        """(B, T, V) answer log-probs, one row per unit (``window`` is not used: occlusion has no layers)."""
        out = self.base_logprobs[None].expand(len(units), -1, -1).clone()
        adapter, device = self.analysis.loaded.adapter, self.analysis.loaded.device
        for image in sorted({unit.image for unit in units}):
            rows = [i for i, unit in enumerate(units) if unit.image == image]
            images = [self.occluded_rows(units[i])[list(self.layout.rows(image))] for i in rows]  # (n_i, D) each
            original = self.pixel_values[list(self.layout.rows(image))]
            acting = [i for i, pixels in zip(rows, images) if not torch.equal(pixels, original)]
            if not acting:
                continue
            batch = torch.cat([pixels for i, pixels in zip(rows, images) if i in acting]).to(device)
            grid = self.grid[image: image + 1].repeat(len(acting), 1).to(device)
            features = adapter.image_features(batch, grid)
            embeds = torch.stack(features.pooler_output)  # (B', n_tok, H)
            levels = [level.reshape(len(acting), -1, level.shape[-1]) for level in adapter.deepstack_features(features)]
            out[torch.tensor(acting)] = self._decode(image, embeds, levels).to(out.device)
        return out


class NaivePixelEngine(Patches):
    """The oracle: one full forward of the whole model per unit, with the occluded pixels as its input."""

    def __init__(self, analysis: Analysis, tf: TeacherForced, fill: str, units: list):
        super().__init__(analysis, tf, fill, units)
        self.base_logprobs = self._forward(self.analysis.loaded.adapter.pixel_values_of(self.pixel_values))[0]

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return whole_model_logprobs(self.analysis, self.tf, pixel_values=pixel_values)

    def logprobs(self, window, units: list) -> torch.Tensor:
        return torch.cat([self._forward(self.occluded(unit)) for unit in units], dim=0)


def _blurred(picture: torch.Tensor, p: int) -> torch.Tensor:
    """(n, C, H, W) Gaussian-blurred with σ = one patch side, edges reflected (a kernel shorter than the picture)."""
    from torchvision.transforms.functional import gaussian_blur

    kernel = min(4 * p + 1, 2 * ((min(picture.shape[-2:]) - 1) // 2) + 1)
    return gaussian_blur(picture, [kernel, kernel], [float(p), float(p)])


def plan(loaded, config, fast: bool) -> StagePlan:
    """Occlusion has no layers: one row, the whole model."""
    windows = [(0, loaded.adapter.num_layers - 1)]
    return StagePlan(windows, windows, [f"occluded ({config.fill})"],
                     lambda analysis, tf, units: (PixelEngine if fast else NaivePixelEngine)(
                         analysis, tf, config.fill, units),
                     lambda analysis, engine, w, unit, knockout, n: analysis.generate(
                         n, pixel_values=engine.occluded(unit))[0])
