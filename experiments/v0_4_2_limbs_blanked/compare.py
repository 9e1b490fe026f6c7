"""The arm variants' Dice change against their scan without arms, before and after blanking the
limbs in the model's input: two `measure_variants.py report --json` files side by side.

    python experiments/v0.4.2_limbs_blanked/compare.py BEFORE.json AFTER.json

BEFORE: the v0.4.1 figures (plausibility check, no blanking); AFTER: this folder's figures.json.
Prints per arm variant and class the Dice change against the scan without arms (after the check),
how many classes lie beyond `TOLERANCE`, the unflagged wrong masks, and B's left common carotid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TOLERANCE = 0.02  # issue 25: A's Dice within 0.02 of the version without arms
ARM_VARIANTS = ("A_arms_apart", "A_arms_touching", "B_arms", "C_arms")
CAROTID = "common_carotid_artery_left"


def _row(figures: dict, name: str) -> dict[str, float | None]:
    return figures[name].get("dice_change", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    for name in ARM_VARIANTS:
        old, new = _row(before, name), _row(after, name)
        keys = [k for k in new if new[k] is not None or old.get(k) is not None]
        print(f"\n{name}: Dice change vs {name[0]} without arms (before blanking -> after)")
        print("| class | before | after |\n|---|---|---|")
        for k in keys:
            mark = " **" if new.get(k) is not None and abs(new[k]) > TOLERANCE else ""
            print(f"| {k} | {old.get(k)} | {new.get(k)}{mark} |")
        for stage, row in (("before", old), ("after", new)):
            changes = {k: v for k, v in row.items() if v is not None}
            beyond = sorted(k for k, v in changes.items() if abs(v) > TOLERANCE)
            print(f"{stage}: beyond {TOLERANCE}: {beyond}; worst {min(changes.values(), default=None)}")
        print(f"unflagged wrong: before {before[name]['unflagged_wrong']['after']}, "
              f"after {after[name]['unflagged_wrong']['after']}")
    for figures, stage in ((before, "before"), (after, "after")):
        dice = {n: figures[n]["dice"]["after"].get(CAROTID) for n in ("B", "B_arms")}
        print(f"B's left common carotid ({stage} blanking): B {dice['B']}, B with arms {dice['B_arms']}")
    print("unflagged wrong masks (after blanking), all variants:",
          {n: r["unflagged_wrong"]["after"] for n, r in after.items()})


if __name__ == "__main__":
    main()
