"""Loading models, and the one table that says where each family keeps its decoder.

The engine never reaches into a model by hard-coded attribute paths: it asks a ``DecoderAdapter``
for the decoder layers, the final norm, the rotary embedding and the head, and for the inputs of
layer 0 (embeddings with image features scattered in, position ids, DeepStack additions). One
adapter serves Qwen3-VL, another every Llama-shaped text decoder (Qwen3, Qwen2, Llama, Mistral).

Demo models are built offline, saved, and loaded back through ``from_pretrained`` exactly like a
real checkpoint (see ``demo.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

from .config import UsageError

VL_FAMILIES = ("qwen3_vl",)
TEXT_FAMILIES = ("qwen3", "qwen2", "llama", "mistral")


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
