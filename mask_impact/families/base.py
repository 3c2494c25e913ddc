"""The adapter base class and the registry of families (``register``, ``family_class``, ``adapter_for``).

Each family file imports this module and registers its adapters; the package (``__init__.py``) imports every
family file, so importing ``mask_impact.families`` fills the registry. See the package's docstring.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..errors import UsageError, spelled

TOKEN_TYPES = ("mm_token_type_ids", "token_type_ids")  # Qwen-VL's and Gemma 3's names for them

# The layer types whose masks we rebuild, each with the transformers function that builds it.
LAYER_MASKS: dict[str, Callable] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def all_full(config) -> list[str]:
    """One plain causal mask for every layer (Llama, Qwen3-VL: ``create_causal_mask``, image tokens included)."""
    return ["full_attention"] * config.num_hidden_layers


def declared_types(config) -> list[str]:
    """``causal_mask_mapping[config.layer_types[i]]`` (Qwen2, Qwen3, Qwen2-VL, Gemma 2/3)."""
    return list(config.layer_types)


@dataclass
class LayerInputs:
    """What enters decoder layer 0 for one sequence, and what the model adds along the way."""

    hidden: torch.Tensor  # (1, S, H) embeddings, image features scattered in
    rope_position_ids: torch.Tensor  # (3, 1, S) MRoPE ids for VL, (1, S) for text
    visual_mask: torch.Tensor | None = None  # (S,) True at image positions
    deepstack: list[torch.Tensor] = field(default_factory=list)  # per layer: (n_visual, H), added after it


class DecoderAdapter:
    """A model family: where it keeps its decoder, how it masks and feeds it. Subclasses fill in the class
    attributes and ``layer_inputs``; a family whose modeling code differs overrides the method that differs."""

    model_types: tuple[str, ...] = ()
    model_class: str = "AutoModelForCausalLM"  # the transformers class ``from_pretrained`` loads
    label: str = ""  # the family's name in messages and the README
    takes_images: bool = False
    stages: tuple[str, ...] = ("decoder",)
    # why a stage the family lacks is missing, where the stage's own reason (stages.check_available) says too little
    stage_notes: dict[str, str] = {}
    native_attention: str = "sdpa"  # the attention the model runs with outside a knockout
    # the model's own masks let the tokens of one image attend to each other both ways (Gemma 3): the analysis
    # always knows the blocks, and lays knockouts over these masks without adding blocks of its own
    bidirectional_images: bool = False
    layer_type_rule: Callable[[object], list[str]] = staticmethod(all_full)

    def __init__(self, model: nn.Module, decoder: nn.Module):
        self.model = model
        self.decoder = decoder  # the module holding layers / norm / rotary_emb
        self.layer_types = self.checked_layer_types(model.config.model_type, decoder.config)
        if model.config._attn_implementation != self.native_attention:
            model.set_attn_implementation(self.native_attention)

    @classmethod
    def checked_layer_types(cls, model_type: str, text_config) -> list[str]:
        """The mask type of each decoder layer; raises ``UsageError`` for masks we cannot rebuild exactly."""
        if not getattr(text_config, "is_causal", True) or getattr(text_config, "use_bidirectional_attention", False):
            raise UsageError(f"this {model_type} checkpoint is configured bidirectional; knockouts here assume a "
                             "causal decoder")
        types = cls.layer_type_rule(text_config)
        unknown = sorted(set(types) - set(LAYER_MASKS))
        if unknown:
            raise UsageError(f"{model_type} layer types {', '.join(unknown)} are not supported (only "
                             f"{', '.join(LAYER_MASKS)} masks are reproduced exactly)")
        if "sliding_attention" in types and not getattr(text_config, "sliding_window", None):
            raise UsageError(f"this {model_type} checkpoint has sliding_attention layers but no sliding_window")
        return types

    @classmethod
    def class_name(cls, model_type: str) -> str:
        """The transformers class that loads a checkpoint of ``model_type``."""
        return cls.model_class

    @property
    def name(self) -> str:
        return self.model.config.model_type

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def crop(self, grid_thw: list[int], resized_width: int, resized_height: int) -> list[int] | None:
        """[left, top, width, height] of the resized picture the vision tower sees, None when it sees all of it."""
        return None

    def layout(self, limits, width: int, height: int, path: str) -> dict | None:
        """The image's tile arithmetic for ``ImageInfo.layout`` (None: one grid, ``token_cell`` needs no more)."""
        return None

    def fixed_size_only(self, min_pixels: int | None, max_pixels: int | None, sizes: str = "a fixed size") -> None:
        """A family whose processor resizes every image to ``sizes`` of its own takes no pixel bounds."""
        if min_pixels is not None or max_pixels is not None:
            bounds = spelled("--min-pixels/--max-pixels", "min_pixels=/max_pixels=", "min_pixels/max_pixels")
            raise UsageError(f"{bounds}: a {self.model.config.model_type} processor resizes every image to {sizes}")

    def prompt_limits(self, limits, images: int):
        """How the processor treats each image of a prompt with ``images`` images (LLaVA-OneVision: one way for a
        single image, another for several)."""
        return limits

    def processor_images(self, images: list) -> list:
        """The ``images`` argument of the processor for one prompt's images."""
        return images

    def model_inputs(self, encoded) -> dict:
        """The model's inputs besides ``input_ids`` among the processor's output."""
        return {key: encoded[key] for key in ("pixel_values", "image_grid_thw", "image_sizes", *TOKEN_TYPES)
                if key in encoded}

    def image_tokens(self, image) -> int:
        """Decoder tokens of one image (an ``inputs.ImageInfo``)."""
        return self.tokens_per_image(image.grid_thw)

    def image_placeholder(self, tokenizer) -> str:
        """The text the processor expands into one image's tokens (the image token itself, for most families)."""
        return tokenizer.convert_ids_to_tokens(self.model.config.image_token_id)

    def image_markup(self, tokenizer) -> str:
        """One image's markup in a raw prompt: the placeholder itself, unless the family wraps it (Qwen-VL)."""
        return self.image_placeholder(tokenizer)

    # --- an image whose tokens are not one grid over the picture (``ImageInfo.layout``: LLaVA-NeXT's views) ---------
    # The core asks these only for an image that records a layout; a family without one never has them called.

    def view_token_box(self, image, n: int) -> tuple[float, float, float, float] | None:
        """The unrounded box ``(x0, y0, x1, y1)`` of ``image``'s ``n``-th token in original-image pixels, None for
        a token with no pixels of the picture (``units.exact_box``)."""
        raise NotImplementedError(f"{self.label} records no image views")

    def view_token_patches(self, image, n: int) -> list[tuple[int, int, int]]:
        """The patches ``image``'s ``n``-th token is made of, as (view, patch row, patch column) of its (views, g, g)
        patch rows (``patches.PatchLayout``)."""
        raise NotImplementedError(f"{self.label} records no image views")

    def view_patch_box(self, image, view: int, row: int, col: int) -> tuple[float, float, float, float] | None:
        """A patch's unrounded box in original-image pixels, None for one wholly in padding (``patches.patch_box``)."""
        raise NotImplementedError(f"{self.label} records no image views")

    def view_colour_patches(self, image) -> list[int]:
        """The patches, by their place among the image's patch rows, whose mean is its mean colour (``--fill
        mean``)."""
        raise NotImplementedError(f"{self.label} records no image views")

    # --- the picture as patches (the pixels stage; a family that supports it gives these) -------------------------

    patch_merge: int = 1  # patches per side of one decoder token

    def patch_rows(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """The processor's ``pixel_values`` as one row per patch, ordered image, t, decoder token, patch inside the
        token (each row (C, T, P, P) flattened): the form the occlusion stage fills (``patches.PatchLayout``). The
        Qwen families' processors give exactly that. ``grid``: ``grid_of``'s, for a family whose ``pixel_values`` are
        padded between images (LLaVA-NeXT's views)."""
        return pixel_values

    def pixel_values_of(self, rows: torch.Tensor) -> torch.Tensor:
        """``patch_rows`` undone: the model's ``pixel_values`` for patch rows of a whole number of images."""
        return rows

    def grid_of(self, prompt) -> torch.Tensor:
        """(images, 3) each image's (t, h, w) in patches, as ``image_features`` takes it."""
        return torch.tensor([image.grid_thw for image in prompt.images])

    def deepstack_features(self, features) -> list[torch.Tensor]:
        """``image_features``' DeepStack features as one ``(n_vis, H)`` tensor per level, every image's rows in
        order; none for a family without DeepStack (Qwen3-VL's adapter gives them)."""
        return []

    # --- the vision tower's layers (the vision-encoder stage; a family that supports it gives these) ---------------
    # The defaults are the Qwen towers': a prompt's images packed into one sequence (the tower's attention called once
    # per image), each image's sequence its patch rows in order, every block reaching the features.

    vision_packed: bool = True  # False: one sequence per image, the images a batch (CLIP, SigLIP)

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The tower's blocks, in order (all of them; ``vision_depth`` says how many reach the features)."""
        return self.vision_tower.blocks

    @property
    def vision_depth(self) -> int:
        """The tower's layers that reach the features the decoder gets, ``vision_layers[:vision_depth]``: the rows
        ``--layers`` and ``--window`` count with ``--stage vision-encoder``."""
        return len(self.vision_layers)

    def vision_depth_note(self) -> str:
        """What ``--layers`` counts with ``--stage vision-encoder``, for its messages."""
        return f"the vision tower's {self.vision_depth}"

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        """The module of a tower block that calls transformers' attention interface."""
        return layer.attn

    def vision_attention_configs(self) -> list:
        """The config objects the tower's attention modules read ``_attn_implementation`` from."""
        configs = {id(self.vision_tower.config): self.vision_tower.config}
        for layer in self.vision_layers:
            config = getattr(self.vision_attention(layer), "config", None)
            if config is not None:
                configs[id(config)] = config
        return list(configs.values())

    def vision_views(self, grid_thw) -> int:
        """The tower sequences one image takes (its views: LLaVA-NeXT's base view and tiles), each ``vision_sequence``
        long, one after the other in the tower's batch; 1 for every other family."""
        return 1

    def vision_sequence(self, grid_thw) -> tuple[int, torch.Tensor]:
        """One image's sequence in the tower: its length, and the position in it of each of the image's patch rows
        (``patch_rows`` order), (n,). Qwen: the rows themselves, in order. An image of several views
        (``vision_views``): one view's length, and positions in the views' sequences laid end to end (view v's from
        v · length)."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w, torch.arange(t * h * w)

    def vision_rerun(self, recorded: list[tuple[tuple, dict]], first: int, image: int, rows: range,
                     batch: int, grid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks ``first .. vision_depth - 1`` over ``batch`` copies of image ``image`` (its patch rows ``rows``; its
        row of ``grid_of``, ``grid``), from ``recorded``: each block's (args, kwargs) in the tower's pass over the
        prompt's images. Returns the features the decoder gets, (B, n_tok, H), and the DeepStack levels recomputed,
        {level: (B, n_tok, H)}. The caller holds the knockout plan (for a packed tower: one stacked sequence of the
        copies; for an image of several views, each copy's views one after the other)."""
        raise NotImplementedError(f"{self.name}: no ViT stage")

    def geometry(self) -> str | None:
        """How vision tokens map to pixels, for the result's ``meta`` (None: the family takes no images)."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits of the last layer's output ``hidden`` (B, T, H), as the model's forward makes them."""
        logits = self.lm_head(self.norm(hidden))
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:  # the ops of Gemma's *ForCausalLM.forward, in its order
            logits = torch.tanh(logits / cap) * cap
        return logits

    def rotary(self, hidden: torch.Tensor, rope_position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary_emb(hidden, rope_position_ids)

    def position_embeddings(self, hidden: torch.Tensor,
                            rope_position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (cos, sin) each layer gets, each (1, S, hs); one rotary embedding for every layer by default."""
        shared = self.rotary(hidden, rope_position_ids)
        return [shared] * self.num_layers

    def attention_configs(self) -> list:
        """The config objects the decoder's attention modules read ``_attn_implementation`` from."""
        configs = {id(self.decoder.config): self.decoder.config}
        for layer in self.layers:
            configs[id(layer.self_attn.config)] = layer.self_attn.config
        return list(configs.values())

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        raise NotImplementedError

    def layer_masks(self, hidden: torch.Tensor, visual_mask: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """The mask each layer gets in the model's own forward of one whole sequence (no padding, no cache).

        ``hidden`` (1, S, H) only sizes them; ``visual_mask`` (S,) marks the image tokens, for a family whose masks
        depend on them (Gemma 3). With our attention installed (or SDPA) each is a boolean
        (1, 1, S, S) mask of allowed scores, or None where it is plain causal (``sdpa_mask`` skips it:
        full layers, and sliding layers whose window covers the whole sequence).
        """
        with past_key_values_accepted():
            built = {kind: LAYER_MASKS[kind](config=self.decoder.config, inputs_embeds=hidden, attention_mask=None,
                                             past_key_values=None)
                     for kind in set(self.layer_types)}
        return [built[kind] for kind in self.layer_types]


@contextlib.contextmanager
def past_key_values_accepted() -> Iterator[None]:
    """transformers 5.17 knows the cache argument only as ``past_key_values``; 5.2x still takes it, with a
    FutureWarning (DESIGN.md §8), which would reach every run's stderr: silenced where the tool passes it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)
        yield


REGISTRY: dict[str, type[DecoderAdapter]] = {}


def register(cls: type[DecoderAdapter]) -> type[DecoderAdapter]:
    """Class decorator: the family serves each of its ``model_types``."""
    for model_type in cls.model_types:
        REGISTRY[model_type] = cls
    return cls


def supported(images: bool | None = None) -> tuple[str, ...]:
    """The registered model types (only the vision-language ones, or only the text ones, when ``images`` says)."""
    return tuple(t for t, cls in REGISTRY.items() if images is None or cls.takes_images == images)


def family_class(model_type: str | None) -> type[DecoderAdapter]:
    if model_type not in REGISTRY:
        raise UsageError(f"model type {model_type!r} is not supported; supported: {', '.join(supported())}")
    return REGISTRY[model_type]


def adapter_for(model: nn.Module) -> DecoderAdapter:
    return family_class(model.config.model_type)(model)


def raster_positions(grid_thw, merge: int, prefix: int = 0) -> torch.Tensor:
    """(n,) where each patch row (the Qwen order: t, token, the ``merge``² patches inside it) sits in a tower's
    sequence that takes the patches row by row after ``prefix`` tokens of its own (CLIP: its CLS)."""
    t, h, w = (int(v) for v in grid_thw)
    frame, row, col, dy, dx = torch.meshgrid(torch.arange(t), torch.arange(h // merge), torch.arange(w // merge),
                                             torch.arange(merge), torch.arange(merge), indexing="ij")
    return (prefix + frame * h * w + (row * merge + dy) * w + col * merge + dx).flatten()


def rerun_batched(layers: nn.ModuleList, recorded: list[tuple[tuple, dict]], first: int, image: int, batch: int,
                  stop: int, views: int = 1) -> list[torch.Tensor]:
    """A tower that takes one sequence per image, batched (CLIP, SigLIP): blocks ``first .. stop - 1`` over ``batch``
    copies of image ``image`` from the recorded inputs of block ``first``; each block's output (B, L, D). An image of
    several views (LLaVA-NeXT): ``image`` is its first view's place in the tower's batch, and each copy is its
    ``views`` sequences one after the other, (B · views, L, D)."""
    args, kwargs = recorded[first]
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    rest = args[1:]
    if any(arg is not None for arg in rest) or kwargs.get("attention_mask") is not None:
        raise RuntimeError("the vision tower passed its blocks an attention mask; the ViT knockout assumes none")
    hidden = hidden[image:image + views].repeat(batch, *([1] * (hidden.dim() - 1)))
    outputs = []
    for index in range(first, stop):
        hidden = layers[index](hidden, *rest, **kwargs)
        outputs.append(hidden)
    return outputs
