"""Post-processing rules as objects (inference/rules.py): declarations drive planning, one place applies them."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.inference import rules as rules_module
from UniversalSegLib.inference.masks import BoxMask
from UniversalSegLib.inference.request import needed_classes
from UniversalSegLib.inference.rules import RULES, Postprocessing, Rule
from UniversalSegLib.registry import default_registry
from UniversalSegLib.store import find_model, read_manifest

REG = default_registry()


def test_rules_declare_what_they_need():
    by_name = {r.name: r for r in RULES}
    assert list(by_name) == ["outside_limbs", "largest_component", "distinct_lumens", "split_pair",
                             "within_parents", "plausible_position"]
    assert by_name["split_pair"].helper_classes(REG["kidney_left"], list(REG)) == ["kidney_right"]
    assert by_name["within_parents"].helper_classes(REG["liver_tumor"], list(REG)) == ["liver"]
    assert "aorta" in by_name["distinct_lumens"].helper_classes(REG["liver"], list(REG))
    assert by_name["plausible_position"].needs_image and by_name["plausible_position"].needs_spine
    assert by_name["outside_limbs"].needs_trunk and not by_name["outside_limbs"].needs_spine
    assert [r.name for r in RULES if r.plausibility] == ["outside_limbs", "plausible_position"]
    assert by_name["largest_component"].streams and not by_name["split_pair"].streams


def test_largest_component_streams_only_without_an_earlier_rule():
    # liver: largest component. With the plausibility rules the arm's components go first, so the
    # rule runs after restoration and the voxel probabilities are kept for the mean confidence.
    liver = REG["liver"]
    with_check = Postprocessing([liver], postprocess=True, plausibility=True).restoration(liver)
    without = Postprocessing([liver], postprocess=True, plausibility=False).restoration(liver)
    off = Postprocessing([liver], postprocess=False).restoration(liver)
    assert (with_check.largest_only, with_check.keep_values) == (False, True)
    assert (without.largest_only, without.keep_values) == (True, False)
    assert (off.largest_only, off.keep_values) == (False, False)


def test_needed_classes_come_from_the_rules(monkeypatch):
    class NeedsSpleen(Rule):
        name = "needs_spleen"

        def helper_classes(self, info, registry):
            return ["spleen"] if info.key == "gallbladder" else []

    manifest = read_manifest(find_model(None))
    _, before = needed_classes(manifest, ["gallbladder"])
    monkeypatch.setattr(rules_module, "RULES", (*RULES, NeedsSpleen()))
    _, after = needed_classes(manifest, ["gallbladder"])
    assert "spleen" not in {c.key for c in before}
    assert {c.key for c in after} == {c.key for c in before} | {"spleen"}


def test_a_new_rule_is_one_class_and_one_line(monkeypatch):
    # a rule that empties the gallbladder: applied in the one place, its reason reaches the result
    class NoGallbladder(Rule):
        name = "no_gallbladder"

        def applies_to(self, info, computed):
            return info.key == "gallbladder"

        def apply(self, state):
            state.masks["gallbladder"] = BoxMask.empty(state.masks["gallbladder"].shape)
            state.note("gallbladder", "removed by a test rule")

    monkeypatch.setattr(rules_module, "RULES", (*RULES[:-1], NoGallbladder(), RULES[-1]))
    image = sitk.GetImageFromArray(np.full((12, 12, 12), -1000, np.int16))
    crop = np.zeros((12, 12, 12), bool)
    crop[4:8, 4:8, 4:8] = True
    masks = {"gallbladder": BoxMask(crop.shape, (0, 0, 0), crop)}
    post = Postprocessing([REG["gallbladder"]], plausibility=False)
    out, confidence, reasons = post.apply(image, [1.5] * 3, masks, {"gallbladder": 0.9}, {})
    assert not out["gallbladder"] and reasons == {"gallbladder": "removed by a test rule"}
    assert confidence == {"gallbladder": 0.9}
