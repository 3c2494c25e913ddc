"""LLaVA-OneVision (``llava_onevision``): LLaVA-NeXT's layout, a SigLIP tower, a Qwen2 decoder, pooled tiles.

Decoder inputs as LLaVA-NeXT (``llava_next.py``): projected vision features scattered into the ``<image>``
placeholders, plain 1-D positions, the language model's own masks (Qwen2's sliding layers where it has them); the
features come from ``get_image_features(pixel_values, image_sizes)``, which follows ``config.vision_aspect_ratio``.
The decoder stage and occlusion (``--stage pixels``, LLaVA-NeXT's hooks: a pooled tile token's patches are the
cells its bilinear sample reads with a weight above zero, ``llava_next.bilinear_taps``); not the ViT knockout (NeXT's
tower hooks are CLIP's, with a CLS token first in each view); images, not videos.

Geometry: LLaVA-NeXT's (``LlavaOnevisionImageProcessor`` resizes and pads exactly as LLaVA-NeXT's, with its own
``image_grid_pinpoints``; the base view is the whole picture squashed to ``size``), plus the one step
``pack_image_features`` adds for images: when the unpadded tile map holds more than ``anyres_max_N`` tiles' worth
of cells (ratio = sqrt(cells / (N · g²)) > 1.1), it is resized with bilinear interpolation to
``int(rows // ratio) × int(cols // ratio)`` before the newlines are appended. (The 2×2 ``apply_pooling`` of the
modeling code acts on video frames only, never on images.) The pooled size is taken from the model's own
``pack_image_features`` run on a dummy map (``layout["out"]``); a pooled token's box is its share of the kept map
around its sample point (``in / out`` cells on each axis), mapped back to original-image pixels like a tile cell.

Several images in one prompt: the processor, given one prompt's images as one list (``batch_num_images = [n]``, as
``apply_chat_template`` passes them), tiles none of them. ``_preprocess`` pads each picture to a square of its
longer side (``pad_to_square``: left/top ``(side − w) // 2``, filled with the mean colour) and resizes that to the
tower's input: one view (``image_sizes`` keeps the original size). ``get_image_features(..., batch_num_images)``
then takes one view per image, and ``pack_image_features`` appends one image newline to its g×g features; the
processor inserts ``num_image_tokens + 1`` placeholders. So an image's tokens are its g×g patches of the square, row
by row (``part = "base"``, or ``"padding"`` with no box for a patch wholly in the padding), then one newline
(``row = g − 1``, no column, no box); ``layout`` records ``square`` (the side, in original pixels) and ``offset``.
(Called with a flat list, the processor would tile every image on its own, as for one image; the tool follows the
chat template.)
"""

from __future__ import annotations

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from ..errors import UsageError, bounded
from .base import DecoderAdapter, register
from .llava_next import AnyresLimits, LlavaNext, layout_tokens


