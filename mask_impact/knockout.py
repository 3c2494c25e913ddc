"""The knockout: which attention scores are blocked, and the attention function that blocks them.

A knockout blocks, at every decoder layer of its window, a set of query positions from a set of key
positions (spec.py; the classic ``KO(window, p)``: every query ``q != p`` from key ``p``). The blocked
pre-softmax score is *set* to the dtype minimum, so its softmax weight is exactly zero; the diagonal
is never blocked, so no row is ever fully masked.

The attention function is registered under ``ATTENTION_NAME`` in transformers' ``AttentionInterface``
(and ``sdpa_mask`` under the same name in ``AttentionMaskInterface``, without which
``create_causal_mask`` would hand it no mask at all). The model's own attention modules call it, so
the projections, q/k norms and rotary embeddings stay exactly the model's. What it blocks comes from
the ``AttentionPlan`` made active with ``apply_plan``; with no active plan it is plain SDPA. Scores that the
family soft-caps (Gemma 2: ``softcap`` from its attention module) are always written out the way eager attention
computes them (scale, ``tanh(s / c) · c``, mask, float32 softmax), since SDPA has no soft-capping.

Query positions are absolute: for ``Q`` queries over ``K`` keys the queries sit at ``K-Q .. K-1``.
That holds for a full forward, for cached decoding with a full-length cache (``Analysis.generate``
passes one: transformers' default cache drops the keys that left a sliding window) and for the
engine's suffix recomputation.

The knockout is laid over the mask the model built for the layer (``base``: causal, a sliding
window, ...). When that arrives as None, ``sdpa_mask`` found it plain causal; a sliding layer with
more keys than its window never gets None, and ``knockout_attention`` refuses one that does rather
than silently attend past the window.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .spec import Knockout

ATTENTION_NAME = "mask_impact"

_ACTIVE_PLAN: contextvars.ContextVar["AttentionPlan | None"] = contextvars.ContextVar(
    "mask_impact_plan", default=None
)


@dataclass(frozen=True)
class AttentionPlan:
    """What the registered attention function blocks (see spec.py for the knockout itself).

    layers:        the knockout window as a ``range`` of decoder layers (None: no knockout).
    keys:          (B, S) True at the key positions knocked out in each batch row.
    queries:       (B, S) True at the query positions blocked from them in each row.
    query_tail:    (B,) whether positions past ``S`` (generated tokens) are blocked queries too.
    vision_groups: (S,) image index of each position, -1 for non-vision; when given, tokens of the
                   same image attend to each other both ways (``--vision-attention bidirectional``).
    reference:     compute attention the slow, obvious way (explicit scores, masked_fill, softmax).
    gqa:           let SDPA share each key/value head among its query heads (``enable_gqa``) instead of
                   copying them (``repeat_kv``), where that keeps SDPA's fast kernel (see ``_gqa_in_sdpa``).
    on_weights:    with ``reference``: called as ``on_weights(layer, weights)`` with each layer's attention
                   probabilities (B, nh, Q, K) in float32, after the softmax; what it returns is used instead
                   (estimate.py reads them and their gradients; its tests re-weight them).
    """

    layers: range | None = None
    keys: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    query_tail: torch.Tensor | None = None
    vision_groups: torch.Tensor | None = None
    reference: bool = False
    gqa: bool = True
    on_weights: Callable[[int, torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def for_knockouts(cls, window: tuple[int, int], knockouts: list[Knockout], length: int,
                      vision_groups: torch.Tensor | None = None, reference: bool = False) -> AttentionPlan:
        """One batch row per knockout; masks over the first ``length`` positions, longer if a query tail
        starts past them (positions past the masks count as queries only for a tail that has begun)."""
        length = max([length] + [k.queries_from + 1 for k in knockouts if k.queries is not None and
                                 k.queries_from is not None])
        return cls(
            layers=range(window[0], window[1] + 1),
            keys=torch.stack([k.key_mask(length) for k in knockouts]),  # (B, S)
            queries=torch.stack([k.query_mask(length) for k in knockouts]),  # (B, S)
            query_tail=torch.tensor([k.query_tail for k in knockouts]),  # (B,)
            vision_groups=vision_groups,
            reference=reference,
        )

    def blocks_layer(self, layer: int) -> bool:
        return self.layers is not None and layer in self.layers

    def allowed(
        self, layer: int, q_len: int, k_len: int, base: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean (B|1, 1, Q, K) mask of allowed scores, or None when plain causal attention is right."""
        knocks = self.blocks_layer(layer)
        if not knocks and self.vision_groups is None and base is None and q_len == k_len:
            return None
        q_pos = torch.arange(k_len - q_len, k_len, device=device)  # (Q,)
        k_pos = torch.arange(k_len, device=device)  # (K,)
        if base is None:
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Q, K)
        else:
            allowed = base.to(device=device, dtype=torch.bool)
        if self.vision_groups is not None:
            groups = _padded(self.vision_groups.to(device), k_len, -1)  # (K,)
            q_groups = groups[q_pos]  # (Q,)
            same_image = (q_groups[:, None] == groups[None, :]) & (q_groups[:, None] >= 0)  # (Q, K)
            allowed = allowed | same_image[None, None]
        if knocks:
            keys = _padded(self.keys.to(device), k_len, False)  # (B, K)
            queries = _padded(self.queries.to(device), k_len, self.query_tail.to(device)[:, None])[:, q_pos]  # (B, Q)
            blocked = queries[:, :, None] & keys[:, None, :] & (q_pos[:, None] != k_pos[None, :])  # (B, Q, K)
            allowed = allowed & ~blocked[:, None]  # (B, 1, Q, K)
        return allowed


