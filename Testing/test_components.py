"""Connected components on line-shaped arrays (cc3d 4.1's 26-connectivity fails there), and
`largest_k`'s order.

Found through `predict` on a pelvic slab with 64^3 windows: a one-voxel-thin probability piece of
shape (1, 3, 1) made cc3d raise "maximum length exception" and the whole prediction fail.
"""

import numpy as np
import pytest

from UniversalSegLib.components import connected_components, largest_k
from UniversalSegLib.inference.restore import _component_sums


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_two_voxels_on_a_line_are_two_components(axis, connectivity):
    shape = [1, 1, 1]
    shape[axis] = 5
    mask = np.zeros(shape, bool)
    index = [0, 0, 0]
    for i in (0, 2, 3):
        index[axis] = i
        mask[tuple(index)] = True
    labels, n = connected_components(mask, connectivity=connectivity, return_N=True)
    assert n == 2
    assert labels.ravel().tolist() == [1, 0, 2, 2, 0]
    assert largest_k(mask, k=1, connectivity=connectivity).ravel().tolist() == [0, 0, 1, 1, 0]


def test_plates_and_blocks_keep_26_connectivity():
    mask = np.zeros((1, 3, 3), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal neighbours: one component at 26 (and 18), two at 6
    assert connected_components(mask, connectivity=26, return_N=True)[1] == 1
    assert connected_components(mask, connectivity=6, return_N=True)[1] == 2


def test_component_sums_of_a_thin_piece():
    inside = np.array([True, False, True]).reshape(1, 3, 1)
    values = np.array([0.9, 0.2, 0.7], np.float32).reshape(1, 3, 1)
    voxel, sums, counts = _component_sums(inside, values)
    assert sorted(voxel.tolist()) == [0, 2]
    assert np.allclose(sorted(sums.tolist()), [0.7, 0.9])
    assert counts.tolist() == [1, 1]


def test_largest_k_numbers_the_largest_first():
    """cc3d numbers components in scan order: a small island before a large block was label 1, and
    `split_pair` took the island for the pair's main part (the demo's 2 ml left hip bone)."""
    mask = np.zeros((8, 8, 8), bool)
    mask[0, 0, 0] = True                # first in scan order, 1 voxel
    mask[4:8, 4:8, 4:8] = True          # 64 voxels
    mask[0, 6:8, 6:8] = True            # 4 voxels
    labels = largest_k(mask, k=2)
    assert np.count_nonzero(labels == 1) == 64 and np.count_nonzero(labels == 2) == 4 and labels[0, 0, 0] == 0
