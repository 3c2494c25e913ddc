"""Loading models, and the tables that say where each family keeps its decoder and how it masks it.

The engine never reaches into a model by hard-coded attribute paths: it asks a ``DecoderAdapter``
for the decoder layers, the final norm, the rotary embedding and the head, for the inputs of
layer 0 (embeddings with image features scattered in, position ids, DeepStack additions), and for
the attention mask each layer gets. One adapter serves Qwen3-VL, another every Llama-shaped text
decoder (Qwen3, Qwen2, Llama, Mistral).

Masks: the engine runs the decoder layers itself, so it must hand each layer the mask the model's
own forward would build for it — plain causal, or causal within a sliding window (Mistral; Qwen2/
Qwen3 with ``use_sliding_window``). ``LAYER_TYPE_RULES`` says, per family, which layer gets which
mask, as each family's modeling code picks it; the masks themselves come from transformers' own
builders. A configuration whose masks we cannot rebuild exactly is refused at load, never run.

Demo models are built offline, saved, and loaded back through ``from_pretrained`` exactly like a
real checkpoint (see ``demo.py``).
"""

from __future__ import annotations

import atexit
import json
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .config import UsageError, bounded, check_device, quoted

VL_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
VL_CLASSES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
TEXT_FAMILIES = ("qwen3", "qwen2", "llama", "mistral")

# The layer types whose masks we rebuild, each with the transformers function that builds it.
LAYER_MASKS: dict[str, Callable] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def _all_full(config) -> list[str]:
    return ["full_attention"] * config.num_hidden_layers


def _mistral_types(config) -> list[str]:
    # MistralModel builds one mask for every layer, sliding iff ``sliding_window`` is set; it ignores layer_types
    kind = "full_attention" if config.sliding_window is None else "sliding_attention"
    return [kind] * config.num_hidden_layers


def _declared_types(config) -> list[str]:
    return list(config.layer_types)


# Which mask each family's decoder hands each layer (transformers 5.x modeling code).
LAYER_TYPE_RULES: dict[str, Callable[[object], list[str]]] = {
    "qwen3_vl": _all_full,  # Qwen3VLTextModel: create_causal_mask for every layer, image tokens included
    "qwen3_vl_moe": _all_full,  # the same decoder with a sparse MoE block for the MLP
    "llama": _all_full,
    "mistral": _mistral_types,
    "qwen2": _declared_types,  # causal_mask_mapping[config.layer_types[i]]
    "qwen3": _declared_types,
}


def layer_types_for(model_type: str, text_config) -> list[str]:
    """The mask type of each decoder layer; raises ``UsageError`` for masks we cannot rebuild exactly."""
    if not getattr(text_config, "is_causal", True):
        raise UsageError(f"this {model_type} checkpoint is configured bidirectional (is_causal: false); "
                         "knockouts here assume a causal decoder")
    types = LAYER_TYPE_RULES[model_type](text_config)
    unknown = sorted(set(types) - set(LAYER_MASKS))
    if unknown:
        raise UsageError(f"{model_type} layer types {', '.join(unknown)} are not supported (only "
                         f"{', '.join(LAYER_MASKS)} masks are reproduced exactly)")
    if "sliding_attention" in types and not getattr(text_config, "sliding_window", None):
        raise UsageError(f"this {model_type} checkpoint has sliding_attention layers but no sliding_window")
    return types


@dataclass
class LayerInputs:
    """What enters decoder layer 0 for one sequence, and what the model adds along the way."""

    hidden: torch.Tensor  # (1, S, H) embeddings, image features scattered in
    rope_position_ids: torch.Tensor  # (3, 1, S) MRoPE ids for VL, (1, S) for text
    visual_mask: torch.Tensor | None = None  # (S,) True at image positions
    deepstack: list[torch.Tensor] = field(default_factory=list)  # per layer: (n_visual, H), added after it


