"""Prompt and images → model inputs and the token table (DESIGN.md §5).

Every position of the prompt gets a row: its token, its modality (``text``, ``vision`` or
``special``) and, for vision tokens, which image, the grid cell (t, row, col) and the pixel box it
covers in the *original* image; the family's adapter knows that geometry (``token_cell``) and the
image markup of a raw prompt.
"""

from __future__ import annotations

import base64
import errno
import io
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import UsageError, bounded, mention
from .families.base import TOKEN_TYPES
from .pictures import ORIENTATIONS, orientation_of, upright
from .units import token_spans


@dataclass
class ImageInfo:
    path: str
    width: int
    height: int
    grid_thw: list[int]  # in patches, as the processor reports it
    resized_width: int
    resized_height: int
    thumbnail: str  # data: URL (PNG)
    resize: str = "kept"  # how the processor changed the size: kept | rounded ... | downscaled ... | upscaled ...
    mode: str = "RGB"  # the file's pixel mode before conversion to 8-bit RGB
    notes: list[str] = field(default_factory=list)  # frames dropped, bit depth scaled, transparency
    crop: list[int] | None = None  # [left, top, width, height] of the resized picture the tower sees; None: all
    layout: dict | None = None  # the family's view arithmetic (LLaVA-NeXT/OneVision: anyres tiles, a padded square)
    # data: URL (PNG or JPEG, the smaller) of the picture at up to PICTURE_SIDE px, what overlays and figures draw;
    # None where the picture is no larger than its thumbnail
    picture: str | None = None


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
    part: str | None = None  # which view or kind of vision token (LLaVA-NeXT/OneVision: base, tiles, newline, padding)


