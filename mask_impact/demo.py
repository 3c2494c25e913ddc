"""Tiny demo models, offline: the trained ones shipped in ``models/``, and random-weight builders.

Nothing comes from the model hub. Each demo is a real checkpoint folder — config, safetensors
weights, a byte-level BPE tokenizer trained on the fly with the Qwen special tokens and a Qwen-style
chat template, and (for VL) the genuine ``Qwen3VLProcessor`` — loaded through the same
``from_pretrained`` path as ``Qwen/Qwen3-VL-4B-Instruct``.

``--demo`` uses the models trained on synthetic tasks with a planted answer (tools/train_demo_models.py).
The random-weight builders below serve the tests, which need fresh models of chosen shapes; their
heatmaps are noise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from tokenizers import pre_tokenizers, trainers

from .resources import data_path

DEMO_VERSION = 1
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)
CORPUS = [
    "What's in this image? Describe the picture in one word.",
    "A red square on a blue background, a green circle, a yellow triangle.",
    "The cat sat on the mat. The dog ran to the park. Where is the shape?",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "user assistant system: 0 1 2 3 4 5 6 7 8 9 = , . ? ! A B C D E",
    "What color is the shape? What shape is it? left right top bottom center",
]


def cache_root() -> Path:
    return Path(os.environ.get("MASK_IMPACT_CACHE", Path.home() / ".cache" / "mask_impact"))


def build_tokenizer(corpus: list[str] = CORPUS, vocab_size: int = 384) -> transformers.Qwen2Tokenizer:
    """A byte-level BPE with Qwen's pre-tokenizer and special tokens, trained on ``corpus``."""
    seed = transformers.Qwen2Tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seed._tokenizer.train_from_iterator(corpus * 4, trainer)
    trained = json.loads(seed._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = transformers.Qwen2Tokenizer(
        vocab=trained["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_config(tokenizer, model_type: str = "qwen3", num_layers: int = 4,
                     **overrides) -> transformers.PreTrainedConfig:
    """A tiny text decoder; ``overrides`` reach the config as is (e.g. ``sliding_window=4``, ``layer_types``)."""
    ids = _special_ids(tokenizer)
    return transformers.AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False, **overrides,
    )


def tiny_vl_config(tokenizer, num_layers: int = 4, moe: bool = False) -> transformers.PretrainedConfig:
    """A tiny Qwen3-VL config; ``moe``: Qwen3-VL-MoE (4 experts, 2 per token, a sparse block in every layer)."""
    ids = _special_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
        initializer_range=0.1,
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    mlp_only_layers=[])
    return (transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig)(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def build_vl_processor(tokenizer) -> transformers.Qwen3VLProcessor:
    """The genuine processor with a 16-px patch, 2×2 merge, and images kept between 64² and 256² pixels."""
    size = {"shortest_edge": 64 * 64, "longest_edge": 256 * 256}
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, size=size,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    video_processor = transformers.Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    return transformers.Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_demo(folder: Path, vision: bool, num_layers: int = 4, seed: int = 0,
               text_model_type: str = "qwen3", text_config: dict | None = None, moe: bool = False) -> Path:
    """Write a tiny checkpoint folder (model, tokenizer, processor); deterministic for a given seed.

    ``text_config`` overrides the text model's config fields, e.g. a sliding window for Mistral
    (``{"sliding_window": 4}``) or for Qwen2/Qwen3 (``use_sliding_window``, ``sliding_window``, ``layer_types``).
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    if vision:
        config = tiny_vl_config(tokenizer, num_layers, moe)
        model_class = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
        model = model_class(config)
        build_vl_processor(tokenizer).save_pretrained(folder)
    else:
        config = tiny_text_config(tokenizer, text_model_type, num_layers, **(text_config or {}))
        model = transformers.AutoModelForCausalLM.from_config(config)
        tokenizer.save_pretrained(folder)
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.save_pretrained(folder)
    return folder


SHIPPED = data_path("models")


def demo_model_path(vision: bool) -> Path:
    """The trained demo model shipped in ``models/`` (see tools/train_demo_models.py); without it, a
    random-weight one built on first use in the cache (atomically, so a crash leaves no half folder)."""
    shipped = SHIPPED / ("demo-vl" if vision else "demo-text")
    if (shipped / "config.json").exists():
        return shipped
    return random_demo_path(vision)


def random_demo_path(vision: bool) -> Path:
    folder = cache_root() / f"demo-{'vl' if vision else 'text'}-v{DEMO_VERSION}"
    if not (folder / "config.json").exists():
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        build_demo(partial, vision)
        try:
            partial.rename(folder)
        except OSError:  # another process built it first
            pass
    return folder


def _special_ids(tokenizer) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
