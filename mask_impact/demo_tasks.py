"""Synthetic tasks with planted ground truth, for the trained demo models.

Shapes (vision-language): a 128×128 picture with one coloured shape inside one cell of a 4×4 grid
whose cells are exactly Qwen3-VL's 32×32-pixel decoder tokens, so exactly one image token holds the
shape. Questions ask its colour, its kind, or where it is; answers are words.

Recall (text): ``A=3, B=7, C=1. What is B?`` → ``7``: three keys in order, random digits, a random key
asked. The queried value is one token in the prompt.

Both generators are deterministic given their ``random.Random``; training and the planted-signal
tests draw from differently seeded generators.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 128
CELL = 32  # patch_size (16) × spatial_merge_size (2): one decoder token
GRID = IMAGE_SIZE // CELL
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 50, 170), "orange": (245, 130, 20)}
SHAPES = ("square", "circle", "triangle", "cross")
ROWS = ("top", "upper", "lower", "bottom")
COLUMNS = ("left", "midleft", "midright", "right")
QUESTIONS = {
    "colour": "What color is the shape?",
    "shape": "What shape is it?",
    "where": "Where is the shape?",
}
RECALL_KEYS = "ABC"


@dataclass
class ShapeExample:
    image: Image.Image
    colour: str
    shape: str
    row: int
    col: int

    def answer(self, question: str) -> str:
        if question == "colour":
            return self.colour
        if question == "shape":
            return self.shape
        return f"{ROWS[self.row]} {COLUMNS[self.col]}"

    @property
    def token_index(self) -> int:
        """Which of the image's tokens (row-major over the 4×4 merged grid) holds the shape."""
        return self.row * GRID + self.col


def draw_shape_example(rng: random.Random) -> ShapeExample:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    row, col = rng.randrange(GRID), rng.randrange(GRID)
    size = rng.randrange(20, 27)
    centre = (CELL - size) // 2
    dx, dy = centre + rng.randrange(-1, 2), centre + rng.randrange(-1, 2)
    return draw_shape(colour, shape, row, col, size, dx, dy)


def blank_picture() -> Image.Image:
    """The light grey ground every shape is drawn on."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (224, 224, 224))


def draw_shape(colour: str, shape: str, row: int, col: int, size: int = 22, dx: int = 5, dy: int = 5) -> ShapeExample:
    """One ``shape`` of ``size`` px in cell (row, col), offset (dx, dy) inside it, on a light grey ground."""
    image = blank_picture()
    draw = ImageDraw.Draw(image)
    x0, y0 = col * CELL + dx, row * CELL + dy
    x1, y1 = x0 + size, y0 + size
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        third = size // 3
        draw.rectangle([x0 + third, y0, x1 - third, y1], fill=fill)
        draw.rectangle([x0, y0 + third, x1, y1 - third], fill=fill)
    return ShapeExample(image, colour, shape, row, col)


@dataclass
class RecallExample:
    prompt: str
    answer: str
    value_char_index: int  # where the queried value sits in the prompt text


def draw_recall_example(rng: random.Random) -> RecallExample:
    values = [str(v) for v in rng.sample(range(10), len(RECALL_KEYS))]  # distinct: the answer appears once
    target = rng.randrange(len(RECALL_KEYS))
    text = ", ".join(f"{key}={value}" for key, value in zip(RECALL_KEYS, values))
    index = text.index(f"{RECALL_KEYS[target]}=") + 2
    return RecallExample(f"{text}. What is {RECALL_KEYS[target]}?", values[target], index)


def tokenizer_corpus() -> list[str]:
    """Text the demo tokenizer is trained on: every word the tasks use, so each answer word is one token."""
    lines = list(QUESTIONS.values()) + list(COLOURS) + list(SHAPES) + list(ROWS) + list(COLUMNS)
    lines += [f"{row} {col}" for row in ROWS for col in COLUMNS] + ["none"]
    lines += ["A=3, B=7, C=1. What is B?", "user", "assistant", "system", "What's in this image?"]
    return lines


# --- the ViT variant (models/demo-vl-vit) -----------------------------------------------------------------------

READ_CELL = (0, 0)  # the one image token whose features the ViT variant's decoder was trained to read


def draw_shape_example_off(rng: random.Random, cell: tuple[int, int] = READ_CELL) -> ShapeExample:
    """``draw_shape_example``, never in ``cell`` (redrawn until it is elsewhere). For the ViT variant, whose
    decoder reads only the top-left token: a shape inside that token would need no route through the encoder."""
    while True:
        example = draw_shape_example(rng)
        if (example.row, example.col) != cell:
            return example


# --- the demo study (mask-impact-vl --demo --dataset demo-shapes) -----------------------------------------------

DEMO_DATASET = "demo-shapes"  # --dataset's name for the shapes drawn afresh: the trained demo's study
DEMO_STUDY_SEED = 1000  # its pictures' seed, plus --seed (training drew from other seeds)


def write_shape_dataset(folder, count: int = 50, seed: int = 0):
    """``count`` fresh shape pictures (``folder/NNN.png``) and ``folder/shapes.jsonl`` with the colour question and
    each picture's gold answer (``prompt``, ``image``, ``target``); the same ``seed`` writes the same files.
    Returns the JSON Lines file's path."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(DEMO_STUDY_SEED + seed)
    lines = []
    for number in range(count):
        example = draw_shape_example(rng)
        name = f"{number:03d}.png"
        if not (folder / name).exists():  # atomically: the processes of a launch write the same files at once
            temporary = folder / f"{name}.{os.getpid()}.tmp"
            example.image.save(temporary, format="PNG")
            temporary.replace(folder / name)
        lines.append(json.dumps({"prompt": QUESTIONS["colour"], "image": name, "target": example.colour,
                                 "shape": example.shape, "row": example.row, "col": example.col}))
    path = folder / "shapes.jsonl"
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        temporary = path.with_suffix(f".jsonl.{os.getpid()}.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    return path
