"""Per variant, what a candidate model changes against a baseline (`measure_variants report --json` files):
unflagged wrong masks, how many classes gain or lose more than 0.01 Dice, every loss beyond 0.02 (issue 25's
limit), and the contrast-phase classes of the portal-venous variants.

    python -m experiments.contrast_phases_2g.compare BASELINE.json CANDIDATE.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LIMIT = 0.02
PHASE_CLASSES = ("aorta", "inferior_vena_cava", "liver", "spleen", "kidney_left", "kidney_right", "vertebrae_T12",
                 "common_carotid_artery_left", "brachiocephalic_trunk", "subclavian_artery_left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    args = parser.parse_args()
    base, cand = (json.loads(p.read_text()) for p in (args.baseline, args.candidate))
    for name, row in base.items():
        before, after = row["dice"]["after"], cand[name]["dice"]["after"]
        change = {k: after[k] - before[k] for k in before if before[k] is not None and after.get(k) is not None}
        worse = {k: f"{before[k]:.3f}->{after[k]:.3f}" for k, d in change.items() if d < -LIMIT}
        unflagged = row["unflagged_wrong"]["after"], cand[name]["unflagged_wrong"]["after"]
        print(f"{name:16s} unflagged wrong {unflagged[0]} -> {unflagged[1]}; "
              f"+0.01: {sum(d > 0.01 for d in change.values())}, -0.01: {sum(d < -0.01 for d in change.values())}; "
              f"beyond -{LIMIT}: {worse or 'none'}")
        if name.endswith("portal_venous"):
            print("    ", {k: f"{before[k]:.3f}->{after[k]:.3f}" for k in PHASE_CLASSES if k in change})


if __name__ == "__main__":
    main()
