"""Print what the knockout analysis finds on the shipped demo models (see mask_impact/planted.py).

    python tools/planted_signal.py [--count 50] [--estimate | --triage K ...]

For each task: how often the planted token ranks first by logprob_drop with the window = every layer,
its mean rank, and the single-layer sweep: mean drop of the planted token at each layer next to the
largest drop among all other tokens. ``--estimate``: the same with the first-order estimate (``--estimate K``'s
triage, ranked by magnitude) in place of the exact sweep, and how often the planted token is among its top 3 and 5.
``--triage K`` (repeatable): also what an ``--estimate K`` run shows: how often the cells it computes exactly (the K
largest |estimate| and K random others) include the planted token, and rank it first by exact drop.
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
          f"{report.top1_rate:.0%}, among the first 3 in {report.within(3):.0%}, 5 in {report.within(5):.0%}; mean "
          f"rank {report.mean_rank:.2f} of {sum(report.cells) / len(report.cells):.1f}")
    print("  layer   planted-token drop   largest other drop")
    for layer, (planted, other) in enumerate(zip(report.planted_by_layer, report.others_by_layer)):
        print(f"  {layer:>5}   {planted:>18.3f}   {other:>18.3f}")
    for k in report.triage_ranks:
        print(f"  --estimate {k} (computes {report.computed_share(k):.0%} of the cells exactly): the planted token is "
              f"among them in {report.triage_computed_rate(k):.0%}, first among them by exact drop in "
              f"{report.triage_top1_rate(k):.0%}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2, no usage dump (as the commands')
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--estimate", action="store_true", help="rank by the first-order estimate's magnitude")
    parser.add_argument("--triage", type=int, action="append", default=[], metavar="K",
                        help="also show what an --estimate K run finds (repeatable)")
    args = parser.parse_args()
    if args.estimate and args.triage:
        parser.error("--triage measures --estimate K runs against the exact sweep: give it without --estimate")
    if args.count < 1:
        parser.error(f"--count must be at least 1: the examples per task (got {args.count})")
    if any(k < 1 for k in args.triage):  # as --estimate: K cells computed exactly, at least one
        parser.error(f"--triage must be at least 1: the K of an --estimate K run (got {min(args.triage)})")
    triage = tuple(dict.fromkeys(args.triage))  # a K given twice is measured once
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    vl = load_model(str(SHIPPED / "demo-vl"), True, "cpu", "float32")
    for question in ("colour", "shape", "where"):
        show(f"demo-vl, '{question}' question, vision tokens", vl_planted(vl, question, args.count,
                                                                          estimate=args.estimate, triage=triage))
    text = load_model(str(SHIPPED / "demo-text"), False, "cpu", "float32")
    show("demo-text, recall, prompt tokens", text_planted(text, args.count, estimate=args.estimate, triage=triage))


if __name__ == "__main__":
    main()
