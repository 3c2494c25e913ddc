"""The token table: counts, merged-grid cells and original-pixel boxes of vision tokens."""

from __future__ import annotations

import math

import pytest

from mask_impact.inputs import build_prompt


def _vision(prompt, image=None):
    return [t for t in prompt.tokens if t.modality == "vision" and (image is None or t.image == image)]


@pytest.mark.parametrize("name", ["wide", "square", "odd"])
def test_vision_token_count_and_boxes(vl_model, images, name):
    prompt = build_prompt(vl_model, "Describe it.", [images[name]])
    info = prompt.images[0]
    merge = vl_model.model.config.vision_config.spatial_merge_size
    patch = vl_model.model.config.vision_config.patch_size
    t, h, w = info.grid_thw
    tokens = _vision(prompt)
    assert len(tokens) == t * h * w // merge**2
    assert (info.resized_width, info.resized_height) == (w * patch, h * patch)
    cols, rows = w // merge, h // merge
    # row-major over the merged grid, consecutive positions
    assert [(tok.row, tok.col) for tok in tokens] == [(r, c) for r in range(rows) for c in range(cols)]
    assert [tok.index for tok in tokens] == list(range(tokens[0].index, tokens[0].index + len(tokens)))
    # the boxes tile the original image exactly
    assert tokens[0].box[:2] == [0, 0]
    assert tokens[-1].box[2:] == pytest.approx([info.width, info.height])
    sx, sy = info.width / info.resized_width, info.height / info.resized_height
    for tok in tokens:
        x0, y0, x1, y1 = tok.box
        assert x0 == pytest.approx(tok.col * patch * merge * sx, abs=0.01)
        assert y1 == pytest.approx((tok.row + 1) * patch * merge * sy, abs=0.01)


def test_wide_image_has_twice_as_many_columns(vl_model, images):
    prompt = build_prompt(vl_model, "Describe it.", [images["wide"]])  # 128 x 64
    tokens = _vision(prompt)
    assert max(t.col for t in tokens) + 1 == 2 * (max(t.row for t in tokens) + 1)
    assert all(math.isclose(t.box[2] - t.box[0], t.box[3] - t.box[1]) for t in tokens)


def test_resized_image_boxes_map_back_by_the_resize_ratio(vl_model, images):
    prompt = build_prompt(vl_model, "Describe it.", [images["odd"]])  # 300 x 150, resized by the processor
    info = prompt.images[0]
    assert (info.resized_width, info.resized_height) != (info.width, info.height)
    last = _vision(prompt)[-1]
    assert last.box == pytest.approx([info.width - 32 * info.width / info.resized_width,
                                      info.height - 32 * info.height / info.resized_height,
                                      info.width, info.height], abs=0.01)


def test_two_images_are_numbered_in_prompt_order(vl_model, images):
    prompt = build_prompt(vl_model, "Compare them.", [images["wide"], images["square"]])
    first, second = _vision(prompt, 0), _vision(prompt, 1)
    assert len(first) == 8 and len(second) == 9  # 128x64 → 4x2 tokens; 96x96 → 3x3 tokens
    assert first[-1].index < second[0].index
    assert second[0].box == [0, 0, 32, 32] and second[-1].box == [64, 64, 96, 96]
    assert [t.image for t in prompt.tokens if t.modality == "vision"] == [0] * 8 + [1] * 9
    groups = prompt.vision_groups().tolist()
    assert groups.count(0) == 8 and groups.count(1) == 9 and groups.count(-1) == prompt.length - 17


def test_special_and_text_modalities(vl_model, images):
    prompt = build_prompt(vl_model, "Describe it.", [images["square"]])
    texts = {t.text: t.modality for t in prompt.tokens}
    assert texts["<|im_start|>"] == "special" and texts["<|vision_start|>"] == "special"
    assert texts["<|vision_end|>"] == "special" and texts["<|im_end|>"] == "special"
    assert texts["user"] == "text" and texts["\n"] == "text"
    assert all(t.box is None and t.row is None for t in prompt.tokens if t.modality != "vision")


def test_text_model_prompt_has_no_vision_tokens(text_model):
    prompt = build_prompt(text_model, "The capital of France is", [])
    assert prompt.model_kwargs == {}
    assert {t.modality for t in prompt.tokens} == {"text", "special"}
    assert "".join(t.text for t in prompt.tokens).startswith("<|im_start|>user\nThe capital of France is")
