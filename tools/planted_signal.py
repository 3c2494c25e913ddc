"""Print what the knockout analysis finds on the shipped demo models (see mask_impact/planted.py).

    python tools/planted_signal.py [--count 50] [--estimate]

For each task: how often the planted token ranks first by logprob_drop with the window = every layer,
its mean rank, and the single-layer sweep: mean drop of the planted token at each layer next to the
largest drop among all other tokens. ``--estimate``: the same with the first-order estimate (``--estimate K``'s
triage, ranked by magnitude) in place of the exact sweep, and how often the planted token is among its top 3 and 5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mask_impact.demo import SHIPPED  # noqa: E402
from mask_impact.models import load_model  # noqa: E402
from mask_impact.planted import text_planted, vl_planted  # noqa: E402


def show(title: str, report) -> None:
    print(f"{title}: answered correctly {report.correct_answers}/{len(report.ranks)}; planted token ranks first in "
          f"{report.top1_rate:.0%}, among the first 3 in {report.within(3):.0%}, 5 in {report.within(5):.0%}; mean rank "
          f"{report.mean_rank:.2f}")
    print("  layer   planted-token drop   largest other drop")
    for layer, (planted, other) in enumerate(zip(report.planted_by_layer, report.others_by_layer)):
        print(f"  {layer:>5}   {planted:>18.3f}   {other:>18.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--estimate", action="store_true", help="rank by the first-order estimate's magnitude")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    vl = load_model(str(SHIPPED / "demo-vl"), True, "cpu", "float32")
    for question in ("colour", "shape", "where"):
        show(f"demo-vl, '{question}' question, vision tokens", vl_planted(vl, question, args.count,
                                                                          estimate=args.estimate))
    text = load_model(str(SHIPPED / "demo-text"), False, "cpu", "float32")
    show("demo-text, recall, prompt tokens", text_planted(text, args.count, estimate=args.estimate))


if __name__ == "__main__":
    main()
