"""Connected components (connected-components-3d) that also work on line-shaped arrays.

cc3d 4.1 raises "maximum length exception" for 18/26-connectivity on an array with a single
dimension longer than 1 (e.g. (1, 3, 1) holding two separate voxels): its label-count estimate
is too small there. Such one-voxel-thin crops do occur in inference (a probability piece at a
slab seam on a thin series). Along a line, 6-, 18- and 26-connectivity are the same relation,
so these wrappers switch to 6 there and call cc3d unchanged everywhere else.
"""

from __future__ import annotations

import cc3d
import numpy as np


def _safe_connectivity(shape: tuple[int, ...], connectivity: int) -> int:
    return 6 if sum(n > 1 for n in shape) <= 1 else connectivity


def connected_components(mask: np.ndarray, connectivity: int = 26, return_N: bool = False):  # noqa: N803 (cc3d's name)
    """`cc3d.connected_components` (labels 1..N; with `return_N`, also N)."""
    return cc3d.connected_components(mask, connectivity=_safe_connectivity(mask.shape, connectivity),
                                     return_N=return_N)


def largest_k(mask: np.ndarray, k: int, connectivity: int = 26) -> np.ndarray:
    """The k largest components labelled 1..k, largest first, 0 elsewhere.

    `cc3d.largest_k` finds them but numbers them in scan order, so its label 1 can be the smaller.
    """
    labels = cc3d.largest_k(mask, k=k, connectivity=_safe_connectivity(mask.shape, connectivity))
    sizes = np.bincount(labels.ravel())[1:]
    if len(sizes) < 2:
        return labels
    by_size = np.zeros(len(sizes) + 1, labels.dtype)
    by_size[1 + np.argsort(-sizes, kind="stable")] = np.arange(1, len(sizes) + 1)
    return by_size[labels]
