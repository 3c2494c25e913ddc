"""Attention-knockout analysis for Qwen3-VL: which tokens (text or image patches) the answer needs.

    python mask_impact_vl.py --demo
    python mask_impact_vl.py --image cat.png --prompt "What's in this image?" --mask-mode vision
"""

import sys

from mask_impact.stopping import entry

if __name__ == "__main__":
    sys.exit(entry(vision=True))
