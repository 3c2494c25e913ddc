"""Where each image's patches lie among the patch rows of ``pixel_values``, and in the picture.

The Qwen processors turn each image into ``pixel_values``: one row per 16×16 patch of the *resized* image (its
temporal copies included), ordered image by image, then t, then decoder token (row, column of the merged grid),
then the ``merge × merge`` patches inside that token. Other families give their pictures in that form through
their adapter (``patch_rows``: LLaVA-1.5's crop, one 14×14 patch per token; Gemma 3's square, the k×k patches
each token's pooling averages). The occlusion and vision-encoder stages name a unit's
patches by these rows (``units.pixel_units``) and their engines replace or knock out exactly those.

An image whose family records its views (``ImageInfo.layout``: LLaVA-NeXT's base view and tiles) has its rows in a
(views, g, g) grid, but a token's patches are not at a fixed stride: the family's adapter (the prompt's) names them
(``view_token_patches``: a newline token has none, a pooled LLaVA-OneVision tile token up to four), places a patch
of any view in the picture (``view_patch_box``) and says which patches give the mean colour (``view_colour_patches``:
LLaVA-NeXT's base view, the tiles' canvas carrying padding).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PatchLayout:
    """Where each image's patches sit among ``pixel_values``' rows."""

    offsets: list[int]  # first row of each image
    grids: list[tuple[int, int, int]]  # (t, h, w) in patches
    merge: int  # spatial merge size: a decoder token is merge × merge patches
    images: list  # the prompt's ImageInfo (``layout``: the family's recorded views, or None)
    adapter: object = None  # the family's adapter, which places the patches of an image with views

    @classmethod
    def of(cls, prompt, merge: int) -> PatchLayout:
        grids = [tuple(image.grid_thw) for image in prompt.images]
        offsets, row = [], 0
        for t, h, w in grids:
            offsets.append(row)
            row += t * h * w
        if any(image.layout is not None for image in prompt.images):
            merge = 1  # one patch per token, in every view
        return cls(offsets, grids, merge, prompt.images, prompt.adapter)

    def layout_of(self, image: int) -> dict | None:
        """The image's recorded views (``ImageInfo.layout``), None for an image that is one grid."""
        return self.images[image].layout

    def rows(self, image: int) -> range:
        t, h, w = self.grids[image]
        return range(self.offsets[image], self.offsets[image] + t * h * w)

    def token_rows(self, image: int, n: int) -> list[int]:
        """The rows of the patches that make image ``image``'s ``n``-th decoder token."""
        if self.layout_of(image) is not None:
            _, h, w = self.grids[image]
            return [self.offsets[image] + (view * h + row) * w + col
                    for view, row, col in self.adapter.view_token_patches(self.images[image], n)]
        size = self.merge * self.merge
        first = self.offsets[image] + n * size
        return list(range(first, first + size))

    def colour_rows(self, image: int) -> list[int] | range:
        """The rows whose mean is the image's mean colour: all of its rows, or those the family names where it has
        views (LLaVA-NeXT: the base view's, the tiles' canvas being padded)."""
        if self.layout_of(image) is None:
            return self.rows(image)
        return [self.offsets[image] + n for n in self.adapter.view_colour_patches(self.images[image])]

    def cell(self, row: int) -> tuple[int, int, int, int]:
        """(image, t, patch row, patch column) of a ``pixel_values`` row."""
        image = max(i for i, offset in enumerate(self.offsets) if offset <= row)
        _, h, w = self.grids[image]
        n, sub = divmod(row - self.offsets[image], self.merge * self.merge)
        per_frame = (h // self.merge) * (w // self.merge)
        t, rest = divmod(n, per_frame)
        block_row, block_col = divmod(rest, w // self.merge)
        dy, dx = divmod(sub, self.merge)
        return image, t, block_row * self.merge + dy, block_col * self.merge + dx


def token_numbers(prompt) -> dict[int, tuple[int, int]]:
    """Prompt position of each vision token → (image, its index among that image's tokens)."""
    counts: dict[int, int] = {}
    numbers = {}
    for tok in prompt.tokens:
        if tok.modality == "vision":
            numbers[tok.index] = (tok.image, counts.get(tok.image, 0))
            counts[tok.image] = counts.get(tok.image, 0) + 1
    return numbers


def patch_rows(prompt, layout: PatchLayout, positions: list[int]) -> list[int]:
    """The ``pixel_values`` rows of the patches under the decoder tokens at ``positions``, each once (LLaVA-OneVision's
    pooled tile tokens share cells)."""
    numbers = token_numbers(prompt)
    return sorted({row for p in positions for row in layout.token_rows(*numbers[p])})


def merge_size(prompt) -> int:
    """Patches per side of a decoder token, from the first image's grid and token count."""
    t, h, w = prompt.images[0].grid_thw
    if prompt.images[0].layout is not None:  # views: one patch per token
        return 1
    tokens = sum(tok.image == 0 for tok in prompt.tokens if tok.modality == "vision")
    return round((t * h * w / tokens) ** 0.5)


def patch_box(prompt, layout: PatchLayout, row: int, exact: bool = False) -> list[float] | None:
    """A patch's box in original-image pixels (rounded to 0.01 for reading, unless ``exact``); None for a patch that
    shows none of the picture."""
    image, view, patch_row, patch_col = layout.cell(row)
    info = prompt.images[image]
    _, h, w = layout.grids[image]
    if layout.layout_of(image) is not None:  # a view's patch: the family places it
        box = layout.adapter.view_patch_box(info, view, patch_row, patch_col)
        if box is None:  # wholly in the padding of a square (LLaVA-OneVision's image among several)
            return None
        box = list(box)
    elif info.crop is None:  # the grid covers the whole resized picture
        side_x, side_y = info.width / w, info.height / h  # a patch's size, mapped back by the resize ratio
        box = [patch_col * side_x, patch_row * side_y, (patch_col + 1) * side_x, (patch_row + 1) * side_y]
    else:  # the grid covers the crop (LLaVA-1.5's centre): its offset and size in the resized picture, mapped back
        left, top, crop_width, crop_height = info.crop
        sx, sy = info.width / info.resized_width, info.height / info.resized_height
        box = [(left + patch_col * crop_width / w) * sx, (top + patch_row * crop_height / h) * sy,
               (left + (patch_col + 1) * crop_width / w) * sx, (top + (patch_row + 1) * crop_height / h) * sy]
    return box if exact else [round(v, 2) for v in box]
