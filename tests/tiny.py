"""Tiny random-weight checkpoints of the families beyond the demo's, built offline with the real classes.

Each is a checkpoint folder — config, safetensors weights, the demo's byte-level BPE tokenizer with the Qwen
special tokens and chat template, and for vision-language families the family's genuine processor — loaded back
through ``from_pretrained`` exactly like a hub checkpoint. They serve the tests (tests/test_families.py): every
family's identities on a model whose special features really act (sliding windows shorter than the prompt,
soft-capping caps small enough to bend the scores, Qwen2.5-VL's ViT windows smaller than the image).

``build_tiny(folder, model_type)`` covers every registered family; the demo's own (Qwen3-VL, Qwen3 and the other
Llama-shaped text models) are built by ``demo.build_demo``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from mask_impact.demo import CHAT_TEMPLATE, _special_ids, build_demo, build_tokenizer

WINDOW = 4  # every sliding layer's window: far shorter than the test prompts
FULL, SLIDE = "full_attention", "sliding_attention"
LAYER_TYPES = [SLIDE, FULL, SLIDE, SLIDE]


def _text(tokenizer, **overrides) -> dict:
    ids = _special_ids(tokenizer)
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False, **overrides)


def _qwen2_vl_config(tokenizer, windowed_vit: bool) -> transformers.PretrainedConfig:
    """Qwen2-VL, or Qwen2.5-VL with ``windowed_vit`` (ViT windows of 2×2 decoder tokens, block 1 global)."""
    ids = _special_ids(tokenizer)
    text = _text(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
                 use_sliding_window=True, sliding_window=WINDOW, layer_types=LAYER_TYPES)
    if windowed_vit:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, window_size=64, fullatt_block_indexes=[1],
                      initializer_range=0.1)
        config_class = transformers.Qwen2_5_VLConfig
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
        config_class = transformers.Qwen2VLConfig
    return config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def _qwen2_vl_processor(tokenizer, windowed_vit: bool):
    size = {"shortest_edge": 64 * 64, "longest_edge": 256 * 256}
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video_processor = transformers.Qwen2VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor_class = transformers.Qwen2_5_VLProcessor if windowed_vit else transformers.Qwen2VLProcessor
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                           chat_template=CHAT_TEMPLATE)


def _gemma_config(tokenizer, model_type: str) -> transformers.PretrainedConfig:
    """Gemma 2 (attention and final-logit soft-capping) or Gemma 3 text (a local and a global rotary base);
    caps small enough that they bend random-weight scores."""
    common = _text(tokenizer, head_dim=16, sliding_window=WINDOW, layer_types=LAYER_TYPES, query_pre_attn_scalar=16,
                   final_logit_softcapping=3.0)
    if model_type == "gemma2":
        return transformers.Gemma2Config(**common, attn_logit_softcapping=2.0)
    rope = {FULL: {"rope_type": "default", "rope_theta": 10000.0},
            SLIDE: {"rope_type": "default", "rope_theta": 100.0}}
    return transformers.Gemma3TextConfig(**common, rope_parameters=rope)


LLAVA_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


def _clip_and_llama(tokenizer, layers: int = 2):
    """The LLaVA models' parts in small: an ``<image>`` token and its chat template, a CLIP tower of ``layers``
    layers over 64×64 images of 16-px patches, a Llama decoder's config."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = LLAVA_TEMPLATE
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                           num_attention_heads=2, image_size=64, patch_size=16)
    text = dict(_text(tokenizer, head_dim=16), model_type="llama",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return vision, text


def _llava(tokenizer):
    """LLaVA-1.5 in small: a 3-layer CLIP tower over 64×64 crops of 16-px patches (a 4×4 grid) whose features are
    layer −2's (the input of the last block: two blocks reach the decoder, the third changes nothing), a Llama
    decoder."""
    vision, text = _clip_and_llama(tokenizer, layers=3)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      image_seq_length=16, tie_word_embeddings=False)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=LLAVA_TEMPLATE)
    return transformers.LlavaForConditionalGeneration(config), processor


PINPOINTS = [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]  # LLaVA-NeXT's 336-px list, scaled to 64 px


def _llava_next(tokenizer):
    """LLaVA-NeXT in small: the base image and "anyres" tiles of 64×64 (a 4×4 grid of 16-px patches each), best fit
    among ``PINPOINTS``, a learned image newline after each row of the tiles' unpadded feature map; a 3-layer CLIP
    tower whose features are layer −2's (two blocks reach the decoder, as in ``_llava``); a Llama decoder."""
    vision, text = _clip_and_llama(tokenizer, layers=3)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text,
                                          image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                                          image_grid_pinpoints=PINPOINTS, image_seq_length=16,
                                          tie_word_embeddings=False)
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_grid_pinpoints=PINPOINTS,
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                                                vision_feature_select_strategy="default",
                                                num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return transformers.LlavaNextForConditionalGeneration(config), processor


OV_PINPOINTS = [[64 * i, 64 * j] for i in range(1, 7) for j in range(1, 7)]  # OneVision's 384-px list at 64 px


