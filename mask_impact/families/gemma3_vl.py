"""Gemma 3 with images (``gemma3``, ``Gemma3ForConditionalGeneration``): a SigLIP tower, an average-pooling
projector, and the Gemma 3 text decoder with its own masks, bidirectional inside each image.

Layer 0's input, as ``Gemma3Model.forward`` makes it: the token embeddings (scaled by √hidden inside
``embed_tokens``; an image token id outside the vocabulary is looked up as 0, as the model does), with the image
features scattered into the image soft tokens. The features are the tower's last hidden state, average-pooled by
``Gemma3MultiModalProjector`` from its P×P patches to ``mm_tokens_per_image`` = s×s tokens, RMS-normed and projected
(not scaled by √hidden). Positions are plain 0..S-1; each layer gets the rotary embedding of its type (a local and a
global base, as Gemma 3 text).

Masks (transformers 5.17, ``create_masks_for_vision_model``): the processor's ``token_type_ids`` are 1 exactly at
the image soft tokens; every maximal run of them is one block (``get_block_sequence_ids_for_mask``: one image, its
boi/eoi tokens outside it). Full layers: causal OR same block. Sliding layers: sliding window AND (causal OR same
block), the window being ``kv > q − W``: a token sees every later token of its image, and the earlier ones within
the window. So the tokens of one image attend to each other both ways in every layer. The adapter builds the masks
with the model's own functions from the image positions; the analysis always knows the blocks (``first_affected``:
an image token's knockout can change the earlier tokens of its image) and lays the knockout over these masks
without adding blocks of its own. ``--vision-attention`` therefore does not apply: both values measure the model.

Logits: ``lm_head(norm(h))``. ``Gemma3ForConditionalGeneration`` applies no final-logit soft-capping, even where
the text config sets ``final_logit_softcapping`` (only ``Gemma3ForCausalLM`` does); the released checkpoints set
none. Attention-score soft-capping is not applied by Gemma 3's attention either.

Geometry: the processor resizes the whole picture to its ``size`` (the tower's square ``image_size``), no crop;
token (r, c) of the pooled s×s grid covers k×k patches (k = P / s), i.e. a (k·patch)-pixel square of the resized
picture, mapped back by the resize ratio. Occlusion (``--stage pixels``) fills exactly those k×k patches: the adapter
gives the square as patch rows in the Qwen order (``patch_rows``: token by token, its k×k patches inside,
``patch_merge`` = k), their inverse (``pixel_values_of``) and the tower's features of such rows (``image_features``).
Pan-and-scan (extra crops, each its own block) is refused, as are ``--min-pixels``/``--max-pixels`` (the size is
fixed) and a pooling that does not tile the patch grid evenly.

The vision encoder (``--stage vision-encoder``): SigLIP takes one sequence per image (a batch), no CLS, its patches
row by row over the whole square; a patch row (token by token, k×k inside) sits at its raster position there
(``vision_sequence``). Every block reaches the features (the last hidden state, post-layernormed, pooled and
projected), so every block is a row. ``vision_rerun`` runs the blocks of the window's first on for a batch of copies
of one image, then ``post_layernorm`` and the projector, as ``get_image_features`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from ..errors import UsageError
from .base import DecoderAdapter, LayerInputs, declared_types, raster_positions, register, rerun_batched
from .gemma import Gemma3Text
from .llava import FixedResize


@dataclass
class SquareResize(FixedResize):
    """The whole picture squashed to the processor's fixed size; ``per_image`` decoder tokens whatever its size."""

    per_image: int = 0

    def tokens(self, width: int, height: int, path: str) -> int:
        return self.per_image

    def describe(self, width: int, height: int, new_width: int, new_height: int) -> str:
        return f"resized to {new_width}×{new_height} (the whole picture, no crop)"


