"""Train the demo models on synthetic tasks with planted ground truth (see mask_impact/demo_tasks.py).

    python tools/train_demo_models.py                  # all three, into models/demo-vl, demo-text and demo-vl-vit
    python tools/train_demo_models.py --only text      # one of them (vl, text or vl-vit)

From a fixed seed, on 2 CPU cores, in a few minutes. Each folder is an ordinary checkpoint (config, weights,
tokenizer/processor) plus MODEL_CARD.md and card.json (task, data, steps, held-out accuracy, seed), loaded by
``from_pretrained`` like any other.

In demo-vl the vision tower's attention output projections are zero and frozen, so no image patch mixes with
another before the decoder: each decoder image token then describes its own 32×32 cell and nothing else. With
attention mixing in the ViT, the shape's colour spreads into neighbouring tokens and a knockout of the
planted token no longer removes it; this makes the planted token the one place the answer can come from.

demo-vl-vit is the opposite check: its ViT attention is live and its answer can only come through it (see
VIT_ZEROED below), so the planted route runs inside the vision encoder, where ``--stage vision-encoder`` looks.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mask_impact.demo import CORPUS, build_tokenizer, build_vl_processor  # noqa: E402
from mask_impact.demo_tasks import (COLOURS, GRID, QUESTIONS, READ_CELL, ROWS, SHAPES, blank_picture,  # noqa: E402
                                    draw_recall_example, draw_shape_example, draw_shape_example_off,
                                    tokenizer_corpus)

SEED = 1234
# With the usual 0.02 the decoder never learns to pick the one shape token out of sixteen (colour accuracy
# stayed at chance for 600 steps); at 0.1 it does within a few hundred.
INIT = 0.1
FOLLOW_UPS = 3
# Share of recall training questions about a key that is not among the facts ("What is Z?"), trained towards
# equal probability on every present value. Without them, knocking out the question's key made the model answer
# another value with confidence, which hurt as much as knocking out the value itself (the value ranked first
# in only 72% of examples).
UNKNOWN_KEY = 0.15
# Share of VL training pictures with no shape at all, answered "none". Without them the model falls back to
# a fixed answer (say "square") when it cannot see a shape, so knocking out the shape's token showed no effect
# exactly when the true answer was that fallback (the planted token ranked first in only 80% of 'shape'
# questions). With its token knocked out, a picture looks like an empty one: the frozen ViT attention keeps
# every other token as it was.
EMPTY = 0.1
# The ViT variant (models/demo-vl-vit) has live attention in a vision tower of VIT_DEPTH layers. During training
# only, the decoder gets the visual features (main embedding and DeepStack) of ONE image token, READ_CELL's, from
# its own picture; every other token's are zero (for half the pictures) or another picture's of the batch (the
# other half), so they say nothing about the answer. The shape is never in READ_CELL, so the only way its colour
# reaches the answer is through the vision tower's attention, from the shape's patches to READ_CELL's: a route
# planted inside the encoder. At inference the model runs natively (every token its own picture's); the decoder has
# learned to read READ_CELL's token alone. In trial runs, with another picture's features alone the decoder never
# found the one token to read (colour at chance for 1,200 steps); with zeros alone it found it within 500 steps, but
# natively answered only 56% right and never "none" (it had never seen the other tokens carry anything).
VIT_ZEROED = 0.5
VIT_DEPTH = 2


def vl_config(tokenizer) -> transformers.Qwen3VLConfig:
    return _vl_config(tokenizer, dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, head_dim=24,
                                      mrope_section=[4, 4, 4]),
                      dict(depth=1, hidden_size=64, intermediate_size=128, out_hidden_size=96,
                           deepstack_visual_indexes=[0]))


def vl_vit_config(tokenizer) -> transformers.Qwen3VLConfig:
    """The ViT variant: smaller all round, a vision tower of VIT_DEPTH layers whose attention is trained."""
    return _vl_config(tokenizer, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                                      mrope_section=[4, 2, 2]),
                      dict(depth=VIT_DEPTH, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                           deepstack_visual_indexes=[VIT_DEPTH - 1]))


def _vl_config(tokenizer, text_sizes: dict, vision_sizes: dict) -> transformers.Qwen3VLConfig:
    """A Qwen3-VL config with the tokenizer's special ids and the sizes given (the rest shared by both demos)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text_sizes = dict(text_sizes)
    mrope_section = text_sizes.pop("mrope_section")
    text = dict(vocab_size=len(tokenizer), num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section,
                                 "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                initializer_range=INIT, **text_sizes)
    vision = dict(num_heads=2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  initializer_range=INIT, **vision_sizes)
    return transformers.Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


def text_config(tokenizer) -> transformers.Qwen3Config:
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, bos_token_id=pad, eos_token_id=eos,
        pad_token_id=pad, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=INIT)