def _padded(mask: torch.Tensor, length: int, fill) -> torch.Tensor:
    """``mask`` (..., S) cut or extended to ``length`` positions; positions past the prompt (generated
    tokens) get ``fill`` (a value, or a tensor broadcasting over the leading dimensions)."""
    if mask.shape[-1] >= length:
        return mask[..., :length]
    tail = torch.empty((*mask.shape[:-1], length - mask.shape[-1]), dtype=mask.dtype, device=mask.device)
    tail[...] = fill
    return torch.cat([mask, tail], dim=-1)


def knockout_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, nh, Q, hs)
    key: torch.Tensor,  # (B, nkv, K, hs)
    value: torch.Tensor,  # (B, nkv, K, hs)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with the active plan's blocks; plain SDPA when no plan is active."""
    window = kwargs.get("sliding_window")
    if attention_mask is None and window is not None and key.shape[2] > window:
        raise RuntimeError(f"layer {module.layer_idx}: sliding window {window} but no mask over {key.shape[2]} keys")
    plan = _ACTIVE_PLAN.get()
    softcap = kwargs.get("softcap")  # Gemma 2's attention-score soft-capping; SDPA cannot apply it
    if plan is None:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        plan = AttentionPlan()
    base = attention_mask if attention_mask is not None and attention_mask.dtype == torch.bool else None
    if attention_mask is not None and base is None:
        raise TypeError("mask_impact attention expects a boolean attention mask (sdpa_mask)")
    allowed = plan.allowed(module.layer_idx, query.shape[2], key.shape[2], base, query.device)
    groups = getattr(module, "num_key_value_groups", 1)
    written_out = plan.reference or softcap is not None
    gqa = groups > 1 and plan.gqa and not written_out and _gqa_in_sdpa(query, allowed)
    if not gqa:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, nh, K, hs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if written_out:
        scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, nh, Q, K)
        if softcap is not None:  # as eager attention does it, before the mask
            scores = torch.tanh(scores / softcap) * softcap
        if allowed is None:
            allowed = _causal(query.shape[2], key.shape[2], query.device)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32)  # (B, nh, Q, K)
        if plan.on_weights is not None:
            weights = plan.on_weights(module.layer_idx, weights)
        weights = weights.to(query.dtype)
        output = torch.matmul(weights, value)  # (B, nh, Q, hs)
    else:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, scale=scale, is_causal=allowed is None and query.shape[2] > 1,
            enable_gqa=gqa,
        )
    return output.transpose(1, 2).contiguous(), None  # (B, Q, nh, hs)


def _gqa_in_sdpa(query: torch.Tensor, allowed: torch.Tensor | None) -> bool:
    """Whether SDPA's grouped-query path keeps its fast kernel: on the CPU always (measured: equal results, less
    time than copying the heads); on CUDA only without a mask (with one it falls back to the math kernel, as
    transformers' ``use_gqa_in_sdpa`` says)."""
    return query.device.type == "cpu" or allowed is None


def _causal(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]


AttentionInterface.register(ATTENTION_NAME, knockout_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextlib.contextmanager
def apply_plan(plan: AttentionPlan | None) -> Iterator[None]:
    """Make ``plan`` what the registered attention function applies, for the duration of the block."""
    token = _ACTIVE_PLAN.set(plan)
    try:
        yield
    finally:
        _ACTIVE_PLAN.reset(token)


@contextlib.contextmanager
def knockout_attention_installed(configs: list) -> Iterator[None]:
    """Route the decoder's attention through ``knockout_attention``; restore the old setting after."""
    saved = [config._attn_implementation_internal for config in configs]
    try:
        for config in configs:
            config._attn_implementation_internal = ATTENTION_NAME
        yield
    finally:
        for config, old in zip(configs, saved):
            config._attn_implementation_internal = old
