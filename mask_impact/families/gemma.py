"""Gemma 2 and Gemma 3 text decoders (``gemma2``, ``gemma3_text``).

What sets them apart from the Llama shape, each reproduced exactly:

- embeddings scaled by √hidden_size: inside their ``embed_tokens`` (a ``*ScaledWordEmbedding``), so layer 0's
  input is ``embed_tokens(ids)`` as for any text decoder;
- sliding and global layers (``config.layer_types``), each with the mask its type gets;
- Gemma 3: a local and a global rotary embedding (``rope_parameters[layer_type]``), each layer the one of its type;
- final-logit soft-capping ``tanh(logits / c) · c`` (``DecoderAdapter.logits``);
- Gemma 2: attention-score soft-capping ``tanh(scores / c) · c`` before the mask. transformers' SDPA path drops it
  silently, so the model is run with ``eager`` attention natively, and the knockout attention applies the cap
  itself (``knockout.knockout_attention``, written out like eager attention).

A Gemma 3 checkpoint configured bidirectional (``use_bidirectional_attention``) is refused.
"""

from __future__ import annotations

import torch

from .base import declared_types, register
from .text import TextAdapter


@register
class Gemma2(TextAdapter):
    model_types = ("gemma2",)
    model_class = "Gemma2ForCausalLM"
    label = "Gemma 2"
    native_attention = "eager"  # SDPA would drop attn_logit_softcapping
    layer_type_rule = staticmethod(declared_types)


@register
class Gemma3Text(TextAdapter):
    model_types = ("gemma3_text",)
    model_class = "Gemma3ForCausalLM"
    label = "Gemma 3 (text)"
    layer_type_rule = staticmethod(declared_types)

    def position_embeddings(self, hidden: torch.Tensor,
                            rope_position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        by_type = {kind: self.decoder.rotary_emb(hidden, rope_position_ids, kind) for kind in set(self.layer_types)}
        return [by_type[kind] for kind in self.layer_types]

    def rotary(self, hidden: torch.Tensor, rope_position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("Gemma 3 has one rotary embedding per layer type; use position_embeddings")
