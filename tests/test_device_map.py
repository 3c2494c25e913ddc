"""A model spread by accelerate's device map, part of it offloaded, computes exactly what the whole model on one
device computes (the fast engine calls each layer through accelerate's hooks, which bring its weights in)."""

from __future__ import annotations

import pytest

from mask_impact import Analyzer
from mask_impact.config import DEMO_IMAGE
from mask_impact.demo import demo_model_path
from tests.support import cli_error

# the demo VL model is 2.8 MB: 1.5 MB of CPU memory holds some of it, the rest goes to the offload folder
SPREAD = {"device_map": "auto", "max_memory": "cpu=1500KB"}


@pytest.fixture(scope="module")
def whole():
    return Analyzer.demo(vision=True)


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    analyzer = Analyzer.from_pretrained(str(demo_model_path(True)), dtype="float32", offload_folder=str(folder),
                                        **SPREAD)
    placed = set(analyzer.loaded.model.hf_device_map.values())
    assert placed == {"cpu", "disk"}, placed  # really spread: some modules in memory, some offloaded
    # offloaded weights wait on the meta device (read from the checkpoint's safetensors when a layer runs)
    assert analyzer.loaded.adapter.layers[-1].self_attn.q_proj.weight.device.type == "meta"
    return analyzer


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"mask_mode": "both", "num_tokens": 3},
    {"flows": ["image->last", "question->last"], "window": 2, "num_tokens": 2, "block_from": "answer"},
    {"mask_mode": "vision", "engine": "naive", "layers": "1", "num_tokens": 2},
])
def test_a_device_map_with_offload_gives_the_same_numbers(whole, spread, options):
    prompt = "What colour is the shape?"
    a = whole.run(prompt, images=[DEMO_IMAGE], progress=False, **options)
    b = spread.run(prompt, images=[DEMO_IMAGE], progress=False, **options)
    assert a.data["baseline"] == b.data["baseline"]
    assert a.data["metrics"] == b.data["metrics"]  # exactly: the same weights, the same kernels
    assert a.data["generations"] == b.data["generations"]


@pytest.mark.slow
def test_the_estimate_on_a_device_map_with_offload_is_the_same(whole, spread):
    """--estimate's forward and backward pass run through accelerate's hooks too (offloaded weights included)."""
    options = dict(images=[DEMO_IMAGE], progress=False, mask_mode="both", num_tokens=2, estimate=4, estimate_sample=3)
    a, b = whole.run("What colour is the shape?", **options), spread.run("What colour is the shape?", **options)
    assert a.data["estimate"]["logprob_drop"] == b.data["estimate"]["logprob_drop"]
    assert a.data["estimate"]["exact_cells"] == b.data["estimate"]["exact_cells"]
    assert a.data["metrics"] == b.data["metrics"]


def test_device_map_options_are_checked_before_the_model_loads(capsys, in_tmp):
    demo = ["--demo", "--output", "x"]
    assert "not one of accelerate's: auto, balanced" in cli_error(capsys, [*demo, "--device-map", "everywhere"])
    assert "give it with --device-map" in cli_error(capsys, [*demo, "--max-memory", "cpu=1GB"])
    assert "drop --device" in cli_error(capsys, [*demo, "--device-map", "auto", "--device", "cpu"])
    assert "write DEVICE=SIZE pairs" in cli_error(capsys, [*demo, "--device-map", "auto", "--max-memory", "cpu"])
    assert "is not a size" in cli_error(capsys, [*demo, "--device-map", "auto", "--max-memory", "cpu=lots"])
    assert "must be more than 0" in cli_error(capsys, [*demo, "--device-map", "auto", "--max-memory", "cpu=0"])
    err = cli_error(capsys, [*demo, "--device-map", "auto", "--max-memory", "cpu=100KB"])
    assert "holds no decoder layer of this model (0.388 MiB" in err
    assert not (in_tmp / "output").exists()