@register
class Gemma3Vision(DecoderAdapter):
    model_types = ("gemma3",)
    model_class = "Gemma3ForConditionalGeneration"
    label = "Gemma 3 (images)"
    takes_images = True
    stages = ("decoder", "pixels", "vision-encoder")
    bidirectional_images = True
    vision_packed = False  # SigLIP: one sequence per image, a batch
    layer_type_rule = staticmethod(declared_types)
    position_embeddings = Gemma3Text.position_embeddings
    rotary = Gemma3Text.rotary

    def __init__(self, model: nn.Module):
        projector = model.model.multi_modal_projector
        if projector.tokens_per_side ** 2 != model.config.mm_tokens_per_image or \
                projector.kernel_size * projector.tokens_per_side != projector.patches_per_image:
            raise UsageError(f"this gemma3 checkpoint pools its {projector.patches_per_image}² patches into "
                             f"{model.config.mm_tokens_per_image} tokens unevenly; only an even pooling is supported")
        super().__init__(model, model.model.language_model)

    # --- the decoder's inputs and masks ----------------------------------------------------------------------------

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        inner, config = self.model.model, self.model.config
        visual_mask = input_ids[0] == config.image_token_id  # (S,)
        self._check_token_types(visual_mask, model_kwargs.get("token_type_ids"))
        lookup = input_ids if config.image_token_id < inner.vocab_size else input_ids.masked_fill(visual_mask[None], 0)
        hidden = inner.get_input_embeddings()(lookup)  # (1, S, H), scaled inside embed_tokens
        if model_kwargs.get("pixel_values") is not None:
            features = inner.get_image_features(model_kwargs["pixel_values"], return_dict=True).pooler_output
            features = features.to(hidden.device, hidden.dtype)  # (n_images, s², H)
            hidden = hidden.masked_scatter(visual_mask[None, :, None].expand_as(hidden), features)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, S)
        return LayerInputs(hidden, positions, visual_mask if bool(visual_mask.any()) else None)

    @staticmethod
    def _check_token_types(visual_mask: torch.Tensor, token_type_ids: torch.Tensor | None) -> None:
        """The model's masks follow ``token_type_ids``, ours the image positions: they must say the same (the
        processor sets 1 exactly at the image tokens; positions past the given types count as text)."""
        types = torch.zeros_like(visual_mask) if token_type_ids is None else token_type_ids[0] == 1
        length = types.shape[0]
        if not (torch.equal(types, visual_mask[:length].to(types.device)) and not visual_mask[length:].any()):
            raise RuntimeError("token_type_ids do not mark exactly the image tokens; build the inputs with the "
                               "model's processor")

    def layer_masks(self, hidden: torch.Tensor, visual_mask: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """``create_masks_for_vision_model`` with the blocks of ``get_block_sequence_ids_for_mask``, as
        ``Gemma3Model.forward`` builds them from ``token_type_ids`` (1 at the image positions ``visual_mask``)."""
        types = torch.zeros(1, hidden.shape[1], dtype=torch.long, device=hidden.device)
        if visual_mask is not None:
            types[0, visual_mask.to(hidden.device)] = 1
        blocks = get_block_sequence_ids_for_mask(types, device=hidden.device)  # (1, S): image run index, -1 elsewhere
        # by position: transformers 5.17 names the cache argument past_key_values, later 5.x (5.25) cache
        built = create_masks_for_vision_model(self.decoder.config, hidden, None, None, None, blocks)
        return [built[kind] for kind in self.layer_types]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``Gemma3ForConditionalGeneration.forward``: the head on the normed state, no soft-capping."""
        return self.lm_head(self.norm(hidden))

    # --- the picture as patches: k×k per token (the pixels stage) ------------------------------------------------

    @property
    def patch_merge(self) -> int:
        """Patches per side of one decoder token: the projector's pooling kernel k."""
        return self.model.model.multi_modal_projector.kernel_size

    def patch_rows(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """(n, C, H, W) squares → one row per ``patch_size`` square, ordered image, token (row, column of the pooled
        s×s grid), then the k×k patches the token pools (row by row), each (C, P, P) flattened: the order of the Qwen
        processors' rows, so a token's rows are k² consecutive ones (``patches.PatchLayout`` with merge k)."""
        n, c, h, w = pixel_values.shape
        p, k = self.patch_size, self.patch_merge
        down, across = h // (k * p), w // (k * p)
        blocks = pixel_values.reshape(n, c, down, k, p, across, k, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        return blocks.reshape(n * down * across * k * k, c * p * p)  # (n, s, s, k, k, C, P, P) flattened

    def pixel_values_of(self, rows: torch.Tensor) -> torch.Tensor:
        """``patch_rows`` undone: (n, C, H, W) squares of the tower's ``image_size``."""
        p, k, s = self.patch_size, self.patch_merge, self.tokens_per_side
        channels = rows.shape[1] // (p * p)
        blocks = rows.reshape(-1, s, s, k, k, channels, p, p).permute(0, 5, 1, 3, 6, 2, 4, 7)  # (n, C, s, k, P, s, k, P)
        return blocks.reshape(-1, channels, s * k * p, s * k * p)

    def image_features(self, rows: torch.Tensor, grid_thw: torch.Tensor):
        """The tower's pooled, projected features of patch rows of whole images, ``pooler_output`` per image (s², H)
        as the other families give it (the model returns one (n, s², H) tensor)."""
        features = self.model.model.get_image_features(self.pixel_values_of(rows), return_dict=True)
        features.pooler_output = tuple(features.pooler_output)
        return features

    # --- the vision tower's layers (the vision-encoder stage) -------------------------------------------------------

    @property
    def vision_tower(self) -> nn.Module:
        """The SigLIP vision model: embeddings (patches only), ``encoder.layers``, ``post_layernorm``."""
        return self.model.model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.encoder.layers

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def vision_sequence(self, grid_thw) -> tuple[int, torch.Tensor]:
        """No CLS; the square's patches row by row: a patch row (token, then k×k) at its raster position."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w, raster_positions(grid_thw, self.patch_merge)

    def vision_rerun(self, recorded: list[tuple[tuple, dict]], first: int, image: int, rows: range,
                     batch: int, grid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks ``first ..`` for ``batch`` copies of the image, then ``get_image_features``: the post-layernorm,
        the projector's pooling, norm and projection."""
        hidden = rerun_batched(self.vision_layers, recorded, first, image, batch, self.vision_depth)[-1]
        return self.model.model.multi_modal_projector(self.vision_tower.post_layernorm(hidden)), {}

    # --- prompt markup and geometry --------------------------------------------------------------------------------

    def image_placeholder(self, tokenizer) -> str:
        """The boi token: ``Gemma3Processor`` expands it to ``\\n\\n<boi>`` + s² image tokens + ``<eoi>\\n\\n``."""
        return tokenizer.boi_token

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def cell(self) -> int:
        """Pixels of the resized picture on each side of one decoder token: k patches."""
        return self.model.model.multi_modal_projector.kernel_size * self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return self.model.model.multi_modal_projector.tokens_per_side

    def pixel_limits(self, image_processor, min_pixels: int | None, max_pixels: int | None) -> SquareResize:
        self.fixed_size_only(min_pixels, max_pixels)
        if getattr(image_processor, "do_pan_and_scan", None):
            raise UsageError("this gemma3 processor has do_pan_and_scan on (extra crops per image); only the whole "
                             "picture is supported: set do_pan_and_scan to false in preprocessor_config.json")
        size = image_processor.size
        return SquareResize(None, (size["width"], size["height"]), None, self.patch_size,
                            self.model.config.mm_tokens_per_image)

    def image_grids(self, model_kwargs: dict, count: int) -> list[list[int]]:
        _, _, height, width = model_kwargs["pixel_values"].shape  # (n, C, H, W)
        return [[1, height // self.patch_size, width // self.patch_size]] * count

    def resized_size(self, grid_thw: list[int], limits: SquareResize, width: int, height: int,
                     path: str) -> tuple[int, int]:
        side = self.tokens_per_side * self.cell
        seen = (grid_thw[2] * self.patch_size, grid_thw[1] * self.patch_size)
        if seen != (side, side) or tuple(limits.size) != (side, side):
            raise RuntimeError(f"the processor resized {path} to {seen[0]}×{seen[1]} (its size: {limits.size}), not "
                               f"the tower's {side}×{side}")
        return limits.size

    def tokens_per_image(self, grid_thw: list[int]) -> int:
        return self.model.config.mm_tokens_per_image

    def token_cell(self, image, n: int) -> tuple[int, int, int, list[float]]:
        row, col = divmod(n, self.tokens_per_side)
        sx, sy = image.width / image.resized_width, image.height / image.resized_height
        c = self.cell
        return 0, row, col, [round(col * c * sx, 2), round(row * c * sy, 2), round((col + 1) * c * sx, 2),
                             round((row + 1) * c * sy, 2)]

    def geometry(self) -> str:
        side, c = self.tokens_per_side, self.cell
        k = self.model.model.multi_modal_projector.kernel_size
        return (f"fixed grid: the whole picture resized to {side * c}×{side * c} (no crop), its {self.patch_size}-px "
                f"patches average-pooled {k}×{k} into {side}×{side} tokens of {c}×{c} pixels, ordered row, column; "
                "the tokens of one image attend to each other both ways in every decoder layer (the model's masks)")
