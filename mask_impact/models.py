"""Loading models, and the tables that say where each family keeps its decoder and how it masks it.

The engine never reaches into a model by hard-coded attribute paths: it asks a ``DecoderAdapter``
for the decoder layers, the final norm, the rotary embedding and the head, for the inputs of
layer 0 (embeddings with image features scattered in, position ids, DeepStack additions), and for
the attention mask each layer gets. One adapter serves Qwen3-VL, another every Llama-shaped text
decoder (Qwen3, Qwen2, Llama, Mistral).

Masks: the engine runs the decoder layers itself, so it must hand each layer the mask the model's
own forward would build for it — plain causal, or causal within a sliding window (Mistral; Qwen2/
Qwen3 with ``use_sliding_window``). ``LAYER_TYPE_RULES`` says, per family, which layer gets which
mask, as each family's modeling code picks it; the masks themselves come from transformers' own
builders. A configuration whose masks we cannot rebuild exactly is refused at load, never run.

Demo models are built offline, saved, and loaded back through ``from_pretrained`` exactly like a
real checkpoint (see ``demo.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .config import UsageError

VL_FAMILIES = ("qwen3_vl",)
TEXT_FAMILIES = ("qwen3", "qwen2", "llama", "mistral")

# The layer types whose masks we rebuild, each with the transformers function that builds it.
LAYER_MASKS: dict[str, Callable] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def _all_full(config) -> list[str]:
    return ["full_attention"] * config.num_hidden_layers


def _mistral_types(config) -> list[str]:
    # MistralModel builds one mask for every layer, sliding iff ``sliding_window`` is set; it ignores layer_types
    kind = "full_attention" if config.sliding_window is None else "sliding_attention"
    return [kind] * config.num_hidden_layers


def _declared_types(config) -> list[str]:
    return list(config.layer_types)


# Which mask each family's decoder hands each layer (transformers 5.x modeling code).
LAYER_TYPE_RULES: dict[str, Callable[[object], list[str]]] = {
    "qwen3_vl": _all_full,  # Qwen3VLTextModel: create_causal_mask for every layer, image tokens included
    "llama": _all_full,
    "mistral": _mistral_types,
    "qwen2": _declared_types,  # causal_mask_mapping[config.layer_types[i]]
    "qwen3": _declared_types,
}


def layer_types_for(model_type: str, text_config) -> list[str]:
    """The mask type of each decoder layer; raises ``UsageError`` for masks we cannot rebuild exactly."""
    if not getattr(text_config, "is_causal", True):
        raise UsageError(f"this {model_type} checkpoint is configured bidirectional (is_causal: false); "
                         "knockouts here assume a causal decoder")
    types = LAYER_TYPE_RULES[model_type](text_config)
    unknown = sorted(set(types) - set(LAYER_MASKS))
    if unknown:
        raise UsageError(f"{model_type} layer types {', '.join(unknown)} are not supported (only "
                         f"{', '.join(LAYER_MASKS)} masks are reproduced exactly)")
    if "sliding_attention" in types and not getattr(text_config, "sliding_window", None):
        raise UsageError(f"this {model_type} checkpoint has sliding_attention layers but no sliding_window")
    return types


@dataclass
class LayerInputs:
    """What enters decoder layer 0 for one sequence, and what the model adds along the way."""

    hidden: torch.Tensor  # (1, S, H) embeddings, image features scattered in
    rope_position_ids: torch.Tensor  # (3, 1, S) MRoPE ids for VL, (1, S) for text
    visual_mask: torch.Tensor | None = None  # (S,) True at image positions
    deepstack: list[torch.Tensor] = field(default_factory=list)  # per layer: (n_visual, H), added after it


class DecoderAdapter:
    """Where a model family keeps its decoder; subclasses fill in ``layer_inputs``."""

    def __init__(self, model: nn.Module, decoder: nn.Module):
        self.model = model
        self.decoder = decoder  # the module holding layers / norm / rotary_emb
        self.layer_types = layer_types_for(model.config.model_type, decoder.config)

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

    def rotary(self, hidden: torch.Tensor, rope_position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary_emb(hidden, rope_position_ids)

    def attention_configs(self) -> list:
        """The config objects the decoder's attention modules read ``_attn_implementation`` from."""
        configs = {id(self.decoder.config): self.decoder.config}
        for layer in self.layers:
            configs[id(layer.self_attn.config)] = layer.self_attn.config
        return list(configs.values())

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        raise NotImplementedError

    def layer_masks(self, hidden: torch.Tensor) -> list[torch.Tensor | None]:
        """The mask each layer gets in the model's own forward of one whole sequence (no padding, no cache).

        ``hidden`` (1, S, H) only sizes them. With our attention installed (or SDPA) each is a boolean
        (1, 1, S, S) mask of allowed scores, or None where it is plain causal (``sdpa_mask`` skips it:
        full layers, and sliding layers whose window covers the whole sequence).
        """
        built = {kind: LAYER_MASKS[kind](config=self.decoder.config, inputs_embeds=hidden, attention_mask=None,
                                         past_key_values=None)
                 for kind in set(self.layer_types)}
        return [built[kind] for kind in self.layer_types]