def task_tokenizer():
    """The demo tokenizer, with room for every task word as one token (checked)."""
    tokenizer = build_tokenizer(tokenizer_corpus() + CORPUS, vocab_size=512)
    for word in [*COLOURS, *SHAPES, *ROWS, "none"]:
        assert len(tokenizer.encode(word)) == 1, f"{word!r} is not one token"
    return tokenizer


def schedule(step: int, steps: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class VLData:
    """Chat-formatted shape questions; pixels come from the real processor. ``draw`` makes one example,
    ``questions`` are the kinds asked when a batch does not name one."""

    def __init__(self, processor, rng: random.Random, empty: float = 0.0, draw=draw_shape_example,
                 questions: tuple[str, ...] = ("colour", "shape", "shape", "where")):
        self.processor, self.rng, self.empty, self.draw, self.questions = processor, rng, empty, draw, questions
        self.eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt_ids(self, question: str, image):
        content = [{"type": "image"}, {"type": "text", "text": QUESTIONS[question]}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        return self.processor(text=[text], images=[image], return_tensors="pt")

    def batch(self, size: int, question: str | None = None) -> dict:
        # the kind of shape is the slowest to learn: ask it twice as often
        question = question or self.rng.choice(list(self.questions))
        examples = [self.draw(self.rng) for _ in range(size)]
        texts = [ex.answer(question) for ex in examples]
        if self.empty:  # some pictures without a shape, answered "none" (see EMPTY)
            for k in range(size):
                if self.rng.random() < self.empty:
                    examples[k].image, texts[k] = blank_picture(), "none"
        encoded = [self.prompt_ids(question, ex.image) for ex in examples]
        answers = [self.processor.tokenizer.encode(text) + [self.eos] for text in texts]
        prompts = [e["input_ids"][0].tolist() for e in encoded]
        return _pack([p + a for p, a in zip(prompts, answers)], [[(len(p), a)] for p, a in zip(prompts, answers)], {
            "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
            "image_grid_thw": torch.cat([e["image_grid_thw"] for e in encoded]),
            "mm_token_type_ids": [e["mm_token_type_ids"][0].tolist() for e in encoded],
        })


class TextData:
    """Recall questions in the chat format. For training, ``follow_ups`` more turns ask about other keys
    of the same facts, every answer supervised: more signal per sequence gets the model past the long
    plateau before key-value binding forms (one question per sequence stayed near 45% for 3,000 steps)."""

    def __init__(self, tokenizer, rng: random.Random, follow_ups: int = 0):
        self.tokenizer, self.rng, self.follow_ups = tokenizer, rng, follow_ups
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _ids(self, messages: list[dict], generation: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def batch(self, size: int) -> dict:
        sequences, spans = [], []
        for _ in range(size):
            example = draw_recall_example(self.rng)
            facts = dict(pair.split("=") for pair in example.prompt.split(". ")[0].split(", "))
            others = list(facts)
            turns = [(example.prompt, example.answer)]
            turns += [(f"What is {key}?", facts[key]) for key in self.rng.sample(others, min(self.follow_ups, len(others)))]
            if self.follow_ups and self.rng.random() < UNKNOWN_KEY:  # a key that is not among the facts
                turns[0] = (example.prompt[: -2] + "Z?", None)
            messages, answer_spans = [], []
            for question, answer in turns:
                messages.append({"role": "user", "content": question})
                start = len(self._ids(messages, True))
                if answer is None:  # every present value equally likely: one target per value at the same step
                    messages.append({"role": "assistant", "content": facts["A"]})
                    answer_spans += [(start, [self.tokenizer.encode(value)[0]]) for value in facts.values()]
                    continue
                messages.append({"role": "assistant", "content": answer})
                answer_spans.append((start, self.tokenizer.encode(answer) + [self.eos]))
            ids = self._ids(messages, False)
            if not self.follow_ups:  # evaluation: the prompt alone, then the one answer
                ids = ids[: answer_spans[0][0]] + answer_spans[0][1]
            sequences.append(ids)
            spans.append(answer_spans[:1] if not self.follow_ups else answer_spans)
        return _pack(sequences, spans, {})


def _pack(sequences: list[list[int]], spans: list[list[tuple[int, list[int]]]], extra: dict) -> dict:
    """Right-padded sequences, and the (row, position, target) triples the loss reads: each answer token is
    predicted from the position before it."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, (sequence, row_spans) in enumerate(zip(sequences, spans)):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        for start, answer in row_spans:
            assert len(answer) == 1 or sequence[start: start + len(answer)] == answer, "answer tokens misplaced"
            for k, token in enumerate(answer):
                rows.append(row)
                positions.append(start - 1 + k)
                targets.append(token)
    batch = {"input_ids": ids, "rows": torch.tensor(rows), "positions": torch.tensor(positions),
             "targets": torch.tensor(targets), "sequences": len(sequences)}
    if "mm_token_type_ids" in extra:
        types = torch.zeros_like(ids)
        for row, row_types in enumerate(extra.pop("mm_token_type_ids")):
            types[row, : len(row_types)] = torch.tensor(row_types)
        batch["model"] = {"mm_token_type_ids": types, **extra}
    else:
        batch["model"] = extra
    return batch


def forward(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], **batch["model"]).logits
    picked = logits[batch["rows"], batch["positions"]]  # (N, V)
    return F.cross_entropy(picked, batch["targets"]), picked.argmax(-1) == batch["targets"]


@torch.no_grad()
def accuracy(model, batch) -> float:
    """Exact match of the whole answer (every token and the end marker), teacher-forced."""
    _, correct = forward(model, batch)
    wrong = torch.zeros(batch["sequences"], dtype=torch.bool)
    wrong[batch["rows"][~correct]] = True
    return (~wrong).float().mean().item()


def train(model, next_batch, evaluate, steps: int, lr: float, log_every: int = 100) -> tuple[int, list]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    history, started = [], time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * schedule(step, steps)
        loss, _ = forward(model, next_batch())
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            scores = evaluate(96)
            model.train()
            history.append({"step": step + 1, "loss": round(loss.item(), 4), **scores})
            print(f"  step {step + 1:5d}  loss {loss.item():.4f}  held-out {scores}  "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
            if min(scores.values()) >= 0.995 and step + 1 >= steps // 3:
                return step + 1, history
    return steps, history


def write_card(folder: Path, card: dict, description: str, only: str = "", extra: list[str] = ()) -> None:
    (folder / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    lines = [f"# {card['name']}", "", description, "", "| | |", "|---|---|"]
    for key in ("task", "data", "architecture", "seed", "steps", "batch_size", "learning_rate", "train_seconds"):
        lines.append(f"| {key} | {card[key]} |")
    note = card.get("eval_note", f"{card['eval_examples']} examples per question type")
    lines.append(f"| held-out accuracy ({note}) | "
                 + ", ".join(f"{k}: {v:.1%}" for k, v in card["accuracy"].items()) + " |")
    lines += list(extra)
    command = "python tools/train_demo_models.py" + (f" {only}" if only else "")
    lines += ["", f"Reproduce: `{command}` (fixed seed, 2 CPU cores)."]
    (folder / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def train_vl(out: Path, steps: int) -> dict:
    torch.manual_seed(SEED)
    tokenizer = task_tokenizer()
    processor = build_vl_processor(tokenizer)
    model = transformers.Qwen3VLForConditionalGeneration(vl_config(tokenizer))
    for block in model.model.visual.blocks:  # no patch mixing in the vision tower (see the module docstring)
        torch.nn.init.zeros_(block.attn.proj.weight)
        torch.nn.init.zeros_(block.attn.proj.bias)
        for param in block.attn.parameters():
            param.requires_grad_(False)
    train_data, held_out = VLData(processor, random.Random(SEED), EMPTY), VLData(processor, random.Random(SEED + 1))

    def evaluate(n: int) -> dict:
        return {q: accuracy(model, held_out.batch(n, q)) for q in QUESTIONS}

    started = time.perf_counter()
    done, history = train(model, lambda: train_data.batch(32), evaluate, steps, lr=3e-3)
    seconds = time.perf_counter() - started
    model.eval()
    final = VLData(processor, random.Random(SEED + 2))
    scores = {q: accuracy(model, final.batch(300, q)) for q in QUESTIONS}
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    card = {"name": "mask_impact demo-vl", "task": "shapes: colour / kind / cell of one shape in a 4×4 grid of 32-px "
            f"cells on a 128×128 picture ({EMPTY:.0%} of training pictures empty, answered 'none')", "data": "mask_impact.demo_tasks.draw_shape_example",
            "architecture": "Qwen3VLForConditionalGeneration: ViT depth 1 (attention output frozen at zero), "
            "decoder 3 layers × 96", "seed": SEED, "steps": done, "batch_size": 32, "learning_rate": 3e-3,
            "train_seconds": round(seconds), "eval_examples": 300, "accuracy": scores, "history": history}
    write_card(out, card, "A tiny Qwen3-VL trained from scratch to answer questions about one planted shape.")
    return card


def read_one_token(visual, reader: int, tokens: int, generator: torch.Generator):
    """While ``visual`` is training: every image's ``tokens`` output rows but ``reader`` (main embedding and every
    DeepStack level) replaced by zeros (a VIT_ZEROED share of the images, drawn from ``generator``) or by the
    previous image's in the batch. A forward hook; returns its handle."""
    def hook(module, args, output):
        if not module.training:
            return output
        images = output.pooler_output.shape[0] // tokens
        zeroed = (torch.rand(images, generator=generator) < VIT_ZEROED)[:, None, None]
        keep = torch.zeros(1, tokens, 1, dtype=torch.bool)
        keep[0, reader] = True

        def replaced(features: torch.Tensor) -> torch.Tensor:
            shaped = features.reshape(images, tokens, features.shape[-1])
            other = torch.where(zeroed.to(features.device), torch.zeros_like(shaped), shaped.roll(1, dims=0))
            return torch.where(keep.to(features.device), shaped, other).reshape(features.shape)

        output.pooler_output = replaced(output.pooler_output)
        output.deepstack_features = [replaced(level) for level in output.deepstack_features]
        return output

    return visual.register_forward_hook(hook)


def vit_route(folder: Path, count: int = 50, seed: int = 777) -> dict:
    """The checkpoint in ``folder`` loaded as the tool loads it; on ``count`` fresh pictures, each image token's
    2×2 patches knocked out in the vision tower (``--stage vision-encoder --unit token``): how often the shape's
    token costs the answer most (window = every ViT layer), and per ViT layer the mean drop of the shape's token
    next to the mean of the largest drop among the others."""
    import tempfile
    from types import SimpleNamespace

    from mask_impact.engine import Analysis
    from mask_impact.inputs import build_prompt
    from mask_impact.metrics import logprob_drop
    from mask_impact.models import load_model
    from mask_impact.engines.vit import VisionEncoderEngine
    from mask_impact.units import build_units

    loaded = load_model(str(folder), True, "cpu", "float32")
    depth = len(loaded.model.model.visual.blocks)
    windows = [(0, depth - 1)] + [(layer, layer) for layer in range(depth)]
    config = SimpleNamespace(unit="token", groups=[], flows=[], mask_mode="vision", stage="vision-encoder")
    rng, first, correct, shape_drops, other_drops, by_colour = random.Random(seed), 0, 0, [], [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(count):
            example = draw_shape_example_off(rng)
            path = Path(scratch) / f"{number}.png"
            example.image.save(path)
            prompt = build_prompt(loaded, QUESTIONS["colour"], [str(path)])
            analysis = Analysis(loaded, prompt)
            baseline, tf = analysis.baseline(3)
            correct += baseline.text.strip() == example.colour
            units = build_units(prompt, loaded.tokenizer, config, prompt.length - 1)
            engine = VisionEncoderEngine(analysis, tf, units)
            drops = torch.stack([logprob_drop(engine.base_logprobs, engine.logprobs(window, units), tf.answer_ids)
                                 for window in windows])  # (windows, units)
            shape = next(i for i, unit in enumerate(units) if (prompt.tokens[unit.keys[0]].row,
                                                               prompt.tokens[unit.keys[0]].col) == (example.row, example.col))
            first += int((drops[0] > drops[0, shape]).sum()) == 0
            shape_drops.append(drops[:, shape])
            layers = "+".join(str(layer) for layer in range(depth) if drops[1 + layer, shape] > 1.0) or "none"
            counts = by_colour.setdefault(example.colour, {})
            counts[layers] = counts.get(layers, 0) + 1
            other_drops.append(torch.cat([drops[:, :shape], drops[:, shape + 1:]], dim=1).max(dim=1).values)
    shape_mean, other_mean = torch.stack(shape_drops).mean(0), torch.stack(other_drops).mean(0)
    return {"examples": count, "seed": seed, "answered_correctly": correct, "shape_token_first": first,
            "all_layers": {"shape_token_drop": _nats(shape_mean[0]), "largest_other_drop": _nats(other_mean[0])},
            "per_vit_layer": [{"layer": layer, "shape_token_drop": _nats(shape_mean[1 + layer]),
                               "largest_other_drop": _nats(other_mean[1 + layer])} for layer in range(depth)],
            "layers_over_1_nat_by_colour": dict(sorted(by_colour.items()))}


def _nats(value: torch.Tensor) -> float:
    return round(value.item(), 3) + 0.0  # + 0.0: a tiny negative mean shows as 0.0, not -0.0


def train_vl_vit(out: Path, steps: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # so small a model gains nothing from a second thread (and loses much on a busy machine)
    try:
        return _train_vl_vit(out, steps)
    finally:
        torch.set_num_threads(threads)


def _train_vl_vit(out: Path, steps: int) -> dict:
    torch.manual_seed(SEED)
    tokenizer = task_tokenizer()
    processor = build_vl_processor(tokenizer)
    model = transformers.Qwen3VLForConditionalGeneration(vl_vit_config(tokenizer))
    reader = READ_CELL[0] * GRID + READ_CELL[1]
    hook = read_one_token(model.model.visual, reader, GRID * GRID, torch.Generator().manual_seed(SEED))
    train_data = VLData(processor, random.Random(SEED), EMPTY, draw_shape_example_off, ("colour",))
    held_out = VLData(processor, random.Random(SEED + 1), draw=draw_shape_example_off)
    held_out_empty = VLData(processor, random.Random(SEED + 1), empty=1.0, draw=draw_shape_example_off)

    def evaluate(n: int) -> dict:  # native inference: the hook acts only in training
        return {"colour": accuracy(model, held_out.batch(n, "colour")),
                "empty": accuracy(model, held_out_empty.batch(n // 4, "colour"))}

    started = time.perf_counter()
    done, history = train(model, lambda: train_data.batch(32), evaluate, steps, lr=3e-3)
    seconds = time.perf_counter() - started
    hook.remove()
    model.eval()
    final = VLData(processor, random.Random(SEED + 2), draw=draw_shape_example_off)
    final_empty = VLData(processor, random.Random(SEED + 2), empty=1.0, draw=draw_shape_example_off)
    scores = {"colour": accuracy(model, final.batch(300, "colour")),
              "empty": accuracy(model, final_empty.batch(100, "colour"))}
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    card = {"name": "mask_impact demo-vl-vit",
            "task": "shapes, colour question only: one shape in a 4×4 grid of 32-px cells on a 128×128 picture, never "
            f"in the top-left cell ({EMPTY:.0%} of training pictures empty, answered 'none'); in training the decoder "
            f"saw only the top-left image token's features, every other token's were zero ({VIT_ZEROED:.0%} of "
            "pictures) or another picture's",
            "data": "mask_impact.demo_tasks.draw_shape_example_off",
            "architecture": f"Qwen3VLForConditionalGeneration: ViT depth {VIT_DEPTH} × 32 with live (trained) "
            "attention, decoder 2 layers × 64", "seed": SEED, "steps": done, "batch_size": 32, "learning_rate": 3e-3,
            "train_seconds": round(seconds), "eval_examples": 300,
            "eval_note": "native inference; colour: 300 pictures with a shape, empty: 100 empty pictures answered 'none'",
            "accuracy": scores, "history": history}
    route = vit_route(out)
    card["vit_route"] = route
    found = (f"What the ViT knockouts find (`--stage vision-encoder --unit token`, {route['examples']} fresh pictures, "
             f"seed {route['seed']}; logprob_drop of the answer, nats): knocking out the shape's token at every ViT "
             f"layer costs the answer most in {route['shape_token_first']}/{route['examples']} pictures (mean drop "
             f"{route['all_layers']['shape_token_drop']}; the largest other token's "
             f"{route['all_layers']['largest_other_drop']}). One ViT layer at a time:")
    extra = ["", found, "",
             "| ViT layer | shape's token | largest other token |", "|---|---|---|"]
    extra += [f"| {row['layer']} | {row['shape_token_drop']} | {row['largest_other_drop']} |" for row in route["per_vit_layer"]]
    extra += ["", "Which single ViT layer's knockout of the shape's token costs more than 1 nat, by the shape's colour "
              "(pictures): " + "; ".join(f"{colour}: " + ", ".join(f"layer {layers} ({n})" for layers, n in counts.items())
                                        for colour, counts in route["layers_over_1_nat_by_colour"].items()) + "."]
    write_card(out, card, "A tiny Qwen3-VL whose decoder reads one image token, so the shape's colour must travel "
               "to it through the vision tower's attention: a route planted inside the encoder.", "--only vl-vit", extra)
    return card


def train_text(out: Path, steps: int) -> dict:
    torch.manual_seed(SEED)
    tokenizer = task_tokenizer()
    model = transformers.Qwen3ForCausalLM(text_config(tokenizer))
    train_data = TextData(tokenizer, random.Random(SEED), follow_ups=FOLLOW_UPS)
    held_out = TextData(tokenizer, random.Random(SEED + 1))

    def evaluate(n: int) -> dict:
        return {"recall": accuracy(model, held_out.batch(n))}

    started = time.perf_counter()
    done, history = train(model, lambda: train_data.batch(64), evaluate, steps, lr=3e-3)
    seconds = time.perf_counter() - started
    model.eval()
    scores = {"recall": accuracy(model, TextData(tokenizer, random.Random(SEED + 2)).batch(300))}
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    card = {"name": "mask_impact demo-text", "task": "key-value recall: 'A=3, B=7, C=1. What is B?' → '7' (keys A, B, C; distinct random digits)",
            "data": "mask_impact.demo_tasks.draw_recall_example",
            "architecture": "Qwen3ForCausalLM: 2 layers × 128", "seed": SEED, "steps": done, "batch_size": 64,
            "learning_rate": 3e-3, "train_seconds": round(seconds), "eval_examples": 300, "accuracy": scores,
            "history": history}
    write_card(out, card, "A tiny Qwen3 trained from scratch to recall the value of a queried key.")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("vl", "text", "vl-vit"))
    parser.add_argument("--out", default=str(ROOT / "models"))
    parser.add_argument("--vl-steps", type=int, default=3000)
    parser.add_argument("--text-steps", type=int, default=1500)
    parser.add_argument("--vl-vit-steps", type=int, default=2000)
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    started = time.perf_counter()
    if args.only in (None, "vl"):
        print("demo-vl", flush=True)
        card = train_vl(Path(args.out) / "demo-vl", args.vl_steps)
        print(f"demo-vl held-out accuracy {card['accuracy']} after {card['steps']} steps", flush=True)
    if args.only in (None, "text"):
        print("demo-text", flush=True)
        card = train_text(Path(args.out) / "demo-text", args.text_steps)
        print(f"demo-text held-out accuracy {card['accuracy']} after {card['steps']} steps", flush=True)
    if args.only in (None, "vl-vit"):
        print("demo-vl-vit", flush=True)
        card = train_vl_vit(Path(args.out) / "demo-vl-vit", args.vl_vit_steps)
        print(f"demo-vl-vit held-out accuracy {card['accuracy']} after {card['steps']} steps", flush=True)
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
