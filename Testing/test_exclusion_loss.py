"""The exclusion loss: unannotated classes learn 0 only where an unrelated annotated class claims the voxel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from UniversalSegLib.registry import default_registry
from UniversalSegLib.train.losses import exclusion_loss, overlap_matrix


def _case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 3, 4, 4, 4), generator=g, requires_grad=True)
    target = torch.zeros((2, 3, 4, 4, 4))
    target[0, 0, :2] = 1  # sample 0 annotates class 0 (its structure fills half the patch)
    target[1, 1, :, :1] = 1  # sample 1 annotates class 1
    annotated = torch.tensor([[True, False, False], [False, True, False]])
    return logits, target, annotated


def test_value_is_bce_towards_zero_on_claimed_voxels_of_unannotated_classes():
    logits, target, annotated = _case()
    may_overlap = torch.eye(3, dtype=torch.bool)
    expected = 0.0
    for b, k in ((0, 0), (1, 1)):
        region = target[b, k] > 0
        for c in range(3):
            if not annotated[b, c]:
                expected += (F.softplus(logits[b, c]) * region).mean() / 2
    torch.testing.assert_close(exclusion_loss(logits, target, annotated, may_overlap), expected)


def test_gradient_reaches_only_unannotated_unrelated_classes_on_claimed_voxels():
    logits, target, annotated = _case()
    may_overlap = torch.eye(3, dtype=torch.bool)
    may_overlap[0, 2] = may_overlap[2, 0] = True  # class 2 may lie inside class 0 (a tumour in its organ)
    exclusion_loss(logits, target, annotated, may_overlap).backward()
    grad = logits.grad
    assert grad[0, 0].abs().sum() == 0 and grad[1, 1].abs().sum() == 0  # annotated pairs: the other loss's job
    assert grad[0, 2].abs().sum() == 0  # related to the annotated class: its voxels say nothing
    assert (grad[0, 1] != 0).equal(target[0, 0] > 0)  # unrelated: pushed down exactly on the claimed voxels
    assert (grad[0, 1] > 0).equal(target[0, 0] > 0)  # towards 0 (gradient of softplus is positive)
    assert (grad[1, 0] != 0).equal(target[1, 1] > 0) and (grad[1, 2] != 0).equal(target[1, 1] > 0)


def test_overlap_matrix_follows_parents():
    registry = default_registry()
    classes = [registry.resolve(k) for k in ("liver", "liver_tumor", "spleen", "hepatic_vessel")]
    m = overlap_matrix(classes)
    assert m.diagonal().all() and m.equal(m.T)
    assert m[0, 1] and not m[0, 2] and not m[1, 2]
    assert m[0, 3] == ("liver" in classes[3].parents)


def test_shape_errors_are_clear():
    logits, target, annotated = _case()
    with pytest.raises(ValueError, match="may_overlap"):
        exclusion_loss(logits, target, annotated, torch.eye(2, dtype=torch.bool))