@dataclass
class Prompt:
    text: str  # the user's text
    input_ids: torch.Tensor  # (1, S)
    model_kwargs: dict  # pixel_values, image_grid_thw, mm_token_type_ids (VL only)
    tokens: list[TokenInfo]
    images: list[ImageInfo]
    user_positions: list[int] | None = None  # the user's text (None with --raw-prompt: it is all markup)
    # the family's adapter, which places the tokens and patches of an image that records views (ImageInfo.layout)
    adapter: object = field(default=None, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def vision_groups(self) -> torch.Tensor:
        """(S,) image index of every position, -1 where the position is not an image token."""
        return torch.tensor([-1 if tok.image is None else tok.image for tok in self.tokens])

    def token_dicts(self) -> list[dict]:
        return [asdict(tok) for tok in self.tokens]


MAX_PROMPT_CHARS = 4_000_000  # ~1M tokens: longer than any model's context, refused before tokenizing
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb bound, checked before decoding


def check_prompt_text(value: str) -> str:
    """The prompt as given with ``--prompt``: always text, never a file name."""
    if len(value) > MAX_PROMPT_CHARS:
        raise UsageError(f"the prompt has {len(value):,} characters, more than any model's context "
                         f"(limit {MAX_PROMPT_CHARS:,})")
    if not value.strip():
        raise UsageError(f"the prompt is empty; give {mention('prompt')} some text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
        raise UsageError("the prompt is not valid UTF-8 text") from None
    return value


def read_prompt_file(path: str) -> str:
    """``--prompt-file``: a UTF-8 text file (a leading byte-order mark is not part of the prompt)."""
    file = regular_file(path, "prompt file", "prompt_file")
    if file.stat().st_size > 4 * MAX_PROMPT_CHARS:
        raise UsageError(f"prompt file {bounded(path)} is {file.stat().st_size:,} bytes, more than any model's "
                         "context; shorten it")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {bounded(path)} is not UTF-8 text; save it as UTF-8") from None
    if not text.strip():
        raise UsageError(f"prompt file {bounded(path)} is empty")
    return check_prompt_text(text)


def read_prompt(config) -> str:
    """The prompt text of a run, from ``--prompt`` or ``--prompt-file``."""
    if config.prompt_file is not None:
        return read_prompt_file(config.prompt_file)
    return check_prompt_text(config.prompt)


def regular_file(path: str, what: str, option: str) -> Path:
    """``path`` as a regular file, or one line saying exactly what it is instead (``option``: the option that gave
    it)."""
    file = Path(path)
    option = mention(option)
    try:
        info = file.stat()
    except FileNotFoundError:
        broken = file.is_symlink()
        raise UsageError(f"{what} {bounded(path)} " + ("is a broken symbolic link" if broken else "does not exist")
                         + f"; check the {option} path") from None
    except OSError as error:
        reason = "is a symbolic link loop" if error.errno == errno.ELOOP else f"cannot be read ({error.strerror})"
        raise UsageError(f"{what} {bounded(path)} {reason}; check the {option} path") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{what} {bounded(path)} is a folder, not a file; check the {option} path")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{what} {bounded(path)} is not a regular file (a pipe or a device); give a file")
    return file


@dataclass
class ImageFile:
    image: Image.Image  # RGB, what the processor gets
    mode: str  # the file's own pixel mode
    frames: int  # frames in the file; only the first is used
    transparent: bool = False  # had transparency, composited on white
    orientation: int = 1  # the file's EXIF orientation (1: stored as shown), applied before anything else

    def notes(self) -> list[str]:
        notes = []
        if self.orientation != 1:
            notes.append(f"EXIF orientation {self.orientation} applied ({ORIENTATIONS[self.orientation]}), as image "
                         "viewers show the picture; sizes and boxes are in that frame")
        if self.frames > 1:
            notes.append(f"the file has {self.frames} frames; the first is used")
        if self.mode in HIGH_DEPTH:
            notes.append(f"{HIGH_DEPTH[self.mode]} pixels scaled to 8 bits")
        if self.transparent:
            notes.append("transparent pixels composited on white, as the processor does")
        return notes


HIGH_DEPTH = {"I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
              "F": "32-bit float"}
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
def load_image(path: str) -> ImageFile:
    """An image file as the RGB picture the model should see (every Pillow mode converted faithfully)."""
    file = regular_file(path, "image", "images")
    try:
        with Image.open(file) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:  # checked before the pixels are decoded
                raise UsageError(f"image {bounded(path)} is {width}×{height} = {width * height:,} pixels, more than "
                                 f"{MAX_IMAGE_PIXELS:,}; shrink it first")
            frames = getattr(image, "n_frames", 1)
            image.seek(0)
            orientation = orientation_of(image)  # read before loading, which may apply it (TIFF)
            image.load()
            shown = upright(image)  # before anything else: sizes, boxes and pixels in the shown frame
            transparent = image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
            return ImageFile(to_rgb(shown, path), image.mode, frames, transparent, orientation)
    except Image.DecompressionBombError:
        raise UsageError(f"image {bounded(path)} has more than {2 * MAX_IMAGE_PIXELS:,} pixels; shrink it "
                         "first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UsageError(f"image {bounded(path)} cannot be read ({error.__class__.__name__}); give a PNG or JPEG "
                         "file") from None


def to_rgb(image: Image.Image, path: str) -> Image.Image:
    """8-bit RGB without saturating: high bit depths are scaled, transparency composited on white."""
    mode = image.mode
    if mode in HIGH_DEPTH:
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if mode == "F" and 0.0 <= low and high <= 1.0:
            full_scale = 1.0
        elif mode == "F" and 0.0 <= low and high <= 255.0:
            full_scale = 255.0
        elif mode != "F" and 0 <= low and high <= 65535:
            full_scale = 65535.0
        else:
            raise UsageError(f"image {bounded(path)} has {HIGH_DEPTH[mode]} pixels from {low:g} to {high:g}, outside "
                             "the ranges read as brightness (0-1 or 0-255 for float, 0-65535 for integer); save "
                             "it as an 8- or 16-bit PNG")
        values = np.rint(values * (255.0 / full_scale)).astype(np.uint8)
        return Image.fromarray(values, "L").convert("RGB")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def pixel_limits(loaded, min_pixels: int | None, max_pixels: int | None):
    """How the family's processor resizes images (the Qwen VL families: ``qwen_vl.PixelLimits``), with the bounds
    given."""
    return loaded.adapter.pixel_limits(loaded.processor.image_processor, min_pixels, max_pixels)


def context_length(loaded) -> int | None:
    config = loaded.model.config
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def check_fits(loaded, prompt_tokens: int, answer_tokens: int, what: str = "the prompt") -> None:
    """Refuse a sequence longer than the model's context before any work is done."""
    limit = context_length(loaded)
    if limit is not None and prompt_tokens + answer_tokens > limit:
        raise UsageError(f"{what}: {prompt_tokens:,} tokens, plus "
                         f"{mention('num_tokens', answer_tokens, shown=f'{answer_tokens:,}')}, exceed the model's "
                         f"context of {limit:,} tokens")


def build_prompt(loaded, text: str, image_paths: list[str], raw_prompt: bool = False,
                 max_pixels: int | None = None, min_pixels: int | None = None, allow_special_tokens: bool = False,
                 num_tokens: int = 1) -> Prompt:
    """Apply the chat template (unless ``raw_prompt``), expand images, and build the token table.

    Control tokens typed in the user's text (``<|im_end|>``, ``<|image_pad|>``) are plain text unless
    ``allow_special_tokens`` (or ``raw_prompt``, whose text *is* the markup) says to read them as tokens.
    """
    files = [load_image(path) for path in image_paths]
    if files and not loaded.is_vl:
        raise UsageError(f"text-only models take no {mention('images')}; use mask-impact-vl (mask_impact_vl.py) with "
                         "a vision-language model")
    literal = not (allow_special_tokens or raw_prompt)
    if loaded.is_vl:
        limits = loaded.adapter.prompt_limits(pixel_limits(loaded, min_pixels, max_pixels), len(files))
        check_fits(loaded, sum(limits.tokens(f.image.width, f.image.height, path) for f, path in zip(files, image_paths)),
                   num_tokens, "the images alone")
        input_ids, model_kwargs, after = _encode_vl(loaded, text, [f.image for f in files], raw_prompt, literal,
                                                    limits)
    else:
        limits = None
        (input_ids, after), model_kwargs = _encode_text_model(loaded, text, raw_prompt, literal), {}
    check_fits(loaded, input_ids.shape[1], num_tokens)
    grids = loaded.adapter.image_grids(model_kwargs, len(files)) if files else []
    image_infos = [_image_info(path, file, grid, loaded, limits) for path, file, grid in zip(image_paths, files, grids)]
    tokens = token_table(input_ids[0].tolist(), loaded.tokenizer, loaded.adapter, image_infos)
    user = None if after is None else user_positions(loaded.tokenizer, input_ids[0].tolist(), text, after, literal)
    return Prompt(text, input_ids, model_kwargs, tokens, image_infos, user, loaded.adapter)


def user_positions(tokenizer, ids: list[int], text: str, after: str, literal: bool) -> list[int] | None:
    """The positions of the user's text, which the chat template puts just before ``after``: the tokens of
    ``text + after`` at the end of ``ids``, or, where the template's tokens merge with the text's, the tokens
    whose characters overlap the text's. None if neither finds it."""
    encode = lambda piece, **kw: tokenizer(piece, add_special_tokens=False, **kw)["input_ids"]  # noqa: E731
    tail = encode(text, split_special_tokens=literal)
    after_ids = encode(after)
    if ids[len(ids) - len(tail) - len(after_ids):] == tail + after_ids:
        return list(range(len(ids) - len(tail) - len(after_ids), len(ids) - len(after_ids)))
    decoded, spans = token_spans(tokenizer, ids)
    if not decoded.endswith(text + after):
        return None
    end = len(decoded) - len(after)
    start = end - len(text)
    return [p for p, (s, e) in enumerate(spans) if s < end and e > start]


USER_TEXT = "\ue000mask-impact-user-text\ue000"  # stands in for the user's text inside the chat template


def _added_token_strings(tokenizer) -> list[str]:
    return [added.content for added in tokenizer.added_tokens_decoder.values()]


def _encode_pieces(tokenizer, full_text: str, text: str, literal: bool) -> list[list[int]] | None:
    """Template ids around the user's text, the text itself tokenized literally; None if not needed."""
    if not literal or not any(token in text for token in _added_token_strings(tokenizer)):
        return None
    before, after = full_text.split(USER_TEXT)
    encode = lambda piece, **kw: tokenizer(piece, add_special_tokens=False, **kw)["input_ids"]  # noqa: E731
    return [encode(before), encode(text, split_special_tokens=True), encode(after)]


def _encode_text_model(loaded, text: str, raw_prompt: bool, literal: bool) -> tuple[torch.Tensor, str | None]:
    """The prompt's ids and the template text after the user's text (None with ``raw_prompt``)."""
    tokenizer = loaded.tokenizer
    if raw_prompt:
        return tokenizer(text, return_tensors="pt")["input_ids"], None
    if not tokenizer.chat_template:
        raise UsageError(f"{loaded.name} has no chat template; pass {mention('raw_prompt')} to use the text as is")
    render = lambda content: tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False, enable_thinking=False)
    template = render(USER_TEXT)
    after = template.split(USER_TEXT)[1]
    pieces = _encode_pieces(tokenizer, template, text, literal)
    if pieces is not None:
        return torch.tensor([sum(pieces, [])]), after
    full_text = render(text)
    return tokenizer(full_text, return_tensors="pt", add_special_tokens=False)["input_ids"], after




