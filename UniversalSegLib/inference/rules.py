"""Post-processing rules, in the order they run, and the one place that applies them.

Each rule is an object that declares what it needs, so `predict` can plan before the model runs:
- `helper_classes(info, registry)`: classes it must see besides the requested ones (a pair's other
  side, a child's parents, the vessels a lumen is compared with); `needed_classes` computes them.
- `keeps_values(info, computed)`: whether the class's voxel probabilities must be kept through
  restoration (the rule reads them, or recomputes the class's mean confidence after changing it).
- `needs_image` (HU of the input), `needs_trunk` (the body frame: trunk and limbs, built from the
  HU) and `needs_spine` (the vertebra masks, for the body midline).
- `applies_to(info, computed)`: the classes it changes. A rule that `streams` (acts on one class
  alone) runs inside restoration, while the class's slabs arrive, unless an earlier active rule
  also applies to that class (then it runs here, after that rule).

`RULES` is the order. Rules before the first one that `reads_confidence` change masks from the
predicted masks and their probabilities; each changed class's mean confidence is then computed
once over its final mask (`RuleState.settle`). `plausibility=False` leaves out the rules marked
`plausibility`; `postprocess=False` leaves out all of them.

Adding a rule = one `Rule` subclass here + one line in `RULES` (where in the order it belongs).
The mask operations themselves live in `postprocess.py` (registry rules, vessel lumens) and
`plausibility.py` (anatomy); this module says when each runs and what it needs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.inference.masks import BoxMask
from UniversalSegLib.inference.plausibility import Location, Trunk, check, without_limbs
from UniversalSegLib.inference.postprocess import (
    apply_rules,
    disjoint,
    disjoint_keys,
    largest_component,
    mean_within,
    outside_vessel_keys,
)
from UniversalSegLib.registry import ClassInfo


@dataclass
class RuleState:
    """What the rules read and change: the masks as restoration left them (`predicted`, never
    changed), the current `masks`, confidences, kept voxel probabilities and the reasons per class;
    `trunk`, the limb finder's result on `reference` (`plausibility.Trunk`), found once for every rule."""

    reference: sitk.Image
    model_spacing: Sequence[float]
    classes: dict[str, ClassInfo]  # the computed classes by key, in model order
    predicted: dict[str, BoxMask]
    values: dict[str, np.ndarray]  # uint8 probabilities of the predicted masks' voxels, where kept
    confidence: dict[str, float]
    streamed: set[str]  # classes whose streaming rule already ran during restoration
    masks: dict[str, BoxMask] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    trunk: Trunk | None = None

    def __post_init__(self) -> None:
        self.masks = self.masks or dict(self.predicted)
        self.trunk = self.trunk or Trunk(self.reference)  # found on first use

    def note(self, key: str, reason: str) -> None:
        self.reasons.setdefault(key, []).append(reason)

    def settle(self) -> None:
        """Mean confidence over the final mask of each class whose mask changed and whose voxel
        probabilities were kept (a side may hold voxels its pair predicted: read them there)."""
        for key in self.values:
            if self.masks[key] is not self.predicted[key]:
                sources = [(self.predicted[k], self.values[k]) for k in (key, self.classes[key].pair)
                           if k in self.values]
                self.confidence[key] = mean_within(self.masks[key], sources)


class Rule:
    """A post-processing rule (see the module docstring for each declaration)."""

    name = "rule"
    plausibility = False  # part of the anatomical plausibility check (off with plausibility=False)
    needs_image = False
    needs_trunk = False
    needs_spine = False
    streams = False
    reads_confidence = False

    def applies_to(self, info: ClassInfo, computed: Collection[str]) -> bool:
        return False

    def helper_classes(self, info: ClassInfo, registry: Sequence[ClassInfo]) -> list[str]:
        return []

    def keeps_values(self, info: ClassInfo, computed: Collection[str]) -> bool:
        return False

    def apply(self, state: RuleState) -> None:
        raise NotImplementedError


