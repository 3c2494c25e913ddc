"""What every stage's engines share: the baseline, teacher-forced scoring, and the naive whole-model forward.

Scoring is teacher-forced: the sequence ``prompt + y_1 .. y_{T-1}`` is run once per knockout and the next-token
distributions are read at the T *answer positions* ``P-1 .. P+T-2`` (P = prompt length), which predict
``y_1 .. y_T`` (``TeacherForced``). ``Analysis`` holds one model, one prompt and the settings that decide what a
knockout blocks; it generates (the baseline, and under a knockout) and builds attention plans.
``whole_model_logprobs`` is one forward of the whole model, its attention written out: every stage's naive engine,
the oracle of its fast one. The decoder's engines are in engines/decoder.py, the other stages' beside it.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import DynamicCache, GenerationConfig

from .families.base import past_key_values_accepted
from .inputs import Prompt, with_text_tokens
from .knockout import AttentionPlan, apply_plan, knockout_attention_installed
from .models import LoadedModel
from .spec import Knockout


@dataclass
class Baseline:
    token_ids: list[int]
    tokens: list[str]
    text: str
    logprobs: list[float]
    stopped_at_eos: bool


@dataclass
class TeacherForced:
    """``prompt + y_1 .. y_{T-1}`` and where its answer positions are."""

    input_ids: torch.Tensor  # (1, S)
    model_kwargs: dict
    answer_ids: torch.Tensor  # (T,)
    answer_start: int  # first answer position (P - 1)

    @property
    def answer_positions(self) -> torch.Tensor:
        return torch.arange(self.answer_start, self.answer_start + len(self.answer_ids))


@dataclass
class Analysis:
    """One model, one prompt, and the settings that decide what a knockout blocks."""

    loaded: LoadedModel
    prompt: Prompt
    block_from: str = "all"  # all | answer
    vision_attention: str = "causal"  # causal | bidirectional
    _groups: torch.Tensor | None = field(default=None, init=False, repr=False)
    _added_groups: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Gemma 3's own masks hold the same-image blocks: always known here (first_affected), never added again;
        # --vision-attention bidirectional adds them to a causal model's masks
        own = self.loaded.adapter.bidirectional_images
        if own or self.vision_attention == "bidirectional":
            self._groups = self.prompt.vision_groups()
        self._added_groups = None if own else self._groups

    @property
    def answer_start(self) -> int:
        return self.prompt.length - 1

    def knockout(self, unit: int | Knockout) -> Knockout:
        """A unit as the knockout this analysis runs: a bare position is that token's knockout, and
        ``--block-from answer`` keeps only the answer queries."""
        knockout = Knockout.token(unit) if isinstance(unit, int) else unit
        knockout.check_within(self.prompt.length)
        return knockout.restricted_to(self.answer_start) if self.block_from == "answer" else knockout

    def plan(self, window: tuple[int, int] | None = None, units: list[int | Knockout] | None = None,
             reference: bool = False) -> AttentionPlan:
        if window is None:
            return AttentionPlan(vision_groups=self._added_groups, reference=reference)
        knockouts = [self.knockout(unit) for unit in units]
        return AttentionPlan.for_knockouts(window, knockouts, self.prompt.length, self._added_groups, reference)

    def first_affected(self, unit: int | Knockout) -> int | None:
        """The first position whose computation a knockout can change (None: it changes nothing)."""
        return self.knockout(unit).first_affected(self._groups)

    @property
    def vision_groups(self) -> torch.Tensor | None:
        return self._groups

    def eos_ids(self) -> list[int]:
        eos = self.loaded.model.generation_config.eos_token_id
        if eos is None:
            eos = self.loaded.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos)

    def placeholder_ids(self) -> list[int]:
        """Image/video placeholder ids: input-only, so never generated (they would need pixels)."""
        config = self.loaded.model.config
        return [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
                if i is not None]

    def generate(self, num_tokens: int, plan: AttentionPlan | None = None,
                 pixel_values: torch.Tensor | None = None) -> tuple[list[int], bool]:
        """Greedy continuation under ``plan`` (default: no knockout), on ``pixel_values`` in place of the prompt's
        own (an occluded image) if given; stops early at EOS."""
        new, stopped, _ = self._generate(num_tokens, plan, pixel_values, False)
        return new, stopped

    @torch.no_grad()
    def _generate(self, num_tokens: int, plan: AttentionPlan | None, pixel_values: torch.Tensor | None,
                  logprobs: bool) -> tuple[list[int], bool, list[float] | None]:
        """``generate``, and with ``logprobs`` each generated token's log-probability under the model's own logits
        at its step (before the suppression of the placeholder ids)."""
        loaded, prompt = self.loaded, self.prompt
        eos = self.eos_ids()
        config = GenerationConfig(max_new_tokens=num_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=loaded.tokenizer.pad_token_id or eos[0],
                                  suppress_tokens=self.placeholder_ids() or None, output_logits=logprobs,
                                  return_dict_in_generate=logprobs)
        kwargs = dict(prompt.model_kwargs) if pixel_values is None else dict(prompt.model_kwargs,
                                                                              pixel_values=pixel_values)
        inputs = to_device(dict(input_ids=prompt.input_ids, **kwargs), loaded.device)
        # A full-length cache: the default one keeps only the last window of a sliding layer's keys, but
        # the knockout names keys by absolute position; the sliding masks still come from the model.
        cache = DynamicCache()
        with knockout_attention_installed(loaded.adapter.attention_configs()), apply_plan(plan or self.plan()), \
                past_key_values_accepted():
            output = loaded.model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]),
                                           past_key_values=cache, generation_config=config)
        sequences = output.sequences if logprobs else output
        new = sequences[0, prompt.length:].tolist()
        stopped = bool(new) and new[-1] in eos
        scores = None
        if logprobs:
            scores = [torch.log_softmax(step[0].float(), dim=-1)[token].item() for step, token in zip(output.logits, new)]
        return new, stopped, scores

    def baseline(self, num_tokens: int, logprobs: bool = False) -> tuple[Baseline, TeacherForced]:
        """The greedy answer and its teacher-forced sequence; with ``logprobs``, its log-probs as the generation
        saw them (otherwise the caller fills them in from the engine's unmasked pass)."""
        ids, stopped, scores = self._generate(num_tokens, None, None, logprobs)
        tf = self.teacher_forced(ids)
        return Baseline(ids, [self.loaded.tokenizer.decode([i]) for i in ids],
                        self.loaded.tokenizer.decode(ids, skip_special_tokens=True), scores or [], stopped), tf

    def answer_ids(self, text: str, option: str = "target") -> list[int]:
        """The token ids of an answer given as text (``--target``, ``--contrast``), as they follow the prompt: the
        tokenizer's encoding of ``text`` alone, no special tokens added."""
        ids = self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            from .errors import UsageError, mention

            raise UsageError(f"{mention(option, text, quote=True)} tokenises to nothing; give an answer with some "
                             "text")
        return list(ids)

    def teacher_forced(self, answer_ids: list[int]) -> TeacherForced:
        answer = torch.tensor(answer_ids, dtype=self.prompt.input_ids.dtype)
        input_ids = torch.cat([self.prompt.input_ids, answer[None, :-1]], dim=1)  # (1, P + T - 1)
        kwargs = with_text_tokens(self.prompt.model_kwargs, len(answer_ids) - 1)  # the answer tokens are text
        return TeacherForced(input_ids, kwargs, answer, self.answer_start)


FORWARD_ONLY = ("use_cache",)  # the decoder forward's flags that reach get_image_features but not the tower


@contextmanager
def reused_image_features(loaded: LoadedModel) -> Iterator[None]:
    """Within the block, the model's image features (``get_image_features`` of its inner model, where it has one)
    are computed once per distinct input: a call with inputs equal to an earlier call's (``torch.equal``, the same
    other arguments) returns that call's output. For a run's set-up only — the baseline's generation and the decoder
    engine's unmasked pass see the same pictures, so the engine's set-up does not run the vision tower a second
    time — and never where a knockout acts inside the tower (the other stages): the tower is a deterministic function
    of its inputs there, so the output is the one it would compute again."""
    inner = getattr(loaded.model, "model", None)
    original = getattr(inner, "get_image_features", None)
    if original is None:
        yield
        return
    signature = inspect.signature(original)
    seen: list[tuple[dict, object]] = []

    def arguments(args, kwargs) -> dict:
        """The call's arguments by name, however they were passed (positionally or by keyword), less the flags
        that do not reach the tower."""
        bound = signature.bind(*args, **kwargs)
        named = {}
        for name, value in bound.arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        return {name: value for name, value in named.items() if name not in FORWARD_ONLY}

    def same(a, b) -> bool:
        if torch.is_tensor(a) or torch.is_tensor(b):
            return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                    and a.device == b.device and torch.equal(a, b))
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and a == b

    @functools.wraps(original)  # its signature too: generation reads it to pick the features' arguments
    def features(*args, **kwargs):
        named = arguments(args, kwargs)
        for earlier, output in seen:
            if earlier.keys() == named.keys() and all(same(earlier[k], named[k]) for k in named):
                return output
        output = original(*args, **kwargs)
        seen.append((named, output))
        return output

    inner.get_image_features = features  # the instance's attribute, over the class's method, for the block only
    try:
        yield
    finally:
        del inner.get_image_features


def to_device(tensors: dict, device: torch.device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in tensors.items()}


@torch.no_grad()
def whole_model_logprobs(analysis: Analysis, tf: TeacherForced, plan: AttentionPlan | None = None,
                         **inputs) -> torch.Tensor:
    """(1, T, V) answer log-probs of one forward of the whole model, its decoder attention written out through the
    registered attention with ``plan`` (default: no knockout), ``inputs`` replacing the model's inputs (occluded
    ``pixel_values``, say): every stage's naive engine, the oracle of its fast one."""
    loaded = analysis.loaded
    inputs = to_device(dict(dict(input_ids=tf.input_ids, **tf.model_kwargs), **inputs), loaded.device)
    with knockout_attention_installed(loaded.adapter.attention_configs()), \
            apply_plan(plan if plan is not None else analysis.plan(reference=True)):
        logits = loaded.model(**inputs).logits  # (1, S, V)
    return torch.log_softmax(logits[:, tf.answer_positions].float(), dim=-1)  # (1, T, V)