class SquareLimits:
    """An image of a multi-image prompt: padded to a square, squashed to the tower's ``tile``; nothing to set."""

    def __init__(self, tile: int, patch: int):
        self.tile, self.patch = tile, patch

    def layout(self, width: int, height: int, path: str) -> dict:
        if min(width, height) < 1:
            raise UsageError(f"image {bounded(path)} is empty")
        side = max(width, height)
        return {"base_grid": self.tile // self.patch, "patch": self.patch, "square": side,
                "offset": [(side - width) // 2, (side - height) // 2]}

    def resized(self, width: int, height: int, path: str) -> tuple[int, int]:
        return self.tile, self.tile

    def tokens(self, width: int, height: int, path: str) -> int:
        return layout_tokens(self.layout(width, height, path))

    def describe(self, width: int, height: int, new_width: int, new_height: int) -> str:
        side = max(width, height)
        return (f"one of several images: padded to a {side}×{side} square, resized to {new_width}×{new_height} "
                "(one view, no tiles)")

    def processor_kwargs(self) -> dict:
        return {}


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
    # occlusion through LLaVA-NeXT's hooks (a pooled tile token's patches: the cells its bilinear sample reads); no ViT
    # knockout: LLaVA-NeXT's tower hooks are CLIP's (a CLS token first in each view), OneVision's tower is SigLIP's
    stages = ("decoder", "pixels")
    stage_notes = {"vision-encoder": "its SigLIP tower's views are not yet laid out as knockout sequences"}

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
        self.fixed_size_only(min_pixels, max_pixels, "fixed sizes")
        size = image_processor.size
        if (size.get("height"), size.get("width")) != (self.tile, self.tile) or image_processor.do_center_crop:
            raise UsageError(f"this llava_onevision processor's size {dict(size)} differs from the vision tower's "
                             f"{self.tile}×{self.tile} input; only matching sizes are supported")
        pinpoints = [list(p) for p in image_processor.image_grid_pinpoints]
        if pinpoints != [list(p) for p in self.model.config.image_grid_pinpoints]:
            raise UsageError("this llava_onevision processor's image_grid_pinpoints differ from the model's")
        return PooledAnyresLimits(pinpoints, self.tile, self.patch_size, self.model,
                                  self.model.config.vision_aspect_ratio)

    def prompt_limits(self, limits: PooledAnyresLimits, images: int) -> PooledAnyresLimits | SquareLimits:
        if images > 1 and self.model.config.vision_feature_select_strategy != "full":
            raise UsageError("llava_onevision: several images in one prompt are supported for a SigLIP tower "
                             "(vision_feature_select_strategy 'full') only")
        return SquareLimits(self.tile, self.patch_size) if images > 1 else limits

    def processor_images(self, images: list) -> list:
        return [images] if len(images) > 1 else images  # one prompt's images: batch_num_images = [n]

    def model_inputs(self, encoded) -> dict:
        inputs = super().model_inputs(encoded)
        counts = encoded.get("batch_num_images")
        if counts is not None and int(counts.max()) > 1:  # one image: the model's default, left out
            inputs["batch_num_images"] = counts
        return inputs

    def feature_kwargs(self, model_kwargs: dict) -> dict:
        return {"batch_num_images": model_kwargs["batch_num_images"]} if "batch_num_images" in model_kwargs else {}

    def patch_rows(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """LLaVA-NeXT's rows; several images of one prompt are one view each (a (images, 1, C, H, W) tensor)."""
        if pixel_values.dim() == 5 and pixel_values.shape[1] == 1:
            pixel_values = pixel_values[:, 0]
        return super().patch_rows(pixel_values, grid)

    def image_features(self, rows: torch.Tensor, grid: torch.Tensor):
        """LLaVA-NeXT's, for the patch rows of whole images whose original sizes are ``grid`` (images, 2). Rows of
        one view per image are images of a prompt with several (a single image has its base view and at least one
        tile): the model packs those without tiles when ``batch_num_images`` counts more than one image a sample, so
        a lone one is run beside a copy of itself and its copy's features dropped."""
        views = rows.shape[0] // (self.tile // self.patch_size) ** 2
        if views != len(grid):
            return super().image_features(rows, grid)
        if views == 1:
            features = self.image_features(torch.cat([rows, rows]), grid.repeat(2, 1))
            features.pooler_output = features.pooler_output[:1]
            return features
        return self.model.model.get_image_features(pixel_values=self.pixel_values_of(rows), image_sizes=grid,
                                                   batch_num_images=torch.tensor([views]), return_dict=True)

    def image_grids(self, model_kwargs: dict, count: int) -> list[list[int]]:
        if count > 1:  # one view per image
            grid = self.tile // self.patch_size
            return [[1, grid, grid]] * count
        return super().image_grids(model_kwargs, count)  # one image: LLaVA-NeXT's views

    def resized_size(self, grid_thw: list[int], limits, width: int, height: int, path: str) -> tuple[int, int]:
        if isinstance(limits, SquareLimits):
            return limits.resized(width, height, path)
        return super().resized_size(grid_thw, limits, width, height, path)

    def geometry(self) -> str:
        return (super().geometry() + f"; the tiles' map pooled by bilinear interpolation where it exceeds "
                f"{self.model.config.vision_aspect_ratio} (images[].layout.out: its rows × columns; a pooled "
                "token's box is its share of the map); in a prompt with several images, each image one view only: "
                "padded to a square (images[].layout.square, offset), its patches (part 'padding': wholly in the "
                "padding, no box), then one newline")