class TextAdapter(DecoderAdapter):
    """Llama-shaped causal LMs: ``model.model.{embed_tokens, layers, norm, rotary_emb}``, ``model.lm_head``."""

    def __init__(self, model: nn.Module):
        super().__init__(model, model.model)

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        hidden = self.decoder.embed_tokens(input_ids)  # (1, S, H)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, S)
        return LayerInputs(hidden=hidden, rope_position_ids=positions)


class Qwen3VLAdapter(DecoderAdapter):
    """Qwen3-VL: decoder at ``model.model.language_model``, vision tower at ``model.model.visual``."""

    def __init__(self, model: nn.Module):
        super().__init__(model, model.model.language_model)

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        inner = self.model.model
        hidden = inner.get_input_embeddings()(input_ids)  # (1, S, H)
        grid = model_kwargs.get("image_grid_thw")
        visual_mask, deepstack = None, []
        if model_kwargs.get("pixel_values") is not None:
            features = inner.get_image_features(model_kwargs["pixel_values"], grid, return_dict=True)
            image_embeds = torch.cat(features.pooler_output, dim=0).to(hidden.device, hidden.dtype)
            visual_mask = (input_ids[0] == self.model.config.image_token_id)  # (S,)
            hidden = hidden.masked_scatter(visual_mask[None, :, None].expand_as(hidden), image_embeds)
            deepstack = list(features.deepstack_features)
        rope_position_ids, _ = inner.get_rope_index(
            input_ids, mm_token_type_ids=model_kwargs["mm_token_type_ids"], image_grid_thw=grid
        )  # (3, 1, S)
        return LayerInputs(hidden, rope_position_ids, visual_mask, deepstack)


def adapter_for(model: nn.Module) -> DecoderAdapter:
    model_type = model.config.model_type
    if model_type in VL_FAMILIES:
        return Qwen3VLAdapter(model)
    if model_type in TEXT_FAMILIES:
        return TextAdapter(model)
    raise UsageError(
        f"model type {model_type!r} is not supported; supported: {', '.join(VL_FAMILIES + TEXT_FAMILIES)}"
    )


@dataclass
class LoadedModel:
    model: nn.Module
    processor: object  # Qwen3VLProcessor for VL, the tokenizer for text models
    tokenizer: object
    adapter: DecoderAdapter
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def is_vl(self) -> bool:
        return isinstance(self.adapter, Qwen3VLAdapter)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(name: str, vision: bool, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a checkpoint (hub id or local folder) through ``from_pretrained``; errors say what is wrong."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = _load_config(name)
    model_type = getattr(config, "model_type", None)
    if vision and model_type not in VL_FAMILIES:
        raise UsageError(
            f"{name} is a {model_type!r} model, not Qwen3-VL; use mask_impact_analysis.py for text-only models"
        )
    if not vision and model_type in VL_FAMILIES:
        raise UsageError(f"{name} is a Qwen3-VL model; use mask_impact_vl.py for it")
    if model_type not in VL_FAMILIES + TEXT_FAMILIES:
        raise UsageError(
            f"{name}: model type {model_type!r} is not supported; "
            f"supported: {', '.join(VL_FAMILIES + TEXT_FAMILIES)}"
        )
    try:
        layer_types_for(model_type, config.get_text_config())
    except UsageError as error:
        raise UsageError(f"{name}: {error}") from None
    if vision:
        processor = transformers.AutoProcessor.from_pretrained(name)
        tokenizer = processor.tokenizer
        model_class = transformers.Qwen3VLForConditionalGeneration
    else:
        processor = tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        model_class = transformers.AutoModelForCausalLM
    model = model_class.from_pretrained(name, dtype=torch_dtype, attn_implementation="sdpa")
    model.to(torch_device).eval()
    return LoadedModel(model, processor, tokenizer, adapter_for(model), name, torch_device, torch_dtype)


def _load_config(name: str):
    try:
        return transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        text = str(error)
        if "does not recognize this architecture" in text or "model type" in text and "not" in text:
            raise UsageError(
                f"{name}: transformers {transformers.__version__} does not know this model type; "
                "Qwen3-VL needs transformers >= 5.0 (pip install -U transformers)"
            ) from None
        raise UsageError(
            f"model {name!r} could not be found (not a local folder with config.json, and not reachable on the "
            "hub); check the name, or pass a local folder"
        ) from None
