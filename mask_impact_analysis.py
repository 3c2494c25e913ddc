"""Attention-knockout analysis for text-only causal LMs (Qwen3, Qwen2, Llama, Mistral).

    python mask_impact_analysis.py --demo
    python mask_impact_analysis.py --model Qwen/Qwen3-4B --prompt prompt.txt --num-tokens 10
"""

import sys

from mask_impact.entry import entry

if __name__ == "__main__":
    sys.exit(entry(vision=False))
