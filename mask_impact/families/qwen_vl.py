"""Qwen vision-language families: Qwen3-VL (and its MoE), Qwen2.5-VL, Qwen2-VL.

All three keep the decoder at ``model.model.language_model`` and the vision tower at ``model.model.visual``,
scatter the tower's merged features into the image placeholder positions, and give image tokens (t, row, col)
MRoPE positions (``get_rope_index``, from the processor's ``mm_token_type_ids``). Every decoder layer gets the
mask of ``config.layer_types[i]`` for Qwen2-VL/Qwen2.5-VL (``use_sliding_window`` checkpoints slide), one causal
mask for Qwen3-VL.

Differences:

- Qwen3-VL adds DeepStack: features of ViT blocks ``deepstack_visual_indexes`` added at the image positions after
  decoder layers 0, 1, 2 (``--stage deepstack``). Qwen2-VL and Qwen2.5-VL have none.
- Qwen2.5-VL's ViT attends within windows on most blocks (patches reordered into windows, ``fullatt_block_indexes``
  global); the reorder is undone after the merger, so its decoder tokens come in the same order as the others', but
  the ViT knockout (``--stage vision-encoder``, which names patches by their place in each image's sequence) is
  refused for it.

Geometry (``token_cell``): an image of ``grid_thw = (t, h, w)`` patches becomes ``t·h·w / merge²`` decoder tokens,
ordered t, row, column over the merged grid; one token covers ``patch_size · merge_size`` pixels square of the
resized image, mapped back to the original picture by the resize ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from ..errors import UsageError, bounded, mention
from .base import DecoderAdapter, LayerInputs, all_full, declared_types, register


@dataclass
class PixelLimits:
    """The resolution the model sees: the processor resizes every image into [min_pixels, max_pixels]."""

    min_pixels: int
    max_pixels: int
    factor: int  # sides are multiples of this (patch size × merge size)

    def resized(self, width: int, height: int, path: str) -> tuple[int, int]:
        try:
            new_height, new_width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        except ValueError as error:
            raise UsageError(f"image {bounded(path)} cannot be given to the model: {error}") from None
        return new_width, new_height

    def describe(self, width: int, height: int, new_width: int, new_height: int) -> str:
        if (new_width, new_height) == (width, height):
            return "kept"
        if width * height > self.max_pixels and new_width * new_height < width * height:
            return f"downscaled to fit max_pixels {self.max_pixels:,}"
        if width * height < self.min_pixels and new_width * new_height > width * height:
            return f"upscaled to reach min_pixels {self.min_pixels:,}"
        return f"rounded to multiples of {self.factor} pixels"

    def tokens(self, width: int, height: int, path: str) -> int:
        """Decoder tokens of an image of this size (one per ``factor``² pixels of the resized image)."""
        new_width, new_height = self.resized(width, height, path)
        return new_width * new_height // self.factor ** 2

    def processor_kwargs(self) -> dict:
        return {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}


def deepstack_levels(features) -> list[torch.Tensor]:
    """``get_image_features(...).deepstack_features`` as one ``(n_vis, H)`` tensor per level, every image's rows in
    order. transformers 5.17 returns a tensor per level; later 5.x releases (5.25) a tuple per level, split by image
    (DESIGN.md §8). Empty for a family without DeepStack."""
    return [torch.cat(list(level)) if isinstance(level, (tuple, list)) else level
            for level in (getattr(features, "deepstack_features", None) or [])]


class QwenVL(DecoderAdapter):
    takes_images = True
    stages = ("decoder", "vision-encoder", "pixels")

    def __init__(self, model: nn.Module):
        super().__init__(model, model.model.language_model)

    # --- the decoder's inputs --------------------------------------------------------------------------------------

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        inner = self.model.model
        hidden = inner.get_input_embeddings()(input_ids)  # (1, S, H)
        grid = model_kwargs.get("image_grid_thw")
        visual_mask, deepstack = None, []
        if model_kwargs.get("pixel_values") is not None:
            features = self.image_features(model_kwargs["pixel_values"], grid)
            image_embeds = torch.cat(features.pooler_output, dim=0).to(hidden.device, hidden.dtype)
            visual_mask = (input_ids[0] == self.model.config.image_token_id)  # (S,)
            hidden = hidden.masked_scatter(visual_mask[None, :, None].expand_as(hidden), image_embeds)
            deepstack = deepstack_levels(features)
        rope_position_ids, _ = inner.get_rope_index(
            input_ids, mm_token_type_ids=model_kwargs["mm_token_type_ids"], image_grid_thw=grid
        )  # (3, 1, S)
        return LayerInputs(hidden, rope_position_ids, visual_mask, deepstack)

    # --- the vision tower (the pixels, vision-encoder and deepstack stages reach it only through these) ------------

    @property
    def vision_tower(self) -> nn.Module:
        """The ViT with its patch embedding, blocks (``blocks``), merger and DeepStack mergers."""
        return self.model.model.visual

    @property
    def patch_merge(self) -> int:
        return self.merge_size

    @property
    def deepstack_levels(self) -> int:
        """DeepStack features added to the decoder (after layers 0 .. levels - 1); 0 without DeepStack."""
        return len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ())

    def deepstack_features(self, features) -> list[torch.Tensor]:
        return deepstack_levels(features)

    def image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """The tower's output for ``pixel_values`` (``pooler_output``: per image (n_tok, H); Qwen3-VL also
        ``deepstack_features``), as the model's forward gets it."""
        return self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)

    def vision_rerun(self, recorded: list[tuple[tuple, dict]], first: int, image: int, rows: range,
                     batch: int, grid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The packed tower: the image's rows of block ``first``'s recorded input (and of its rotary cos, sin),
        ``batch`` copies stacked into one sequence (``cu_seqlens`` one chunk; the plan splits it per copy), blocks
        ``first ..``, the merger, and the DeepStack mergers of the blocks from ``first`` on."""
        visual = self.vision_tower
        args, kwargs = recorded[first]
        kwargs = dict(kwargs)
        hidden = (args[0] if args else kwargs.pop("hidden_states"))[rows.start: rows.stop].repeat(batch, 1)  # (B·n, D)
        cos, sin = kwargs["position_embeddings"]
        kwargs.update(position_embeddings=(cos[rows.start: rows.stop].repeat(batch, 1),
                                           sin[rows.start: rows.stop].repeat(batch, 1)),
                      cu_seqlens=torch.tensor([0, batch * len(rows)], dtype=torch.int32, device=hidden.device),
                      max_seqlen=batch * len(rows))
        indexes = list(getattr(visual, "deepstack_visual_indexes", None) or ())
        levels = {}
        for index in range(first, self.vision_depth):
            hidden = self.vision_layers[index](hidden, **kwargs)
            if index in indexes:
                level = indexes.index(index)
                merged = visual.deepstack_merger_list[level](hidden)
                levels[level] = merged.reshape(batch, -1, merged.shape[-1])
        embeds = visual.merger(hidden)
        return embeds.reshape(batch, -1, embeds.shape[-1]), levels

    # --- prompt markup and geometry --------------------------------------------------------------------------------

    def image_markup(self, tokenizer) -> str:
        """One image's placeholder in a raw prompt (the processor expands the pad token to the image's tokens)."""
        config = self.model.config
        start, pad, end = (tokenizer.convert_ids_to_tokens(i) for i in (
            config.vision_start_token_id, config.image_token_id, config.vision_end_token_id))
        return start + pad + end

    def pixel_limits(self, image_processor, min_pixels: int | None, max_pixels: int | None) -> PixelLimits:
        """The processor resizes every image to sides that are multiples of ``cell_pixels``, its area within
        [min_pixels, max_pixels] (``smart_resize``); the options replace the processor's bounds."""
        size = image_processor.size
        limits = PixelLimits(min_pixels or size["shortest_edge"], max_pixels or size["longest_edge"], self.cell_pixels)
        if limits.min_pixels > limits.max_pixels:
            if min_pixels is None:
                raise UsageError(f"{mention('max_pixels', limits.max_pixels, shown=f'{limits.max_pixels:,}')} is "
                                 f"below the processor's minimum of {limits.min_pixels:,} pixels; raise it, or lower "
                                 f"{mention('min_pixels')} too")
            raise UsageError(f"{mention('min_pixels', limits.min_pixels, shown=f'{limits.min_pixels:,}')} is larger "
                             f"than the maximum of {limits.max_pixels:,} pixels; lower it or raise "
                             f"{mention('max_pixels')}")
        return limits

    def image_grids(self, model_kwargs: dict, count: int) -> list[list[int]]:
        """Each image's (t, h, w) in patches, as the processor reports it."""
        return model_kwargs["image_grid_thw"].tolist()

    def resized_size(self, grid_thw: list[int], limits: PixelLimits, width: int, height: int,
                     path: str) -> tuple[int, int]:
        """The size the processor resized the image to (width, height), read from its grid and checked."""
        resized = grid_thw[2] * self.patch_size, grid_thw[1] * self.patch_size
        if resized != limits.resized(width, height, path):
            raise RuntimeError(f"the processor resized {path} differently from smart_resize")  # a transformers change
        return resized

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    @property
    def cell_pixels(self) -> int:
        """The side, in pixels of the resized image, of the square one decoder token covers."""
        return self.patch_size * self.merge_size

    def tokens_per_image(self, grid_thw: list[int]) -> int:
        t, h, w = grid_thw
        return t * h * w // (self.merge_size * self.merge_size)

    def token_cell(self, image, n: int) -> tuple[int, int, int, list[float]]:
        """(t, row, col, box) of ``image``'s ``n``-th decoder token: its merged-grid cell and its box
        ``[x0, y0, x1, y1]`` in original-image pixels (``image`` is an ``inputs.ImageInfo``)."""
        grid_h, grid_w = image.grid_thw[1] // self.merge_size, image.grid_thw[2] // self.merge_size
        t, rest = divmod(n, grid_h * grid_w)
        row, col = divmod(rest, grid_w)
        cell = self.cell_pixels
        sx, sy = image.width / image.resized_width, image.height / image.resized_height
        box = [round(col * cell * sx, 2), round(row * cell * sy, 2),
               round((col + 1) * cell * sx, 2), round((row + 1) * cell * sy, 2)]
        return t, row, col, box

    def geometry(self) -> str:
        """How vision tokens map to pixels, for the result's ``meta``."""
        return (f"merged grid: one token per {self.cell_pixels}×{self.cell_pixels} pixels of the resized image, "
                "ordered t, row, column")


@register
class Qwen3VL(QwenVL):
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    label = "Qwen3-VL (and MoE)"
    stages = ("decoder", "vision-encoder", "pixels", "deepstack")
    layer_type_rule = staticmethod(all_full)  # Qwen3VLTextModel: create_causal_mask for every layer

    @classmethod
    def class_name(cls, model_type: str) -> str:
        return "Qwen3VLMoeForConditionalGeneration" if model_type == "qwen3_vl_moe" else \
            "Qwen3VLForConditionalGeneration"


@register
class Qwen2VL(QwenVL):
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    label = "Qwen2-VL"
    layer_type_rule = staticmethod(declared_types)


@register
class Qwen25VL(QwenVL):
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    label = "Qwen2.5-VL"
    stages = ("decoder", "pixels")
    stage_notes = {"vision-encoder": "its ViT attends within windows of reordered patches on every block but "
                                     "fullatt_block_indexes, which the ViT knockout does not handle"}
    layer_type_rule = staticmethod(declared_types)
