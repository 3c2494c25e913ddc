"""The token table: counts, merged-grid cells and original-pixel boxes of vision tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mask_impact.inputs import build_prompt
from mask_impact.units import parse_group, resolve_group


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


# EXIF orientation N → the stored pixels of a picture shown as D (EXIF 2.3: where the stored 0th row and 0th column
# lie in the shown picture), written from the standard, not from Pillow's table.
STORED = {1: lambda d: d, 2: lambda d: d[:, ::-1], 3: lambda d: d[::-1, ::-1], 4: lambda d: d[::-1],
          5: lambda d: d.transpose(1, 0, 2), 6: lambda d: np.rot90(d, 1), 7: lambda d: d[::-1, ::-1].transpose(1, 0, 2),
          8: lambda d: np.rot90(d, -1)}


def _shown_picture() -> np.ndarray:
    """A 64-wide, 128-tall picture (2 × 4 tokens) with a red square in its top-left token only."""
    shown = np.full((128, 64, 3), (40, 90, 160), np.uint8)
    shown[4:28, 4:28] = (230, 30, 30)
    return shown


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_exif_orientation_is_applied_as_viewers_show_the_picture(vl_model, tmp_path, orientation):
    shown = _shown_picture()
    plain = tmp_path / "shown.png"
    Image.fromarray(shown).save(plain)
    tagged = tmp_path / f"stored{orientation}.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(STORED[orientation](shown))).save(tagged, exif=exif)

    expected = build_prompt(vl_model, "Where is the red square?", [str(plain)])
    prompt = build_prompt(vl_model, "Where is the red square?", [str(tagged)])
    info = prompt.images[0]
    assert (info.width, info.height) == (64, 128)
    assert info.grid_thw == expected.images[0].grid_thw
    assert max(t.row for t in _vision(prompt)) + 1 == 4 and max(t.col for t in _vision(prompt)) + 1 == 2
    assert torch.equal(prompt.model_kwargs["pixel_values"], expected.model_kwargs["pixel_values"])
    assert [t.box for t in prompt.tokens] == [t.box for t in expected.tokens]
    assert info.thumbnail == expected.images[0].thumbnail  # the overlay's picture is the shown one too
    assert any(f"EXIF orientation {orientation}" in note for note in info.notes) == (orientation != 1)
    # a box drawn around the square where a viewer shows it selects the token whose pixels hold the square
    group = resolve_group(parse_group("square=0,0,32,32"), prompt, vl_model.tokenizer)
    (token,) = [prompt.tokens[p] for p in group.positions]
    assert (token.row, token.col, token.box) == (0, 0, [0, 0, 32, 32])


def test_a_sideways_phone_photo_is_analysed_upright(vl_model, tmp_path):
    """A 128×64 JPEG tagged 'turn 90° clockwise' is the 64×128 picture every viewer shows: 4 rows × 2 columns."""
    stored = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(STORED[6](_shown_picture()))).save(stored, quality=95, exif=exif)
    prompt = build_prompt(vl_model, "Describe it.", [str(stored)])
    tokens = _vision(prompt)
    assert (prompt.images[0].width, prompt.images[0].height) == (64, 128)
    assert (max(t.row for t in tokens) + 1, max(t.col for t in tokens) + 1) == (4, 2)