class DecoderAdapter:
    """Where a model family keeps its decoder; subclasses fill in ``layer_inputs``."""

    def __init__(self, model: nn.Module, decoder: nn.Module):
        self.model = model
        self.decoder = decoder  # the module holding layers / norm / rotary_emb
        self.layer_types = layer_types_for(model.config.model_type, decoder.config)

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def rotary(self, hidden: torch.Tensor, rope_position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary_emb(hidden, rope_position_ids)

    def attention_configs(self) -> list:
        """The config objects the decoder's attention modules read ``_attn_implementation`` from."""
        configs = {id(self.decoder.config): self.decoder.config}
        for layer in self.layers:
            configs[id(layer.self_attn.config)] = layer.self_attn.config
        return list(configs.values())

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        raise NotImplementedError

    def layer_masks(self, hidden: torch.Tensor) -> list[torch.Tensor | None]:
        """The mask each layer gets in the model's own forward of one whole sequence (no padding, no cache).

        ``hidden`` (1, S, H) only sizes them. With our attention installed (or SDPA) each is a boolean
        (1, 1, S, S) mask of allowed scores, or None where it is plain causal (``sdpa_mask`` skips it:
        full layers, and sliding layers whose window covers the whole sequence).
        """
        built = {kind: LAYER_MASKS[kind](config=self.decoder.config, inputs_embeds=hidden, attention_mask=None,
                                         past_key_values=None)
                 for kind in set(self.layer_types)}
        return [built[kind] for kind in self.layer_types]


class TextAdapter(DecoderAdapter):
    """Llama-shaped causal LMs: ``model.model.{embed_tokens, layers, norm, rotary_emb}``, ``model.lm_head``."""

    def __init__(self, model: nn.Module):
        super().__init__(model, model.model)

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        hidden = self.decoder.embed_tokens(input_ids)  # (1, S, H)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, S)
        return LayerInputs(hidden=hidden, rope_position_ids=positions)


class Qwen3VLAdapter(DecoderAdapter):
    """Qwen3-VL: decoder at ``model.model.language_model``, vision tower at ``model.model.visual``."""

    def __init__(self, model: nn.Module):
        super().__init__(model, model.model.language_model)

    def layer_inputs(self, input_ids: torch.Tensor, model_kwargs: dict) -> LayerInputs:
        inner = self.model.model
        hidden = inner.get_input_embeddings()(input_ids)  # (1, S, H)
        grid = model_kwargs.get("image_grid_thw")
        visual_mask, deepstack = None, []
        if model_kwargs.get("pixel_values") is not None:
            features = inner.get_image_features(model_kwargs["pixel_values"], grid, return_dict=True)
            image_embeds = torch.cat(features.pooler_output, dim=0).to(hidden.device, hidden.dtype)
            visual_mask = (input_ids[0] == self.model.config.image_token_id)  # (S,)
            hidden = hidden.masked_scatter(visual_mask[None, :, None].expand_as(hidden), image_embeds)
            deepstack = list(features.deepstack_features)
        rope_position_ids, _ = inner.get_rope_index(
            input_ids, mm_token_type_ids=model_kwargs["mm_token_type_ids"], image_grid_thw=grid
        )  # (3, 1, S)
        return LayerInputs(hidden, rope_position_ids, visual_mask, deepstack)


def adapter_for(model: nn.Module) -> DecoderAdapter:
    model_type = model.config.model_type
    if model_type in VL_FAMILIES:
        return Qwen3VLAdapter(model)
    if model_type in TEXT_FAMILIES:
        return TextAdapter(model)
    raise UsageError(
        f"model type {model_type!r} is not supported; supported: {', '.join(VL_FAMILIES + TEXT_FAMILIES)}"
    )


@dataclass
class LoadedModel:
    model: nn.Module
    processor: object  # Qwen3VLProcessor for VL, the tokenizer for text models
    tokenizer: object
    adapter: DecoderAdapter
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def is_vl(self) -> bool:
        return isinstance(self.adapter, Qwen3VLAdapter)


def resolve_device(device: str) -> torch.device:
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(name: str, vision: bool, device: str = "auto", dtype: str = "auto", device_map: str | None = None,
               max_memory: str | None = None, offload_folder: str | None = None) -> LoadedModel:
    """Load a checkpoint (hub id or local folder) through ``from_pretrained``; errors say what is wrong.
    ``device_map`` (with ``max_memory``, ``offload_folder``): accelerate spreads the layers over the devices."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    name = locate_model(name)
    config = _load_config(name)
    model_type = getattr(config, "model_type", None)
    if vision and model_type not in VL_FAMILIES:
        raise UsageError(
            f"{name} is a {model_type!r} model, not Qwen3-VL; use mask-impact (mask_impact_analysis.py) for text-only models"
        )
    if not vision and model_type in VL_FAMILIES:
        raise UsageError(f"{name} is a Qwen3-VL model; use mask-impact-vl (mask_impact_vl.py) for it")
    if model_type not in VL_FAMILIES + TEXT_FAMILIES:
        raise UsageError(
            f"{name}: model type {model_type!r} is not supported; "
            f"supported: {', '.join(VL_FAMILIES + TEXT_FAMILIES)}"
        )
    try:
        layer_types_for(model_type, config.get_text_config())
    except UsageError as error:
        raise UsageError(f"{name}: {error}") from None
    if Path(name).is_dir():
        check_model_files(Path(name))
    processor, tokenizer = _load_processor(name, vision)
    model_class = getattr(transformers, VL_CLASSES[model_type]) if vision else transformers.AutoModelForCausalLM
    if device_map is None:
        model = _load_weights(model_class, name, torch_dtype)
        model.to(torch_device).eval()
    else:
        placement = placement_for(model_class, config, torch_dtype, device_map, max_memory, offload_folder)
        model = _load_weights(model_class, name, torch_dtype, **placement).eval()
        torch_device = input_device(model)
    return LoadedModel(model, processor, tokenizer, adapter_for(model), name, torch_device, torch_dtype)


def placement_for(model_class, config, dtype: torch.dtype, device_map: str, max_memory: str | None,
                  offload_folder: str | None) -> dict:
    """``from_pretrained``'s big-model arguments, after checking that some device can hold one decoder layer
    (accelerate never splits one): a too small ``--max-memory`` would otherwise put everything on disk."""
    from accelerate import init_empty_weights

    from .config import parse_max_memory

    placement = {"device_map": device_map}
    if max_memory is not None:
        budgets = parse_max_memory(max_memory)
        with init_empty_weights():
            empty = (model_class.from_config if hasattr(model_class, "from_config") else model_class._from_config)(
                config, dtype=dtype)
        layer = sum(p.numel() * p.element_size() for p in adapter_for(empty).layers[0].parameters())
        room = max((size for device, size in budgets.items() if device != "disk"), default=0)
        if room < layer:
            raise UsageError(f"--max-memory {max_memory} holds no decoder layer of this model ({layer / 2**20:.3g} "
                             "MiB each in this dtype; accelerate never splits one); give some device at least that")
        placement["max_memory"] = budgets
    if offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="mask_impact_offload_")
        atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
    placement["offload_folder"] = offload_folder
    return placement


def input_device(model: nn.Module) -> torch.device:
    """Where a model spread by a device map takes its inputs: its first GPU, else the CPU (accelerate's hooks
    move every layer's inputs to that layer's device, and offloaded weights in for the call)."""
    gpus = sorted(d for d in getattr(model, "hf_device_map", {}).values() if isinstance(d, int))
    return torch.device(f"cuda:{gpus[0]}") if gpus else torch.device("cpu")


WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # one of them: fast, BPE or SentencePiece


def locate_model(name: str) -> str:
    """A local folder (checked for the files a checkpoint needs) or a hub id that can be had right now."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        check_model_folder(folder)
        return str(folder)
    if folder.exists():
        raise UsageError(f"--model {bounded(name)} is a file; give the checkpoint's folder or a hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UsageError(f"model folder {bounded(name)} does not exist; check the --model path")
    if try_to_load_from_cache(name, "config.json") is None:  # not cached: the hub must be reachable now
        if hub_constants.HF_HUB_OFFLINE:
            raise UsageError(f"model {quoted(name)} is not in the local hub cache and HF_HUB_OFFLINE is set; "
                             "download it first, or pass a local folder")
        if not _hub_reachable():
            raise UsageError(f"model {quoted(name)} is not a local folder, not in the local hub cache, and the hub "
                             "cannot be reached (offline?); pass a local folder, or connect and retry")
    return name


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(hub_constants.ENDPOINT)
    try:
        with socket.create_connection((host.hostname, host.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_model_folder(folder: Path) -> None:
    """Say what is wrong with a local checkpoint folder's config before transformers gives a traceback."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UsageError(f"model folder {folder} has no config.json; is it a checkpoint folder?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{config_file} is not valid JSON ({_short_reason(error)}); restore it") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UsageError(f"{config_file} names no model_type; restore it from the original checkpoint")


def check_model_files(folder: Path) -> None:
    """The tokenizer and weight files a checkpoint folder needs, the weights whole."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"model folder {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise UsageError(f"model folder {folder} has no weights (*.safetensors or *.bin)")
    for path in weights:
        if path.suffix == ".safetensors":
            check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """The header must parse and the data must be as long as the header says (a cut copy is not)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_length <= size - 8:
            raise UsageError(f"{path} is truncated or not a safetensors file ({size:,} bytes)")
        try:
            header = json.loads(file.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UsageError(f"{path} has a damaged header; restore it from the original checkpoint") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        raise UsageError(f"{path} is truncated: {size:,} bytes, its header needs {expected:,}; download it again")


def _short_reason(error: Exception) -> str:
    return str(error).splitlines()[0][:120]


def _load_processor(name: str, vision: bool) -> tuple[object, object]:
    try:
        if vision:
            processor = transformers.AutoProcessor.from_pretrained(name)
            if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
                raise ValueError("no image processor")
            return processor, processor.tokenizer
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        return tokenizer, tokenizer
    except (OSError, ValueError, TypeError, KeyError) as error:
        what = "processor (tokenizer and image processor)" if vision else "tokenizer"
        raise UsageError(f"the {what} of {name} cannot be loaded ({_short_reason(error)}); the folder needs "
                         "tokenizer.json / tokenizer_config.json" + (" and processor_config.json" if vision else ""))


def _load_weights(model_class, name: str, dtype: torch.dtype, **placement) -> nn.Module:
    """``from_pretrained``, refusing a checkpoint whose weights do not fill the model its config describes
    (transformers would initialise the missing ones randomly and only log it)."""
    try:
        model, info = model_class.from_pretrained(name, dtype=dtype, attn_implementation="sdpa",
                                                  output_loading_info=True, **placement)
    except (OSError, RuntimeError, ValueError) as error:
        raise UsageError(f"the weights of {name} do not load ({_short_reason(error)}); does config.json match "
                         "the checkpoint?") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        raise UsageError(f"the weights of {name} do not match its config.json: {len(missing)} missing or "
                         f"mismatched, e.g. {missing[0]}; restore the checkpoint or its config.json")
    return model


def _load_config(name: str):
    try:
        return transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError, TypeError, KeyError) as error:
        text = str(error)
        if "does not recognize this architecture" in text or "model type" in text and "not" in text:
            raise UsageError(
                f"{name}: transformers {transformers.__version__} does not know this config's model type; "
                f"supported: {', '.join(VL_FAMILIES + TEXT_FAMILIES)}"
            ) from None
        if Path(name).is_dir():
            raise UsageError(f"{name}/config.json cannot be read as a model config ({_short_reason(error)})") from None
        raise UsageError(
            f"model {quoted(name)} could not be found on the hub; check the name, or pass a local folder"
        ) from None
    except Exception as error:  # transformers' strict config validation raises its own error types
        raise UsageError(f"{name}: config.json is not a valid config ({_short_reason(error)})") from None