def with_text_tokens(model_kwargs: dict, count: int) -> dict:
    """``model_kwargs`` for the sequence with ``count`` text tokens appended: the token types (1 at image tokens,
    where a family has them) extended with zeros."""
    extended = dict(model_kwargs)
    for name in TOKEN_TYPES:
        if name in extended:
            types = extended[name]
            extended[name] = torch.cat([types, types.new_zeros(1, count)], dim=1)
    return extended


def _encode_vl(loaded, text: str, images: list[Image.Image], raw_prompt: bool, literal: bool,
               limits) -> tuple[torch.Tensor, dict, str | None]:
    """The prompt's ids, the model's other inputs and the template text after the user's text (None with
    ``raw_prompt``)."""
    processor, config = loaded.processor, loaded.model.config
    image_pad = loaded.adapter.image_placeholder(loaded.tokenizer)  # what the processor expands (Gemma 3: boi)
    video_id = getattr(config, "video_token_id", None)
    video_pad = None if video_id is None else loaded.tokenizer.convert_ids_to_tokens(video_id)
    if raw_prompt:
        markup = loaded.adapter.image_markup(loaded.tokenizer)
        template = text if image_pad in text else markup * len(images) + USER_TEXT
    else:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": USER_TEXT}]
        template = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)
    pieces = _encode_pieces(loaded.tokenizer, template, text, literal)
    full_text = template.replace(USER_TEXT, text) if pieces is None else template.split(USER_TEXT)[0]
    if video_pad is not None and video_pad in full_text:
        raise UsageError(f"the prompt holds the video placeholder {video_pad}; video input is not supported")
    image_id = getattr(config, "image_token_id", None)
    image_token = None if image_id is None else loaded.tokenizer.convert_ids_to_tokens(image_id)
    if image_token is not None and image_token != image_pad and image_token in full_text:  # Gemma 3's soft token
        raise UsageError(f"the prompt holds the image token {image_token}, which the processor writes itself; mark "
                         f"each image with {image_pad} (one per {mention('images')})")
    if full_text.count(image_pad) != len(images):
        count = full_text.count(image_pad)
        raise UsageError(f"the prompt has {count} image placeholder{'s' if count != 1 else ''} ({image_pad}) for "
                         f"{len(images)} image{'s' if len(images) != 1 else ''}; give one {mention('images')} per "
                         "placeholder")

    encoded = processor(text=[full_text], images=loaded.adapter.processor_images(images) if images else None,
                        return_tensors="pt", **limits.processor_kwargs())
    model_kwargs = loaded.adapter.model_inputs(encoded)
    input_ids = encoded["input_ids"]
    if pieces is not None:  # the user's text and the template after it, both plain text tokens
        tail = torch.tensor([pieces[1] + pieces[2]], dtype=input_ids.dtype)
        input_ids = torch.cat([input_ids, tail], dim=1)
        model_kwargs = with_text_tokens(model_kwargs, tail.shape[1])
    after = None if raw_prompt else template.split(USER_TEXT)[1]
    return input_ids, model_kwargs, after


