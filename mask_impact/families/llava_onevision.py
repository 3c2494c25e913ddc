"""LLaVA-OneVision (``llava_onevision``): LLaVA-NeXT's layout, a SigLIP tower, a Qwen2 decoder, pooled tiles.

Decoder inputs as LLaVA-NeXT (``llava_next.py``): projected vision features scattered into the ``<image>``
placeholders, plain 1-D positions, the language model's own masks (Qwen2's sliding layers where it has them); the
features come from ``get_image_features(pixel_values, image_sizes)``, which follows ``config.vision_aspect_ratio``.
Only the decoder stage, and one image per prompt (several images of one prompt are not tiled by the model: each
is padded to a square, one base view and one newline, a layout not reproduced here).

Geometry: LLaVA-NeXT's (``LlavaOnevisionImageProcessor`` resizes and pads exactly as LLaVA-NeXT's, with its own
``image_grid_pinpoints``; the base view is the whole picture squashed to ``size``), plus the one step
``pack_image_features`` adds for images: when the unpadded tile map holds more than ``anyres_max_N`` tiles' worth
of cells (ratio = sqrt(cells / (N · g²)) > 1.1), it is resized with bilinear interpolation to
``int(rows // ratio) × int(cols // ratio)`` before the newlines are appended. (The 2×2 ``apply_pooling`` of the
modeling code acts on video frames only, never on images.) The pooled size is taken from the model's own
``pack_image_features`` run on a dummy map (``layout["out"]``); a pooled token's box is its share of the kept map
around its sample point (``in / out`` cells on each axis), mapped back to original-image pixels like a tile cell.
"""

from __future__ import annotations

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from ..config import UsageError
from . import DecoderAdapter, register
from .llava_next import AnyresLimits, LlavaNext


class PooledAnyresLimits(AnyresLimits):
    """LLaVA-NeXT's arithmetic, with the decoder grid of the tiles as the model's ``pack_image_features`` makes it."""

    def __init__(self, pinpoints: list, tile: int, patch: int, model, vision_aspect_ratio: str):
        super().__init__(pinpoints, tile, patch)
        self.model, self.vision_aspect_ratio = model, vision_aspect_ratio

    def layout(self, width: int, height: int, path: str) -> dict:
        layout = super().layout(width, height, path)
        rows, cols = self.pooled_shape(width, height)
        layout["out"] = [rows, cols if rows else len(layout["cols"])]  # a strip too thin to keep a row: no tiles
        layout["pooled"] = layout["out"] != [len(layout["rows"]), len(layout["cols"])]
        return layout

    def pooled_shape(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of the tiles' part: ``pack_image_features`` on a zero map whose newline is 1."""
        grid = self.tile // self.patch
        views = image_size_to_num_patches((height, width), self.pinpoints, self.tile)
        features = torch.zeros(views, grid * grid, 1)
        packed, _ = self.model.model.pack_image_features([features], torch.tensor([[height, width]]),
                                                         image_newline=torch.ones(1),
                                                         vision_aspect_ratio=self.vision_aspect_ratio)
        tiles = packed[0][grid * grid:, 0]
        rows = int(tiles.sum())
        return rows, tiles.numel() // rows - 1 if rows else 0

    def describe(self, width: int, height: int, new_width: int, new_height: int) -> str:
        text = super().describe(width, height, new_width, new_height)
        layout = self.layout(width, height, "")
        if layout["pooled"]:
            text += (f"; tile map {len(layout['rows'])}×{len(layout['cols'])} cells pooled (bilinear, "
                     f"{self.vision_aspect_ratio}) to {layout['out'][0]}×{layout['out'][1]}")
        return text


@register
class LlavaOnevision(LlavaNext):
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    label = "LLaVA-OneVision"

    def __init__(self, model):
        vision = model.config.vision_config
        strategy = model.config.vision_feature_select_strategy
        has_cls = vision.model_type == "clip_vision_model"
        if strategy != ("default" if has_cls else "full"):
            raise UsageError(f"this llava_onevision checkpoint's vision_feature_select_strategy {strategy!r} does not "
                             f"give one feature per patch of its {vision.model_type} tower; not supported")
        if not str(model.config.vision_aspect_ratio).startswith("anyres_max_"):
            raise UsageError(f"llava_onevision vision_aspect_ratio {model.config.vision_aspect_ratio!r} is not "
                             "supported (only anyres_max_N)")
        DecoderAdapter.__init__(self, model, model.model.language_model)  # Llava's own check is for CLIP only

    def pixel_limits(self, image_processor, min_pixels: int | None, max_pixels: int | None) -> PooledAnyresLimits:
        if min_pixels is not None or max_pixels is not None:
            raise UsageError("--min-pixels/--max-pixels: a llava_onevision processor resizes every image to fixed "
                             "sizes")
        size = image_processor.size
        if (size.get("height"), size.get("width")) != (self.tile, self.tile) or image_processor.do_center_crop:
            raise UsageError(f"this llava_onevision processor's size {dict(size)} differs from the vision tower's "
                             f"{self.tile}×{self.tile} input; only matching sizes are supported")
        pinpoints = [list(p) for p in image_processor.image_grid_pinpoints]
        if pinpoints != [list(p) for p in self.model.config.image_grid_pinpoints]:
            raise UsageError("this llava_onevision processor's image_grid_pinpoints differ from the model's")
        return PooledAnyresLimits(pinpoints, self.tile, self.patch_size, self.model,
                                  self.model.config.vision_aspect_ratio)

    def image_grids(self, model_kwargs: dict, count: int) -> list[list[int]]:
        if count > 1:
            raise UsageError("llava_onevision: one --image per prompt (the model does not tile the images of a "
                             "multi-image prompt; that layout is not supported)")
        return super().image_grids(model_kwargs, count)  # one image: LLaVA-NeXT's views

    def geometry(self) -> str:
        return (super().geometry() + f"; the tiles' map pooled by bilinear interpolation where it exceeds "
                f"{self.model.config.vision_aspect_ratio} (images[].layout.out: its rows × columns; a pooled "
                "token's box is its share of the map)")
