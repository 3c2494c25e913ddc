"""Prompt and images → model inputs and the token table (DESIGN.md §5).

Every position of the prompt gets a row: its token, its modality (``text``, ``vision`` or
``special``) and, for vision tokens, which image, the merged-grid cell (t, row, col) and the pixel
box it covers in the *original* image. Qwen3-VL orders an image's tokens t, then row, then column
over the merged grid; one token covers ``patch_size * merge_size`` pixels square of the resized
image, which we map back by the resize ratio.
"""

from __future__ import annotations

import base64
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .config import UsageError


@dataclass
class ImageInfo:
    path: str
    width: int
    height: int
    grid_thw: list[int]  # in patches, as the processor reports it
    resized_width: int
    resized_height: int
    thumbnail: str  # data: URL (PNG)


@dataclass
class TokenInfo:
    index: int
    id: int
    text: str
    modality: str  # text | vision | special
    image: int | None = None
    t: int | None = None
    row: int | None = None
    col: int | None = None
    box: list[float] | None = None  # [x0, y0, x1, y1] in original-image pixels


@dataclass
class Prompt:
    text: str  # the user's text
    input_ids: torch.Tensor  # (1, S)
    model_kwargs: dict  # pixel_values, image_grid_thw, mm_token_type_ids (VL only)
    tokens: list[TokenInfo]
    images: list[ImageInfo]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def vision_groups(self) -> torch.Tensor:
        """(S,) image index of every position, -1 where the position is not an image token."""
        return torch.tensor([-1 if tok.image is None else tok.image for tok in self.tokens])

    def token_dicts(self) -> list[dict]:
        return [asdict(tok) for tok in self.tokens]


def read_prompt(value: str) -> str:
    """``--prompt`` is text, or the path of a UTF-8 text file."""
    path = Path(value)
    try:
        exists = len(value) < 4096 and "\0" not in value and path.is_file()
    except OSError:  # a name too long or otherwise impossible: it is prompt text
        exists = False
    looks_like_file = value.endswith((".txt", ".md", ".prompt")) or exists
    if looks_like_file:
        if not path.is_file():
            raise UsageError(f"prompt file {value} does not exist; pass the prompt text or an existing file")
        try:
            value = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"prompt file {value} is not UTF-8 text; save it as UTF-8") from None
    if not value.strip():
        raise UsageError("the prompt is empty; give --prompt some text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
        raise UsageError("the prompt is not valid UTF-8 text") from None
    return value


def load_image(path: str) -> Image.Image:
    if not Path(path).is_file():
        raise UsageError(f"image {path} does not exist; check the --image path")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UsageError(f"image {path} cannot be read ({error.__class__.__name__}); give a PNG or JPEG file") from None


def build_prompt(loaded, text: str, image_paths: list[str], raw_prompt: bool = False,
                 max_pixels: int | None = None) -> Prompt:
    """Apply the chat template (unless ``raw_prompt``), expand images, and build the token table."""
    images = [load_image(path) for path in image_paths]
    if images:
        limit = max_pixels or processor_pixel_limit(loaded.processor)
        for path, image in zip(image_paths, images):
            if limit and image.width * image.height > limit:
                raise UsageError(f"image {path} is {image.width}×{image.height} = {image.width * image.height:,} "
                                 f"pixels, over the limit of {limit:,}; shrink it or raise --max-pixels")
    tokenizer = loaded.tokenizer
    if loaded.is_vl:
        if raw_prompt:
            markup = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
            full_text = text if "<|image_pad|>" in text else markup + text
        else:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
            full_text = loaded.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        encoded = loaded.processor(text=[full_text], images=images or None, return_tensors="pt")
        model_kwargs = {key: encoded[key] for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids")
                        if key in encoded}
    else:
        if images:
            raise UsageError("text-only models take no --image; use mask_impact_vl.py with a Qwen3-VL model")
        if raw_prompt:
            encoded = tokenizer(text, return_tensors="pt")
        else:
            if not tokenizer.chat_template:
                raise UsageError(f"{loaded.name} has no chat template; pass --raw-prompt to use the text as is")
            full_text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False,
                enable_thinking=False,
            )
            encoded = tokenizer(full_text, return_tensors="pt", add_special_tokens=False)
        model_kwargs = {}
    input_ids = encoded["input_ids"]
    grids = model_kwargs.get("image_grid_thw")
    image_infos = [_image_info(path, image, grid.tolist(), loaded) for path, image, grid
                   in zip(image_paths, images, grids if grids is not None else [])]
    tokens = token_table(input_ids[0].tolist(), tokenizer, loaded.model.config, image_infos)
    return Prompt(text, input_ids, model_kwargs, tokens, image_infos)


def processor_pixel_limit(processor) -> int | None:
    """The largest image (in pixels) the processor keeps without shrinking it."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    if size is None:
        return None
    return getattr(size, "longest_edge", None) or (size.get("longest_edge") if isinstance(size, dict) else None)


def _image_info(path: str, image: Image.Image, grid_thw: list[int], loaded) -> ImageInfo:
    patch = loaded.model.config.vision_config.patch_size
    thumb = image.copy()
    thumb.thumbnail((256, 256))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return ImageInfo(path, image.width, image.height, grid_thw, grid_thw[2] * patch, grid_thw[1] * patch, url)


def token_table(ids: list[int], tokenizer, config, images: list[ImageInfo]) -> list[TokenInfo]:
    """One row per position; vision rows carry image index, merged-grid cell and original-pixel box."""
    vision_ids = {getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)} - {None}
    special_ids = {i for i, added in tokenizer.added_tokens_decoder.items() if added.special} - vision_ids
    merge = config.vision_config.spatial_merge_size if images else 1
    patch = config.vision_config.patch_size if images else 1
    image_index, seen = -1, 0
    rows = []
    for index, token_id in enumerate(ids):
        text = tokenizer.decode([token_id])
        if token_id not in vision_ids:
            modality = "special" if token_id in special_ids else "text"
            rows.append(TokenInfo(index, token_id, text, modality))
            continue
        if image_index < 0 or seen == _token_count(images[image_index], merge):
            image_index, seen = image_index + 1, 0
        info = images[image_index]
        grid_h, grid_w = info.grid_thw[1] // merge, info.grid_thw[2] // merge
        t, rest = divmod(seen, grid_h * grid_w)
        row, col = divmod(rest, grid_w)
        cell = patch * merge
        sx, sy = info.width / info.resized_width, info.height / info.resized_height
        box = [round(col * cell * sx, 2), round(row * cell * sy, 2),
               round((col + 1) * cell * sx, 2), round((row + 1) * cell * sy, 2)]
        rows.append(TokenInfo(index, token_id, text, "vision", image_index, t, row, col, box))
        seen += 1
    return rows


def _token_count(image: ImageInfo, merge: int) -> int:
    t, h, w = image.grid_thw
    return t * h * w // (merge * merge)