def _paired(info: ClassInfo, computed: Collection[str]) -> bool:
    """A side of a pair whose other side is computed too."""
    return (info.postprocess == "split_pair" and info.pair in computed
            and info.laterality in ("left", "right"))


class OutsideLimbs(Rule):
    """Components lying mostly in an arm or leg go (`plausibility.without_limbs`), before a rule picks
    the largest component: the bundled model's 221 ml "aorta" in an arm otherwise wins over the
    real aorta (issue 25)."""

    name, plausibility, needs_image, needs_trunk = "outside_limbs", True, True, True

    def applies_to(self, info, computed):
        return Location.of(info).trunk

    def apply(self, state):
        pruned, reasons = without_limbs(state.masks, state.classes, state.reference, state.trunk)
        for key, reason in reasons.items():  # only a reported removal changes a mask
            state.masks[key] = pruned[key]
            state.note(key, reason)
            if not pruned[key]:
                state.confidence[key] = 0.0  # as `check` does for a mask it empties


class LargestComponent(Rule):
    """"largest_component", and the side of a pair whose other side is not computed: the largest
    26-connected component. Streams (restoration keeps only that component and its mean)."""

    name, streams = "largest_component", True

    def applies_to(self, info, computed):
        return info.postprocess == "largest_component" or (
            info.postprocess == "split_pair" and not _paired(info, computed))

    def keeps_values(self, info, computed):
        return self.applies_to(info, computed)  # when it does not stream: its mean, after the rule

    def apply(self, state):
        for key, info in state.classes.items():
            if key not in state.streamed and self.applies_to(info, state.classes):
                state.masks[key] = largest_component(state.masks[key])
                state.confidence[key] = mean_within(state.masks[key], [(state.predicted[key], state.values[key])])


class DistinctLumens(Rule):
    """Vessels are distinct lumens and no organ lies in one (`postprocess.disjoint`), judged on the
    predicted masks; what earlier rules removed stays removed."""

    name = "distinct_lumens"

    def applies_to(self, info, computed):
        return info.key in disjoint_keys([info]) or info.key in outside_vessel_keys([info])

    def helper_classes(self, info, registry):
        return disjoint_keys(registry) if self.applies_to(info, ()) else []

    def keeps_values(self, info, computed):
        return info.key in disjoint_keys([info])  # organs are compared by their mean confidence

    def apply(self, state):
        infos = list(state.classes.values())
        vessels = disjoint_keys(infos)
        organs = outside_vessel_keys(infos) if vessels else []
        resolved = disjoint(state.predicted, state.values, vessels, {k: state.confidence[k] for k in organs})
        for key, mask in resolved.items():
            earlier = state.masks[key]
            state.masks[key] = mask if earlier is state.predicted[key] else _both(mask, earlier)
        for key in organs:  # organs keep no voxel values: the mean stays unless the organ is gone
            state.confidence[key] = state.confidence[key] if state.masks[key] else 0.0


class SplitPair(Rule):
    """"split_pair" with both sides computed: the two largest components of the union, by side
    (`postprocess.split_pair`)."""

    name = "split_pair"

    def applies_to(self, info, computed):
        return _paired(info, computed)

    def helper_classes(self, info, registry):
        return [info.pair] if info.postprocess == "split_pair" and info.pair else []

    def keeps_values(self, info, computed):
        return self.applies_to(info, computed)

    def apply(self, state):
        pairs = {k: info for k, info in state.classes.items() if self.applies_to(info, state.classes)}
        state.masks = apply_rules(state.masks, pairs, state.reference, state.model_spacing, rules=("split_pair",))


class WithinParents(Rule):
    """"within_parents": only the part inside the parents' final masks (a tumour in its organ)."""

    name = "within_parents"

    def applies_to(self, info, computed):
        return info.postprocess == "within_parents"

    def helper_classes(self, info, registry):
        return list(info.parents) if self.applies_to(info, ()) else []

    def keeps_values(self, info, computed):
        return self.applies_to(info, computed)

    def apply(self, state):
        state.masks = apply_rules(state.masks, state.classes, state.reference, state.model_spacing,
                                  rules=("within_parents",))