def _image_info(path: str, file: ImageFile, grid_thw: list[int], loaded, limits) -> ImageInfo:
    image = file.image
    resized_width, resized_height = loaded.adapter.resized_size(grid_thw, limits, image.width, image.height, path)
    resize = limits.describe(image.width, image.height, resized_width, resized_height)
    thumb = image.copy()
    thumb.thumbnail((256, 256))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return ImageInfo(path, image.width, image.height, grid_thw, resized_width, resized_height, url, resize,
                     file.mode, file.notes(), loaded.adapter.crop(grid_thw, resized_width, resized_height),
                     loaded.adapter.layout(limits, image.width, image.height, path), _picture(image))


PICTURE_SIDE = 1024  # the longer side of the picture a result embeds for overlays and figures (text in it readable)


def _picture(image) -> str | None:
    """The picture at up to ``PICTURE_SIDE`` px as a data: URL, PNG or JPEG (quality 90), whichever is smaller; None
    for a picture no larger than the 256-px thumbnail (the thumbnail is the picture then)."""
    if max(image.width, image.height) <= 256:
        return None
    shown = image.convert("RGB")
    shown.thumbnail((PICTURE_SIDE, PICTURE_SIDE))
    encoded = []
    for kind, options in (("png", {"optimize": True}), ("jpeg", {"quality": 90})):
        buffer = io.BytesIO()
        shown.save(buffer, format=kind.upper(), **options)
        encoded.append((len(buffer.getvalue()), kind, buffer.getvalue()))
    _, kind, raw = min(encoded)
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode("ascii")


def token_table(ids: list[int], tokenizer, adapter, images: list[ImageInfo]) -> list[TokenInfo]:
    """One row per position; vision rows carry image index, grid cell and original-pixel box (the family's
    geometry: ``adapter.token_cell``)."""
    config = adapter.model.config
    vision_ids = {getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)} - {None}
    special_ids = {i for i, added in tokenizer.added_tokens_decoder.items() if added.special} - vision_ids
    image_index, seen = -1, 0
    rows = []
    for index, token_id in enumerate(ids):
        text = tokenizer.decode([token_id])
        if token_id not in vision_ids:
            modality = "special" if token_id in special_ids else "text"
            rows.append(TokenInfo(index, token_id, text, modality))
            continue
        if image_index < 0 or seen == adapter.image_tokens(images[image_index]):
            image_index, seen = image_index + 1, 0
        t, row, col, box, *part = adapter.token_cell(images[image_index], seen)
        rows.append(TokenInfo(index, token_id, text, "vision", image_index, t, row, col, box, *part))
        seen += 1
    return rows
