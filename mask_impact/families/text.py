"""Llama-shaped text decoders: ``model.model.{embed_tokens, layers, norm, rotary_emb}``, ``model.lm_head``.

Qwen3, Qwen2, Llama and Mistral differ only in which mask each layer gets: Llama one causal mask for all; Mistral
one mask for all, a sliding window iff ``sliding_window`` is set (``MistralModel`` ignores ``layer_types``);
Qwen2/Qwen3 the mask of ``config.layer_types[i]``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import DecoderAdapter, LayerInputs, all_full, declared_types, register


class TextAdapter(DecoderAdapter):
    """A causal LM whose embeddings (scaled, where the family scales them) enter layer 0 at positions 0..S-1."""

    def __init__(self, model: nn.Module):
        super().__init__(model, model.model)

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        hidden = self.decoder.embed_tokens(input_ids)  # (1, S, H)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, S)
        return LayerInputs(hidden=hidden, rope_position_ids=positions)


@register
class Llama(TextAdapter):
    model_types = ("llama",)
    label = "Llama"


def _mistral_types(config) -> list[str]:
    kind = "full_attention" if config.sliding_window is None else "sliding_attention"
    return [kind] * config.num_hidden_layers


@register
class Mistral(TextAdapter):
    model_types = ("mistral",)
    label = "Mistral"
    layer_type_rule = staticmethod(_mistral_types)


@register
class Qwen(TextAdapter):
    model_types = ("qwen3", "qwen2")
    label = "Qwen3, Qwen2"
    layer_type_rule = staticmethod(declared_types)


__all__ = ["TextAdapter", "Llama", "Mistral", "Qwen", "all_full"]