class PlausiblePosition(Rule):
    """Where each final mask lies (`plausibility.check`): components in a limb go, a mask in an
    implausible position keeps half its confidence; each with its reason."""

    name, plausibility, reads_confidence = "plausible_position", True, True
    needs_image, needs_trunk, needs_spine = True, True, True

    def applies_to(self, info, computed):
        return True

    def apply(self, state):
        checked = check(state.masks, state.confidence, state.classes, state.reference, trunk=state.trunk)
        state.masks, state.confidence = checked.masks, checked.confidence
        for key, reason in checked.reasons.items():
            state.note(key, reason)


RULES: tuple[Rule, ...] = (OutsideLimbs(), LargestComponent(), DistinctLumens(), SplitPair(), WithinParents(),
                           PlausiblePosition())


def _both(a: BoxMask, b: BoxMask) -> BoxMask:
    """The voxels in both masks."""
    if not a or not b:
        return BoxMask.empty(a.shape)
    return BoxMask(a.shape, a.start, a.crop() & b.region(a.start, a.stop))


def helper_keys(info: ClassInfo, registry: Sequence[ClassInfo]) -> list[str]:
    """Every class some rule needs to see when `info` is computed (whether or not post-processing runs,
    so a class comes out the same however it was picked)."""
    return [key for rule in RULES for key in rule.helper_classes(info, registry)]


@dataclass(frozen=True)
class Restoration:
    """What restoration does for one class: keep only its largest component (a streamed rule),
    keep its voxel probabilities (a later rule reads them)."""

    largest_only: bool
    keep_values: bool


class Postprocessing:
    """The active rules for one prediction of `computed` classes.

    Args:
        computed: the classes the model computes (requested and helpers), in model order.
        postprocess: run the rules at all.
        plausibility: run the rules marked `plausibility`.
    """

    def __init__(self, computed: Sequence[ClassInfo], postprocess: bool = True, plausibility: bool = True):
        self.classes = {c.key: c for c in computed}
        self.rules = [r for r in RULES if postprocess and (plausibility or not r.plausibility)]

    def _streamed_by(self, info: ClassInfo) -> Rule | None:
        """The streaming rule that restoration runs for `info`, if any."""
        for i, rule in enumerate(self.rules):
            if rule.streams and rule.applies_to(info, self.classes):
                earlier = any(r.applies_to(info, self.classes) for r in self.rules[:i])
                return None if earlier else rule
        return None

    def restoration(self, info: ClassInfo) -> Restoration:
        """How restoration treats `info` (see `Restoration`)."""
        streamed = self._streamed_by(info)
        keep = any(r.keeps_values(info, self.classes) for r in self.rules if r is not streamed)
        return Restoration(largest_only=streamed is not None, keep_values=keep)

    def apply(self, reference: sitk.Image, model_spacing: Sequence[float], masks: Mapping[str, BoxMask],
              confidence: Mapping[str, float], values: Mapping[str, np.ndarray], trunk: Trunk | None = None
              ) -> tuple[dict[str, BoxMask], dict[str, float], dict[str, str]]:
        """Run the rules on the restored masks; returns (masks, mean confidences, reasons) by class key.

        Args:
            reference: the input CT (HU), whose grid the masks are on.
            model_spacing: the model grid's spacing (mm), for rule sizes given in model voxels.
            masks, confidence: every computed class as restoration returned it.
            values: uint8 probabilities of the masks' voxels, for the classes `restoration` kept them.
            trunk: the limb finder's result on `reference` when the caller has one (`predict`: its
                blanking's), else found here on first use.
        """
        streamed = {k for k, info in self.classes.items() if self._streamed_by(info) is not None}
        state = RuleState(reference, model_spacing, self.classes, dict(masks), dict(values), dict(confidence),
                          streamed, trunk=trunk)
        settled = False
        for rule in self.rules:
            if rule.reads_confidence and not settled:
                state.settle()
                settled = True
            rule.apply(state)
        if not settled:
            state.settle()
        return state.masks, state.confidence, {k: "; ".join(r) for k, r in state.reasons.items()}