def _llava_onevision(tokenizer):
    """LLaVA-OneVision in small: a 2-layer SigLIP tower over 64×64 views of 16-px patches (a 4×4 grid), tiles among
    ``OV_PINPOINTS`` (1 to 6 tiles a side, as the 7B models' 384-px list), the tile map pooled beyond
    ``anyres_max_4`` (so that pooling acts on small test pictures: a 150×100 one's 8×12 map becomes 6×9), a Qwen2
    decoder with sliding layers."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tokenizer.chat_template = LLAVA_TEMPLATE
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=64, patch_size=16)
    text = dict(_text(tokenizer), model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW,
                layer_types=LAYER_TYPES, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                               image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                               video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                                               vision_aspect_ratio="anyres_max_4", image_grid_pinpoints=OV_PINPOINTS,
                                               tie_word_embeddings=False)
    image_processor = transformers.LlavaOnevisionImageProcessor(
        size={"height": 64, "width": 64}, image_grid_pinpoints=OV_PINPOINTS, image_mean=[0.5] * 3,
        image_std=[0.5] * 3)
    video_processor = transformers.LlavaOnevisionVideoProcessor(size={"height": 64, "width": 64})
    processor = transformers.LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                     video_processor=video_processor, num_image_tokens=16,
                                                     vision_feature_select_strategy="full",
                                                     vision_aspect_ratio="anyres_max_4", chat_template=LLAVA_TEMPLATE)
    return transformers.LlavaOnevisionForConditionalGeneration(config), processor


GEMMA3_IMAGE = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")  # boi, eoi, image soft token


def _gemma3_vl(tokenizer, folder: Path):
    """Gemma 3 with images in small: a 2-layer SigLIP tower over 64×64 pictures of 16-px patches (4×4), pooled 2×2
    to ``mm_tokens_per_image`` = 4 tokens (the projection drawn at random: transformers initialises it to zero); a
    Gemma 3 decoder with sliding layers of ``WINDOW`` and a local rotary base. The tokenizer names its boi, eoi and image tokens as Gemma 3's does (``tokenizer_config.json``), which the
    genuine ``Gemma3Processor`` reads."""
    boi, eoi, image = GEMMA3_IMAGE
    tokenizer.add_special_tokens({"additional_special_tokens": list(GEMMA3_IMAGE)})
    tokenizer.chat_template = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", boi)
    tokenizer.save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, boi_token=boi, eoi_token=eoi, image_token=image)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=64, patch_size=16)
    rope = {FULL: {"rope_type": "default", "rope_theta": 10000.0},
            SLIDE: {"rope_type": "default", "rope_theta": 100.0}}
    text = dict(_text(tokenizer, head_dim=16, sliding_window=WINDOW, layer_types=LAYER_TYPES, query_pre_attn_scalar=16,
                      rope_parameters=rope), model_type="gemma3_text")
    ids = tokenizer.convert_tokens_to_ids(list(GEMMA3_IMAGE))
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=ids[0], eoi_token_index=ids[1], image_token_index=ids[2],
                                       tie_word_embeddings=False)
    image_processor = transformers.Gemma3ImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
                                                        image_std=[0.5] * 3)
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=tokenizer.chat_template, image_seq_length=4)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zero (every image token alike); trained checkpoints have one
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.1)
    return model, processor


def build_tiny(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A tiny random-weight checkpoint of ``model_type`` in ``folder``; deterministic for a given seed."""
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        return build_demo(folder, True, seed=seed, moe=model_type == "qwen3_vl_moe")
    if model_type in ("qwen3", "qwen2", "llama", "mistral"):
        overrides = {"mistral": {"sliding_window": WINDOW},
                     "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "layer_types": LAYER_TYPES},
                     "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "layer_types": LAYER_TYPES}}
        return build_demo(folder, False, seed=seed, text_model_type=model_type, text_config=overrides.get(model_type))
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        windowed = model_type == "qwen2_5_vl"
        config = _qwen2_vl_config(tokenizer, windowed)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration if windowed else \
            transformers.Qwen2VLForConditionalGeneration
        model = model_class(config)
        _qwen2_vl_processor(tokenizer, windowed).save_pretrained(folder)
    elif model_type in ("llava", "llava_next", "llava_onevision"):
        model, processor = {"llava": _llava, "llava_next": _llava_next,
                            "llava_onevision": _llava_onevision}[model_type](tokenizer)
        processor.save_pretrained(folder)
    elif model_type == "gemma3":
        model, processor = _gemma3_vl(tokenizer, folder)
        processor.save_pretrained(folder)
    elif model_type in ("gemma2", "gemma3_text"):
        config = _gemma_config(tokenizer, model_type)
        model = transformers.AutoModelForCausalLM.from_config(config)
        tokenizer.save_pretrained(folder)
    else:
        raise ValueError(f"no tiny checkpoint for model type {model_type!r}")
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.save_pretrained(folder)
    return folder
