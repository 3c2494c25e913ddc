"""LLaVA-NeXT (``llava_next``): LLaVA-1.5's tower, projector and decoder, with "anyres" tiles and image newlines.

Decoder inputs as LLaVA-1.5 (``llava.py``): projected CLIP features scattered into the ``<image>`` placeholders,
plain 1-D positions, the language model's own masks; the features come from ``get_image_features(pixel_values,
image_sizes)``. The decoder stage, occlusion (``--stage pixels``) and the ViT knockout (``--stage vision-encoder``).

Geometry (what ``LlavaNextImageProcessor`` and ``pack_image_features`` do, with transformers' own functions):

- the **base** view: the whole image squashed to ``crop_size`` (e.g. 336²), a g×g grid of patches (g = crop / patch,
  24 in the 7B models), one token per patch, row by row (``t = 0``, ``part = "base"``); a token's box is its share
  of the whole picture;
- the **tiles**: the best resolution among ``image_grid_pinpoints`` (``select_best_resolution``), the image resized
  into it keeping its aspect (``get_patch_output_size``) and padded to it centred (left/top ``(target − size) // 2``),
  cut into crop-size tiles; their features form one map of (tiles down · g) × (tiles across · g) cells of ``patch``
  pixels of that canvas, from which ``unpad_image`` drops the rows (or columns) that are padding. The kept cells
  come row by row (``t = 1``, ``part = "tiles"``), each row followed by one **image newline** token (``part =
  "newline"``, no column, no box: it is a learned vector, not pixels). A tile token's box is its cell on the canvas,
  less the padding offset, scaled back to the original picture and clipped to it. Every kept cell overlaps the
  picture (``layout_cell`` says why), so every tile token has a box.

``ImageInfo.layout`` records the arithmetic (canvas, resized size, padding offset, kept rows and columns), so
``units.exact_box`` and the viewer get the same boxes. ``--unit region:N`` groups N×N blocks of each view's grid
and leaves out tokens without a box; ``image`` includes every token of the image, newlines too.

Occlusion: the patch rows are each image's own views (the views padding ``pixel_values`` to the most views of the
prompt's images dropped), view by view, each view's patches row by row (``patch_rows``); the model takes them back
as one (views, C, H, W) tensor, which ``get_image_features`` splits by ``image_sizes`` (``grid_of``). A token's patch
is named from the layout (``layout_patches``: a base token its patch of the base view, a tile token its kept cell of
the canvas in the tile holding it, a newline none) and placed in the picture by ``layout_patch_box``;
``patches.PatchLayout`` reads both for an image that records a layout.

The vision encoder (``--stage vision-encoder``): each view is its own CLIP sequence (CLS at position 0, then the
view's patches row by row), the prompt's views one batch, in the order of the patch rows (``vision_views``,
``vision_sequence``). A unit is the same set of patches as in occlusion (a token's patch, a region's, an image's
over all its views); knocking it out blocks, in each view's sequence, every other position (CLS included) from the
unit's patches of that view, at the blocks of the window below ``vision_feature_layer``: LLaVA-1.5's rule view by
view (a query of one view never attends to another view's patches anyway). A newline has no patch and is no unit.
``vision_rerun`` re-runs the image's views for a batch of copies, takes the feature layer's states, drops CLS,
projects them and packs them (``pack_image_features``: the tiles unpadded, the newlines appended) as
``get_image_features`` does.
"""

from __future__ import annotations

import functools

import torch
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from ..errors import UsageError, bounded
from .base import LayerInputs, register
from .llava import Llava


