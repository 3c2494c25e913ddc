"""Attention-knockout analysis for vision-language models (Qwen3-VL, Qwen2-VL, Qwen2.5-VL, LLaVA-1.5): which tokens
(text or image patches) the answer needs.

    python mask_impact_vl.py --demo
    python mask_impact_vl.py --image cat.png --prompt "What's in this image?" --mask-mode vision
"""

import sys

from mask_impact.entry import entry

if __name__ == "__main__":
    sys.exit(entry(vision=True))
