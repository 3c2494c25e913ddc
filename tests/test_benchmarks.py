"""The benchmarks run from a clone alone: the 4B architecture they build is carried in the repository."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import HANG_S, ROOT

CONFIG = ROOT / "benchmarks" / "configs" / "qwen3-vl-4b-instruct.json"


def test_the_4b_architecture_is_in_the_repository():
    for script in ("bench_sweep.py", "bench_processes.py"):
        source = (ROOT / "benchmarks" / script).read_text()
        assert 'ROOT / "benchmarks" / "configs" / "qwen3-vl-4b-instruct.json"' in source and "../shared" not in source
        assert '"shared" / "configs"' not in source
    config = json.loads(CONFIG.read_text())
    assert config["model_type"] == "qwen3_vl" and config["text_config"]["num_hidden_layers"] == 36


@pytest.mark.slow
def test_the_sweep_benchmark_reads_it_from_anywhere(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sweep.py"), "--arch", "qwen3-vl-4b",
                           "--flops-only"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("qwen3-vl-4b-instruct.json: ViT 24 layers") and "decoder 36 layers" in done.stdout