def anyres_layout(width: int, height: int, pinpoints: list, tile: int, patch: int) -> dict:
    """The tile arithmetic for an image of ``width``×``height`` (``tile``: crop size = the tower's image size)."""
    canvas_h, canvas_w = select_best_resolution((height, width), pinpoints)
    tiles_down, tiles_across = get_anyres_image_grid_shape((height, width), pinpoints, tile)
    shape = torch.empty(()).expand(1, height, width)  # only its shape is read
    resized_h, resized_w = get_patch_output_size(shape, (canvas_h, canvas_w), ChannelDimension.FIRST)
    grid = tile // patch
    rows, cols = tiles_down * grid, tiles_across * grid
    index = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"))  # (2, rows, cols)
    kept = unpad_image(index, [height, width])  # what pack_image_features keeps of the feature map
    # unpad_image cuts one axis; a strip so thin that it keeps none of it leaves the other axis whole
    kept_rows = kept[0, :, 0].tolist() if kept.shape[2] else list(range(kept.shape[1]))
    kept_cols = kept[1, 0, :].tolist() if kept.shape[1] else list(range(kept.shape[2]))
    return {"base_grid": grid, "patch": patch, "canvas": [canvas_w, canvas_h], "tiles": [tiles_across, tiles_down],
            "resized": [resized_w, resized_h], "offset": [(canvas_w - resized_w) // 2, (canvas_h - resized_h) // 2],
            "rows": kept_rows, "cols": kept_cols}


def tiles_shape(layout: dict) -> tuple[int, int]:
    """(rows, columns) of the tiles' part in the decoder: the kept cells, or LLaVA-OneVision's pooled grid."""
    return tuple(layout["out"]) if layout.get("out") else (len(layout["rows"]), len(layout["cols"]))


def layout_tokens(layout: dict) -> int:
    """Decoder tokens of one image: base grid, kept (or pooled) cells, one newline per row (LLaVA-OneVision's
    padded square of a multi-image prompt: base grid and one newline)."""
    if "square" in layout:
        return layout["base_grid"] ** 2 + 1
    rows, cols = tiles_shape(layout)
    return layout["base_grid"] ** 2 + rows * (cols + 1)


def layout_cell(layout: dict, width: int, height: int, n: int) -> tuple[int, int, int | None, str, tuple | None]:
    """(t, row, col, part, box) of an image's ``n``-th token; box unrounded ``(x0, y0, x1, y1)`` or None."""
    grid = layout["base_grid"]
    if "square" in layout:
        return square_cell(layout, width, height, n)
    if n < grid * grid:
        row, col = divmod(n, grid)
        return 0, row, col, "base", (col * width / grid, row * height / grid, (col + 1) * width / grid,
                                     (row + 1) * height / grid)
    out_rows, out_cols = tiles_shape(layout)
    row, col = divmod(n - grid * grid, out_cols + 1)
    if col == out_cols:
        return 1, row, None, "newline", None
    p, (ox, oy), (rw, rh) = layout["patch"], layout["offset"], layout["resized"]
    # the token's share of the kept map (a pooled token: the out/in share around its bilinear sample point)
    sr, sc = len(layout["rows"]) / out_rows, len(layout["cols"]) / out_cols
    r0, r1 = layout["rows"][0] + row * sr, layout["rows"][0] + (row + 1) * sr
    c0, c1 = layout["cols"][0] + col * sc, layout["cols"][0] + (col + 1) * sc
    sx, sy = width / rw, height / rh
    x0, y0 = max(0.0, (c0 * p - ox) * sx), max(0.0, (r0 * p - oy) * sy)
    x1, y1 = min(float(width), (c1 * p - ox) * sx), min(float(height), (r1 * p - oy) * sy)
    # No kept cell lies wholly in the padding. Say the picture (H×W) is padded above and below; R rows of p-px
    # cells, x = H·C/W its height in cells. The processor pads o = (R·p − ⌈x·p⌉) // 2 ≤ (R − x)·p/2 pixels on top
    # and b = ⌈(R·p − ⌈x·p⌉) / 2⌉ ≤ (R − x)·p/2 + 1/2 below; unpad_image keeps rows k .. R−k−1 with
    # k = (R − n) // 2, n = int(round(x, 7)) ≤ x + 5e-8, so (k + 1)·p ≥ (R − x + 1 − 5e-8)·p/2. The first kept row
    # ends below o, and the last starts above the bottom padding unless 1/2 ≥ (1 − 5e-8)·p/2, i.e. p ≤ 1. (A
    # pooled share holds at least one whole kept cell on each axis.) tests/test_families.py checks it over sizes.
    if x1 <= x0 or y1 <= y0:
        raise RuntimeError(f"tile cell row {row}, col {col} of a {width}×{height} picture lies wholly in the padding; "
                           "transformers' unpad arithmetic is not the one this geometry reproduces")
    return 1, row, col, "tiles", (x0, y0, x1, y1)


def layout_patches(layout: dict, n: int) -> list[tuple[int, int, int]]:
    """The patches an image's ``n``-th token is made of, as (view, patch row, patch column) of the views in
    ``pixel_values`` (0: the base view; 1 + i: tile i, row-major over the canvas): a base token its patch, a tile token
    its cell of the canvas (the tile holding it, the cell inside that tile), a newline none. A pooled tile token
    (LLaVA-OneVision's map resized by bilinear interpolation) is made of the cells its sample reads with a weight
    above zero (``bilinear_taps``: one or two kept rows times one or two kept columns)."""
    grid = layout["base_grid"]
    if "square" in layout:
        return [] if n == grid * grid else [(0, *divmod(n, grid))]
    if n < grid * grid:
        return [(0, *divmod(n, grid))]
    out_rows, out_cols = tiles_shape(layout)
    row, col = divmod(n - grid * grid, out_cols + 1)
    if col == out_cols:
        return []  # an image newline: a learned vector, no pixels
    kept_rows, kept_cols = [row], [col]
    if layout.get("pooled"):
        kept_rows = bilinear_taps(len(layout["rows"]), out_rows)[row]
        kept_cols = bilinear_taps(len(layout["cols"]), out_cols)[col]
    patches = []
    for cell_row in (layout["rows"][r] for r in kept_rows):
        for cell_col in (layout["cols"][c] for c in kept_cols):
            tile = (cell_row // grid) * layout["tiles"][0] + cell_col // grid
            patches.append((1 + tile, cell_row % grid, cell_col % grid))
    return patches


@functools.lru_cache(maxsize=256)
def bilinear_taps(size_in: int, size_out: int) -> tuple[tuple[int, ...], ...]:
    """For each of the ``size_out`` samples of a bilinear resize of ``size_in`` values (torch's, without
    ``align_corners``, as ``pack_image_features`` pools the tile map), the inputs it reads with a weight above zero:
    torch's own interpolation of each input alone (bilinear weights are a product of one weight per axis, so an axis
    at a time gives the 2-D taps)."""
    alone = torch.eye(size_in, dtype=torch.float32)[None, :, :, None]  # (1, in, in, 1): channel k holds input k only
    weights = torch.nn.functional.interpolate(alone, size=[size_out, 1], mode="bilinear")[0, :, :, 0]  # (in, out)
    return tuple(tuple(torch.nonzero(weights[:, i] > 0).flatten().tolist()) for i in range(size_out))


def layout_patch_box(layout: dict, width: int, height: int, view: int, row: int, col: int) -> tuple:
    """A patch's box ``(x0, y0, x1, y1)`` in original-image pixels, unrounded: in the base view its g×g share of the
    picture; in a tile its cell of the canvas, less the padding offset, scaled back and clipped to the picture (a
    patch of a token's cell: it overlaps the picture, ``layout_cell``)."""
    grid = layout["base_grid"]
    if view == 0:
        return layout_cell(layout, width, height, row * grid + col)[4]
    p, (ox, oy), (rw, rh) = layout["patch"], layout["offset"], layout["resized"]
    tile_row, tile_col = divmod(view - 1, layout["tiles"][0])
    r, c = tile_row * grid + row, tile_col * grid + col
    sx, sy = width / rw, height / rh
    return (max(0.0, (c * p - ox) * sx), max(0.0, (r * p - oy) * sy), min(float(width), ((c + 1) * p - ox) * sx),
            min(float(height), ((r + 1) * p - oy) * sy))


def square_cell(layout: dict, width: int, height: int, n: int) -> tuple[int, int, int | None, str, tuple | None]:
    """LLaVA-OneVision's one view of an image in a multi-image prompt: the picture padded to a ``square`` (its
    longer side) at ``offset`` (left, top), squashed to the tower's input, g×g patches, then one newline after the
    last row. A patch wholly in the padding has no box (``part = "padding"``)."""
    grid, side, (left, top) = layout["base_grid"], layout["square"], layout["offset"]
    if n == grid * grid:
        return 0, grid - 1, None, "newline", None
    row, col = divmod(n, grid)
    x0, y0 = max(0.0, col * side / grid - left), max(0.0, row * side / grid - top)
    x1, y1 = min(float(width), (col + 1) * side / grid - left), min(float(height), (row + 1) * side / grid - top)
    if x1 <= x0 or y1 <= y0:
        return 0, row, col, "padding", None
    return 0, row, col, "base", (x0, y0, x1, y1)


class AnyresLimits:
    """The processor's fixed sizes: nothing to set (``--min-pixels``/``--max-pixels`` are refused)."""

    def __init__(self, pinpoints: list, tile: int, patch: int):
        self.pinpoints, self.tile, self.patch = pinpoints, tile, patch

    def layout(self, width: int, height: int, path: str) -> dict:
        if min(width, height) < 1:
            raise UsageError(f"image {bounded(path)} is empty")
        return anyres_layout(width, height, self.pinpoints, self.tile, self.patch)

    def resized(self, width: int, height: int, path: str) -> tuple[int, int]:
        return tuple(self.layout(width, height, path)["resized"])

    def tokens(self, width: int, height: int, path: str) -> int:
        return layout_tokens(self.layout(width, height, path))

    def describe(self, width: int, height: int, new_width: int, new_height: int) -> str:
        layout = self.layout(width, height, "")
        (cw, ch), (across, down) = layout["canvas"], layout["tiles"]
        return (f"base view squashed to {self.tile}×{self.tile}; tiles: resized to {new_width}×{new_height}, "
                f"padded to {cw}×{ch} ({across}×{down} tiles of {self.tile} px)")

    def processor_kwargs(self) -> dict:
        return {}


@register
class LlavaNext(Llava):
    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"
    label = "LLaVA-NeXT"
    stages = ("decoder", "pixels", "vision-encoder")

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        inner = self.model.model
        hidden = inner.get_input_embeddings()(input_ids)  # (1, S, H)
        visual_mask = None
        if model_kwargs.get("pixel_values") is not None:
            features = inner.get_image_features(pixel_values=model_kwargs["pixel_values"],
                                                image_sizes=model_kwargs["image_sizes"], return_dict=True,
                                                **self.feature_kwargs(model_kwargs))
            image_embeds = torch.cat(features.pooler_output, dim=0).to(hidden.device, hidden.dtype)
            visual_mask = (input_ids[0] == self.model.config.image_token_id)  # (S,)
            hidden = hidden.masked_scatter(visual_mask[None, :, None].expand_as(hidden), image_embeds)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, S)
        return LayerInputs(hidden, positions, visual_mask)

    def feature_kwargs(self, model_kwargs: dict) -> dict:
        """What else ``get_image_features`` takes from the processor's output (LLaVA-OneVision: ``batch_num_images``)."""
        return {}

    # --- the picture as patches: its views' patches, view by view (the pixels stage) -----------------------------

    def patch_rows(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """(images, most views, C, H, W) → one row per ``patch_size`` square of each image's own views (the base view,
        then the tiles, row-major over the canvas; the views padding an image to the most views are dropped: ``grid``,
        ``grid_of``'s image sizes, says how many it has), each view's patches row by row: rows of a (views, g, g) grid
        per image, one patch per token (``patches.PatchLayout`` names a tile token's patch from the image's
        layout)."""
        if pixel_values.dim() == 5:
            views = [int(v) for v in self.view_counts(grid)] if grid is not None else [pixel_values.shape[1]] * len(
                pixel_values)
            pixel_values = torch.cat([image[:count] for image, count in zip(pixel_values, views)])
        return Llava.patch_rows(self, pixel_values)

    def pixel_values_of(self, rows: torch.Tensor) -> torch.Tensor:
        """``patch_rows`` undone as the model also takes it: (all views, C, H, W), the images' views one after the
        other, unpadded (``get_image_features`` splits them by ``image_sizes``)."""
        return Llava.pixel_values_of(self, rows)

    def grid_of(self, prompt) -> torch.Tensor:
        """(images, 2) each image's original (height, width): the ``image_sizes`` its views follow from."""
        return torch.tensor([[image.height, image.width] for image in prompt.images])

    def view_counts(self, image_sizes: torch.Tensor) -> list[int]:
        return [1 + down * across for down, across in (
            get_anyres_image_grid_shape((int(h), int(w)), self.model.config.image_grid_pinpoints, self.tile)
            for h, w in image_sizes.tolist())]

    def image_features(self, rows: torch.Tensor, grid: torch.Tensor):
        """The projected, packed features (``pooler_output``: per image (tokens, H), newlines included) of the patch
        rows of whole images whose original sizes are ``grid`` (images, 2)."""
        return self.model.model.get_image_features(pixel_values=self.pixel_values_of(rows), image_sizes=grid,
                                                   return_dict=True, **self.feature_kwargs({}))

    # --- the vision tower's layers: one CLIP sequence per view (the vision-encoder stage) -------------------------

    def vision_views(self, grid_thw) -> int:
        """Each of the image's views (the base view, then the tiles: ``grid_thw``'s t) is one sequence of the tower."""
        return int(grid_thw[0])

    def vision_sequence(self, grid_thw) -> tuple[int, torch.Tensor]:
        """One view's sequence: CLS at position 0, then its patches row by row; a patch row of view v (the rows are
        view by view) at ``v · (1 + g²) + 1 + its place in the view``."""
        views, h, w = (int(v) for v in grid_thw)
        row = torch.arange(views * h * w)
        return 1 + h * w, (row // (h * w)) * (1 + h * w) + 1 + row % (h * w)

    def vision_rerun(self, recorded: list[tuple[tuple, dict]], first: int, image: int, rows: range,
                     batch: int, grid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks ``first ..`` up to the feature layer over ``batch`` copies of the image's views (its patch rows
        ``rows``, g² a view: the views before it are ``rows.start / g²`` sequences of the tower's batch), then what
        ``get_image_features`` does: the feature layer's states, CLS dropped, the projector, ``pack_image_features``
        with the image's original size ``grid`` (height, width): (B, tokens, H), newlines included."""
        per_view = (self.tile // self.patch_size) ** 2
        start, views = rows.start // per_view, len(rows) // per_view
        features = self.projected_views(recorded, first, start, views, batch)  # (B · views, g², H)
        inner = self.model.model
        sizes = grid.reshape(1, 2).repeat(batch, 1).to(features.device)
        packed, _ = inner.pack_image_features(list(features.split(views)), sizes,
                                              vision_feature_select_strategy=self.model.config
                                              .vision_feature_select_strategy, image_newline=inner.image_newline)
        return torch.stack(packed), {}

    @property
    def tile(self) -> int:
        return self.model.config.vision_config.image_size

    def pixel_limits(self, image_processor, min_pixels: int | None, max_pixels: int | None) -> AnyresLimits:
        self.fixed_size_only(min_pixels, max_pixels, "fixed sizes")
        size, crop = image_processor.size, image_processor.crop_size
        edge = size.get("shortest_edge") or (size.get("height") if size.get("height") == size.get("width") else None)
        if edge != self.tile or (crop["height"], crop["width"]) != (self.tile, self.tile):
            raise UsageError(f"this llava_next processor's size {dict(size)} / crop_size {dict(crop)} differ from the "
                             f"vision tower's {self.tile}×{self.tile} input; only matching sizes are supported")
        pinpoints = [list(p) for p in image_processor.image_grid_pinpoints]
        if pinpoints != [list(p) for p in self.model.config.image_grid_pinpoints]:
            raise UsageError("this llava_next processor's image_grid_pinpoints differ from the model's")
        return AnyresLimits(pinpoints, self.tile, self.patch_size)

    def image_grids(self, model_kwargs: dict, count: int) -> list[list[int]]:
        """Per image ``[views, g, g]``: the base view plus its tiles, each a g×g patch grid."""
        grid = self.tile // self.patch_size
        grids = []
        for height, width in model_kwargs["image_sizes"].tolist():
            down, across = get_anyres_image_grid_shape((height, width), self.model.config.image_grid_pinpoints,
                                                       self.tile)
            grids.append([1 + down * across, grid, grid])
        return grids

    def resized_size(self, grid_thw: list[int], limits: AnyresLimits, width: int, height: int,
                     path: str) -> tuple[int, int]:
        """The size the tiles' view was resized to (before its padding)."""
        layout = limits.layout(width, height, path)
        if grid_thw[0] != 1 + layout["tiles"][0] * layout["tiles"][1]:
            raise RuntimeError(f"the processor tiled {path} differently from select_best_resolution")
        return tuple(layout["resized"])

    def crop(self, grid_thw: list[int], resized_width: int, resized_height: int) -> None:
        return None

    def layout(self, limits: AnyresLimits, width: int, height: int, path: str) -> dict:
        return limits.layout(width, height, path)

    def image_tokens(self, image) -> int:
        return layout_tokens(image.layout)

    def token_cell(self, image, n: int):
        t, row, col, part, box = layout_cell(image.layout, image.width, image.height, n)
        return t, row, col, None if box is None else [round(v, 2) for v in box], part

    def view_token_box(self, image, n: int) -> tuple[float, float, float, float] | None:
        return layout_cell(image.layout, image.width, image.height, n)[4]

    def view_token_patches(self, image, n: int) -> list[tuple[int, int, int]]:
        return layout_patches(image.layout, n)

    def view_patch_box(self, image, view: int, row: int, col: int) -> tuple[float, float, float, float] | None:
        return layout_patch_box(image.layout, image.width, image.height, view, row, col)

    def view_colour_patches(self, image) -> list[int]:
        """The base view's patches (the tiles' canvas carries padding); of a view padded to a square (LLaVA-OneVision's
        image among several), the patches that show some of the picture."""
        base = range(image.layout["base_grid"] ** 2)
        if "square" not in image.layout:
            return list(base)
        return [n for n in base if layout_cell(image.layout, image.width, image.height, n)[4] is not None]

    def geometry(self) -> str:
        p, g = self.patch_size, self.tile // self.patch_size
        return (f"anyres: t 0 the base view (whole image squashed to {self.tile}×{self.tile}, {g}×{g} patches of "
                f"{p} px), t 1 the tiles' unpadded map of {p}-px cells, row by row, each row ended by an image "
                "newline token (part 'newline': no column, no box); boxes in original-image pixels (images[].layout)")
