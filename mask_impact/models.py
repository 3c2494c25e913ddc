"""Loading models: a checkpoint folder or hub id, checked, loaded through ``from_pretrained``, and its family's adapter.

What each family's model looks like inside — its decoder, masks, layer-0 inputs, logits, image geometry — is its
adapter's business (``families/``, one file per family, registered by ``model_type``). A checkpoint whose family has
no adapter, or whose masks we cannot rebuild exactly, is refused at load, never run.

Demo models are built offline, saved, and loaded back through ``from_pretrained`` exactly like a
real checkpoint (see ``demo.py``).
"""

from __future__ import annotations

import atexit
import json
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from torch import nn

from .config import UsageError, bounded, check_device, quoted
from .errors import mention
from .families import DecoderAdapter, LayerInputs, adapter_for, family_class, supported  # noqa: F401

# One adapter per family, registered by model_type (families/); these names stay for the callers.
VL_FAMILIES = supported(images=True)
TEXT_FAMILIES = supported(images=False)


@dataclass
class LoadedModel:
    model: nn.Module
    processor: object  # the family's processor for VL, the tokenizer for text models
    tokenizer: object
    adapter: DecoderAdapter
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def is_vl(self) -> bool:
        return self.adapter.takes_images


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
               max_memory: str | None = None, offload_folder: str | None = None,
               hub: dict | None = None) -> LoadedModel:
    """Load a checkpoint (hub id or local folder) through ``from_pretrained``; errors say what is wrong.
    ``device_map`` (with ``max_memory``, ``offload_folder``): accelerate spreads the layers over the devices.
    ``hub``: Hugging Face keywords given to every ``from_pretrained`` (``HUB_KEYWORDS``: ``revision``, ...)."""
    hub = dict(hub or {})
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    name = locate_model(name, hub)
    config = _load_config(name, hub)
    model_type = getattr(config, "model_type", None)
    try:
        family = family_class(model_type)
        family.checked_layer_types(model_type, config.get_text_config())
    except UsageError as error:
        raise UsageError(f"{name}: {error}") from None
    if vision and not family.takes_images:
        raise UsageError(f"{name} is a {model_type!r} model, not a vision-language one "
                         f"({', '.join(VL_FAMILIES)}); use mask-impact (mask_impact_analysis.py) for text-only models")
    if not vision and family.takes_images:
        raise UsageError(f"{name} is a {model_type!r} vision-language model; use mask-impact-vl (mask_impact_vl.py) "
                         "for it")
    if Path(name).is_dir():
        check_model_files(Path(name))
    processor, tokenizer = _load_processor(name, vision, hub)
    model_class = getattr(transformers, family.class_name(model_type))
    if device_map is None:
        model = _load_weights(model_class, name, torch_dtype, family.native_attention, **hub)
        model.to(torch_device).eval()
    else:
        placement = placement_for(model_class, config, torch_dtype, device_map, max_memory, offload_folder)
        model = _load_weights(model_class, name, torch_dtype, family.native_attention, **placement, **hub).eval()
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
            raise UsageError(f"{mention('max_memory', max_memory)} holds no decoder layer of this model "
                             f"({layer / 2**20:.3g} MiB each in this dtype; accelerate never splits one); give some "
                             "device at least that")
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


# Hugging Face keywords the Python API passes through to every from_pretrained (Analyzer.from_pretrained): they
# choose which files are read, never how the model computes
HUB_KEYWORDS = ("revision", "cache_dir", "token", "local_files_only")


def locate_model(name: str, hub: dict | None = None) -> str:
    """A local folder (checked for the files a checkpoint needs) or a hub id that can be had right now (``hub``:
    its ``revision`` and ``cache_dir``, if given)."""
    hub = hub or {}
    folder = Path(name).expanduser()
    if folder.is_dir():
        check_model_folder(folder)
        return str(folder)
    if folder.exists():
        raise UsageError(f"{mention('model', bounded(name))} is a file; give the checkpoint's folder or a hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UsageError(f"model folder {bounded(name)} does not exist; check the {mention('model')} path")
    cached = try_to_load_from_cache(name, "config.json", cache_dir=hub.get("cache_dir"), revision=hub.get("revision"))
    if cached is None:  # not cached: the hub must be reachable now
        if hub_constants.HF_HUB_OFFLINE or hub.get("local_files_only"):
            why = "local_files_only is given" if hub.get("local_files_only") else "HF_HUB_OFFLINE is set"
            raise UsageError(f"model {quoted(name)} is not in the local hub cache and {why}; "
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


def _load_processor(name: str, vision: bool, hub: dict | None = None) -> tuple[object, object]:
    hub = hub or {}
    try:
        if vision:
            processor = transformers.AutoProcessor.from_pretrained(name, **hub)
            if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
                raise ValueError("no image processor")
            return processor, processor.tokenizer
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **hub)
        return tokenizer, tokenizer
    except (OSError, ValueError, TypeError, KeyError) as error:
        what = "processor (tokenizer and image processor)" if vision else "tokenizer"
        raise UsageError(f"the {what} of {name} cannot be loaded ({_short_reason(error)}); the folder needs "
                         "tokenizer.json / tokenizer_config.json" + (" and processor_config.json" if vision else ""))


def _load_weights(model_class, name: str, dtype: torch.dtype, attention: str = "sdpa", **placement) -> nn.Module:
    """``from_pretrained`` with the family's native attention (Gemma 2: eager, which transformers from 5.2x requires
    at load: it refuses SDPA there), refusing a checkpoint whose weights do not fill the model its config describes
    (transformers would initialise the missing ones randomly and only log it)."""
    try:
        model, info = model_class.from_pretrained(name, dtype=dtype, attn_implementation=attention,
                                                  output_loading_info=True, **placement)
    except (OSError, RuntimeError, ValueError) as error:
        raise UsageError(f"the weights of {name} do not load ({_short_reason(error)}); does config.json match "
                         "the checkpoint?") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        raise UsageError(f"the weights of {name} do not match its config.json: {len(missing)} missing or "
                         f"mismatched, e.g. {missing[0]}; restore the checkpoint or its config.json")
    return model


def _load_config(name: str, hub: dict | None = None):
    try:
        return transformers.AutoConfig.from_pretrained(name, **(hub or {}))
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
