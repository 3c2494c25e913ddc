"""Picture files as image viewers show them: the EXIF orientation a camera writes instead of turning the pixels.

A phone stores a portrait photo as landscape pixels tagged "turn 90° clockwise"; every viewer, and transformers'
own ``load_image``, shows it upright. The tool applies the tag before anything else (sizes, the processor's
input, boxes, thumbnails), so a box drawn on the picture a user sees selects the tokens that see it. Light on
purpose (Pillow only): the figures read pictures through it without importing torch.
"""

from __future__ import annotations

from PIL import Image, ImageOps

# EXIF orientation (tag 0x0112) → what a viewer does to the stored pixels to show them (EXIF 2.3, "Orientation")
ORIENTATIONS = {2: "mirrored left to right", 3: "turned 180°", 4: "mirrored top to bottom",
                5: "mirrored across the main diagonal", 6: "turned 90° clockwise",
                7: "mirrored across the other diagonal", 8: "turned 90° counter-clockwise"}
EXIF_ORIENTATION = 0x0112


def orientation_of(image: Image.Image) -> int:
    """The EXIF orientation of ``image`` (1 where there is none, or one that is not understood)."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError):  # a damaged EXIF block: the pixels as stored
        return 1
    return orientation if orientation in ORIENTATIONS else 1


def upright(image: Image.Image) -> Image.Image:
    """The picture as image viewers (and transformers' ``load_image``) show it: its EXIF orientation applied with
    Pillow's ``ImageOps.exif_transpose`` (Pillow's TIFF reader applies it itself on load, and then drops the tag)."""
    return ImageOps.exif_transpose(image) if orientation_of(image) != 1 else image
