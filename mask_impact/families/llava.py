"""LLaVA-1.5 (``llava``): a CLIP vision tower, a projector, and a Llama-shaped language model.

The decoder is ``model.model.language_model``: its masks are those of its own family (``text_config.model_type``,
e.g. Llama: one causal mask), its positions plain 0..S-1. Layer 0's input: the token embeddings with the projected
CLIP features of ViT layer ``vision_feature_layer`` (the CLS feature dropped, ``vision_feature_select_strategy:
default``) scattered into the ``<image>`` placeholders. No DeepStack.

Geometry: the processor resizes the image so that its shorter side is ``size.shortest_edge`` (the longer one
``int(edge · long / short)``), crops the centre ``crop_size`` square (top and left ``int((side − crop) / 2)``) and
the tower cuts it into ``patch_size`` patches: a fixed grid (24×24 of 14 px in LLaVA-1.5), one decoder token per
patch in row, column order. A token's box is its patch in the resized picture, shifted by the crop and mapped back
by the resize ratio; the strips the crop cuts off belong to no token. ``--min-pixels``/``--max-pixels`` are refused:
the processor's size is fixed.

The vision encoder (``--stage vision-encoder``): CLIP takes one sequence per image (the crop's images a batch), its
CLS token at position 0, then the patches row by row (``vision_sequence``). A knockout blocks every other position
of the image's sequence, CLS included, from the unit's patches; CLS is never a unit and never a blocked key (it has
no decoder token and no pixels of its own), so its own key and value stay as the model computes them. The features
are ``hidden_states[vision_feature_layer]`` (−2: the input of the last block), so only the blocks below it reach the
decoder: ``vision_depth`` counts those, and the blocks after the feature layer, which change nothing, are not rows.
``vision_rerun`` runs the blocks of the window's first on for a batch of copies of one image, takes the feature
layer's states, drops CLS, and projects them as ``get_image_features`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError, bounded
from .base import REGISTRY, DecoderAdapter, LayerInputs, raster_positions, register, rerun_batched


@dataclass
class FixedResize:
    """Shorter side to ``shortest_edge`` (or a fixed ``size``), then the centre ``crop`` (width, height)."""

    shortest_edge: int | None
    size: tuple[int, int] | None  # (width, height) when the processor resizes to a fixed size
    crop: tuple[int, int] | None  # (width, height); None: no crop
    patch: int

    def resized(self, width: int, height: int, path: str) -> tuple[int, int]:
        if self.shortest_edge is None:
            return self.size
        if min(width, height) < 1:
            raise UsageError(f"image {bounded(path)} is empty")
        short, long = sorted((width, height))
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def seen(self, width: int, height: int, path: str) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the part of the resized picture the tower sees."""
        resized_width, resized_height = self.resized(width, height, path)
        if self.crop is None:
            return 0, 0, resized_width, resized_height
        crop_width, crop_height = self.crop
        return int((resized_width - crop_width) / 2.0), int((resized_height - crop_height) / 2.0), crop_width, \
            crop_height

    def describe(self, width: int, height: int, new_width: int, new_height: int) -> str:
        if self.crop is None:
            return f"resized to {new_width}×{new_height}"
        return f"resized to {new_width}×{new_height}, the centre {self.crop[0]}×{self.crop[1]} cropped"

    def tokens(self, width: int, height: int, path: str) -> int:
        _, _, seen_width, seen_height = self.seen(width, height, path)
        return (seen_width // self.patch) * (seen_height // self.patch)

    def processor_kwargs(self) -> dict:
        return {}


@register
class Llava(DecoderAdapter):
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    label = "LLaVA-1.5"
    takes_images = True
    stages = ("decoder", "pixels", "vision-encoder")
    vision_packed = False  # CLIP: one sequence per image, a batch

    def __init__(self, model: nn.Module):
        if model.config.vision_feature_select_strategy != "default":
            raise UsageError("this llava checkpoint keeps the CLS feature (vision_feature_select_strategy: full); "
                             "only the patch grid of LLaVA-1.5 ('default') is supported")
        super().__init__(model, model.model.language_model)

    @classmethod
    def checked_layer_types(cls, model_type: str, text_config) -> list[str]:
        text_family = REGISTRY.get(text_config.model_type)
        if text_family is None or text_family.takes_images:
            raise UsageError(f"llava with a {text_config.model_type!r} language model is not supported")
        return text_family.checked_layer_types(text_config.model_type, text_config)

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        inner = self.model.model
        hidden = inner.get_input_embeddings()(input_ids)  # (1, S, H)
        visual_mask = None
        if model_kwargs.get("pixel_values") is not None:
            features = inner.get_image_features(pixel_values=model_kwargs["pixel_values"], return_dict=True)
            image_embeds = torch.cat(features.pooler_output, dim=0).to(hidden.device, hidden.dtype)
            visual_mask = (input_ids[0] == self.model.config.image_token_id)  # (S,)
            hidden = hidden.masked_scatter(visual_mask[None, :, None].expand_as(hidden), image_embeds)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, S)
        return LayerInputs(hidden, positions, visual_mask)

    # --- the picture as patches: one per token (the pixels stage) ------------------------------------------------

    def patch_rows(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """(n, C, H, W) crops → one row per ``patch_size`` square, row by row (a token's patch), each (C, P, P)."""
        n, c, h, w = pixel_values.shape
        p = self.patch_size
        patches = pixel_values.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (n, h/p, w/p, C, P, P)
        return patches.reshape(n * (h // p) * (w // p), c * p * p)

    def pixel_values_of(self, rows: torch.Tensor) -> torch.Tensor:
        p, size = self.patch_size, self.model.config.vision_config.image_size
        side, channels = size // p, rows.shape[1] // (p * p)
        patches = rows.reshape(-1, side, side, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (n, C, h/p, P, w/p, P)
        return patches.reshape(-1, channels, side * p, side * p)

    def image_features(self, rows: torch.Tensor, grid_thw: torch.Tensor):
        """The tower's projected patch features (``pooler_output``: per image (n_tok, H)) of patch rows."""
        return self.model.model.get_image_features(pixel_values=self.pixel_values_of(rows), return_dict=True)

    # --- the vision tower's layers (the vision-encoder stage) -------------------------------------------------------

    @property
    def vision_tower(self) -> nn.Module:
        """The CLIP vision model: embeddings (CLS + patches), ``pre_layrnorm``, ``encoder.layers``."""
        return self.model.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layers

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def feature_states(self) -> list[int]:
        """The indices into the tower's ``hidden_states`` (0: the input of block 0, i: the output of block i − 1)
        whose states the model takes (``vision_feature_layer``, an index or a list, negative from the end)."""
        chosen = self.model.config.vision_feature_layer
        count = len(self.vision_layers) + 1
        return [index % count for index in ([chosen] if isinstance(chosen, int) else chosen)]

    @property
    def vision_depth(self) -> int:
        """The blocks below the deepest feature layer: those after it change nothing the decoder gets."""
        return max(self.feature_states())

    def vision_depth_note(self) -> str:
        return (f"the vision tower's {self.vision_depth} below its feature layer (vision_feature_layer "
                f"{self.model.config.vision_feature_layer}; the blocks after it change nothing)")

    def vision_sequence(self, grid_thw) -> tuple[int, torch.Tensor]:
        """CLS at position 0, then the patches row by row (the order of ``patch_rows``)."""
        t, h, w = (int(v) for v in grid_thw)
        return 1 + t * h * w, raster_positions(grid_thw, 1, prefix=1)

    def vision_rerun(self, recorded: list[tuple[tuple, dict]], first: int, image: int, rows: range,
                     batch: int, grid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks ``first ..`` up to the feature layer for ``batch`` copies of the image, then what
        ``get_image_features`` does: the feature layer's states (several concatenated, for a list), CLS dropped,
        the projector."""
        return self.projected_views(recorded, first, image, 1, batch), {}

    def projected_views(self, recorded: list[tuple[tuple, dict]], first: int, start: int, views: int,
                        batch: int) -> torch.Tensor:
        """(B · views, g², H): blocks ``first ..`` up to the feature layer over ``batch`` copies of the ``views``
        sequences from ``start`` in the tower's batch (each copy's views one after the other), the feature layer's
        states (several concatenated, for a list), CLS dropped, projected."""
        outputs = rerun_batched(self.vision_layers, recorded, first, start, batch, self.vision_depth, views)

        def state(index: int) -> torch.Tensor:  # hidden_states[index]: block ``index``'s input
            if index <= first:
                args, kwargs = recorded[index]
                hidden = args[0] if args else kwargs["hidden_states"]
                return hidden[start:start + views].repeat(batch, 1, 1)
            return outputs[index - 1 - first]

        selected = torch.cat([state(index)[:, 1:] for index in self.feature_states()], dim=-1)  # CLS dropped
        return self.model.model.multi_modal_projector(selected)

    # --- prompt markup and geometry --------------------------------------------------------------------------------

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    def pixel_limits(self, image_processor, min_pixels: int | None, max_pixels: int | None) -> FixedResize:
        self.fixed_size_only(min_pixels, max_pixels)
        size, crop = image_processor.size, image_processor.crop_size
        crop = (crop["width"], crop["height"]) if image_processor.do_center_crop else None
        if size.get("shortest_edge"):
            return FixedResize(size["shortest_edge"], None, crop, self.patch_size)
        return FixedResize(None, (size["width"], size["height"]), crop, self.patch_size)

    def image_grids(self, model_kwargs: dict, count: int) -> list[list[int]]:
        _, _, height, width = model_kwargs["pixel_values"].shape  # (n, C, H, W)
        return [[1, height // self.patch_size, width // self.patch_size]] * count

    def resized_size(self, grid_thw: list[int], limits: FixedResize, width: int, height: int,
                     path: str) -> tuple[int, int]:
        seen = limits.seen(width, height, path)
        if (seen[2], seen[3]) != (grid_thw[2] * self.patch_size, grid_thw[1] * self.patch_size):
            raise RuntimeError(f"the processor cropped {path} differently from its size and crop_size")
        return limits.resized(width, height, path)

    def tokens_per_image(self, grid_thw: list[int]) -> int:
        return grid_thw[1] * grid_thw[2]

    def crop(self, grid_thw: list[int], resized_width: int, resized_height: int) -> list[int]:
        """The centre crop of the resized picture, as the processor cuts it (top and left ``int((side − crop) / 2)``)."""
        width, height = grid_thw[2] * self.patch_size, grid_thw[1] * self.patch_size
        return [int((resized_width - width) / 2.0), int((resized_height - height) / 2.0), width, height]

    def token_cell(self, image, n: int) -> tuple[int, int, int, list[float]]:
        row, col = divmod(n, image.grid_thw[2])
        left, top = image.crop[:2]
        sx, sy = image.width / image.resized_width, image.height / image.resized_height
        p = self.patch_size
        box = [round((left + col * p) * sx, 2), round((top + row * p) * sy, 2),
               round((left + (col + 1) * p) * sx, 2), round((top + (row + 1) * p) * sy, 2)]
        return 0, row, col, box

    def geometry(self) -> str:
        p = self.patch_size
        return (f"fixed grid: the shorter side resized, the centre cropped, one token per {p}×{p} patch of the crop, "
                "ordered row, column; the cropped-off strips have no token")
