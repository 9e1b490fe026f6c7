"""Sliding-window inference with compact stitching, one class chunk at a time.

Windows of the model's patch size overlap by `overlap` and are blended with a Gaussian
importance map (the product of MONAI's 1D `compute_importance_map` per axis; unlike MONAI's inferer
no floor is put under the windows' corners). The backbone runs
once per window (batched, autocast on CUDA); only the requested classes' heads run.

Memory: windows run x-row by x-row, and the blended logits of a chunk of classes are accumulated
in float16 on a ring of one patch of x-rows (not the whole model grid). On CPU a chunk holds as
many classes as fit a memory budget (`cpu_class_chunk`: a share of the available memory, at most
`CPU_BAND_MAX_BYTES`), so for ordinary class counts every class is one chunk and the backbone runs
once per window; only hundreds of classes on a large grid split into chunks. Once no later
window reaches a row its values are final: they leave as float32 probability slabs, one class at a
time, so the caller can bring them to the input grid while the windows go on. Each window adds its
logits times its share of the Gaussian blend (importance over summed importance; separable into
three 1D factors, so no per-voxel weight buffer exists). With more classes than one chunk, the
windows' backbone features (8 channels, float16) are cached between chunks when that adds at most
half the band's memory (on CUDA: whenever the GPU has room), else the backbone is re-run per chunk:
on CPU memory stays flat in the number of classes, at the price of time (`cache_features=True`
trades it back). Voxel features are rounded to float16 in every case, so results do not depend on
the chunking. On CPU the heads run a few x-planes of a window at a time, weighted and added straight
into the band: cache-friendly, and no (classes x patch) float32 buffer is ever allocated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import compute_importance_map

from UniversalSegLib.model import UniversalModel, apply_dynamic_heads
from UniversalSegLib.progress import ProgressFn

FEATURE_CHANNELS = 8
CPU_HEAD_TILE = 4096  # voxels per thread and head call on CPU (at least one x-plane of the window)
# Classes per head call on CPU: their hidden activations (chunk x 8 x tile float32, 1 MB at 4 classes
# and 2 threads) stay in L2. 16 classes (4 MB) measured 4x slower per voxel and class on one core
# (42 against 10-11 ns; 2, 4 and 8 classes: 10-14 ns).
CPU_HEAD_CLASS_CHUNK = 4
GPU_MEMORY_SHARE = 0.5  # of the free GPU memory, for the accumulator and the feature cache
# On CPU the band of one class chunk may take this share of the available memory, up to the cap: at
# the bundled model's grid (64 x 99 x 112 band voxels, 1.4 MB a class) every class of a 360-class
# model fits; a 1.5 mm model with 96^3 windows (8.5 MB a class) takes 60 classes per chunk. Chunks
# of 32 re-ran the backbone for the 33rd class: 46 classes took twice the time of 1.
CPU_BAND_SHARE = 0.25
CPU_BAND_MAX_BYTES = 512 * 2**20


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices along one axis: stride patch*(1-overlap), the last window flush with the end."""
    if size <= patch:
        return [0]
    stride = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / stride) + 1
    return sorted({min(i * stride, size - patch) for i in range(count)})


@dataclass
class WindowPlan:
    """Where the windows go on a volume padded (symmetrically, with 0) up to at least one patch."""

    shape: tuple[int, int, int]  # the volume's
    patch: tuple[int, int, int]
    pad: tuple[tuple[int, int], ...]  # (before, after) per axis
    starts: list[tuple[int, int, int]]  # in padded coordinates

    @classmethod
    def make(cls, shape: Sequence[int], patch: Sequence[int], overlap: float) -> WindowPlan:
        pad = tuple(((max(0, p - s)) // 2, max(0, p - s) - (max(0, p - s)) // 2) for s, p in zip(shape, patch))
        padded = [s + a + b for s, (a, b) in zip(shape, pad)]
        axes = [window_starts(n, p, overlap) for n, p in zip(padded, patch)]
        starts = [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]
        return cls(tuple(shape), tuple(patch), pad, starts)

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(s + a + b for s, (a, b) in zip(self.shape, self.pad))  # type: ignore[return-value]

    @property
    def unpad(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, a + s) for s, (a, _) in zip(self.shape, self.pad))  # type: ignore[return-value]

    def window(self, start: Sequence[int]) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + p) for s, p in zip(start, self.patch))  # type: ignore[return-value]


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively here (AVX512-BF16 / AMX): about 2x faster
    backbones on CPU. Without it bfloat16 is emulated and slower than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast(device: torch.device, enabled: bool):
    """Mixed precision for the backbone: float16 on CUDA, bfloat16 on CPU (callers enable it on CPU
    only where `cpu_has_native_bf16`)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if enabled and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _free_gpu_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * GPU_MEMORY_SHARE)


def cpu_class_chunk(band_voxels: int, classes: int) -> int:
    """Classes per chunk on CPU: as many float16 bands of `band_voxels` as the memory budget holds.

    Args:
        band_voxels: voxels of one class's band (one patch of x-rows of the padded model grid).
        classes: how many classes are asked for.
    """
    import psutil

    budget = min(CPU_BAND_MAX_BYTES, int(psutil.virtual_memory().available * CPU_BAND_SHARE))
    return max(1, min(classes, budget // (2 * band_voxels)))


def _add_window_cpu(band: _Band, window: tuple[slice, slice, slice], feature: torch.Tensor,
                    params: torch.Tensor, share: torch.Tensor) -> None:
    """Heads of one window, weighted and added into the band slab by slab (CPU).

    The heads run on a few x-planes at a time: their activations stay in cache (2-4x faster than
    whole-window calls, same numbers) and no whole-window (classes x patch) float32 buffer exists.
    """
    planes = feature.shape[2] * feature.shape[3]
    rows = max(1, CPU_HEAD_TILE * torch.get_num_threads() // planes)
    for x in range(0, feature.shape[1], rows):
        part = feature[:, x:x + rows].float()  # per plane: no whole-window float32 copy
        logits = apply_dynamic_heads(part.reshape(1, part.shape[0], -1), params, CPU_HEAD_CLASS_CHUNK)
        band.add(logits.reshape(-1, *part.shape[1:]).mul_(share[x:x + rows]), window, x)


class _Features:
    """Backbone features per window batch: computed on demand, optionally kept for later class chunks."""

    def __init__(self, model: UniversalModel, volume: torch.Tensor, plan: WindowPlan, batch: int,
                 device: torch.device, amp: bool, keep: bool):
        self.model, self.volume, self.plan, self.batch = model, volume, plan, batch
        self.device, self.amp, self.keep = device, amp, keep
        self._cache: list[tuple[list, torch.Tensor, torch.Tensor]] = []

    def batches(self) -> Iterator[tuple[list[tuple[int, int, int]], torch.Tensor, torch.Tensor]]:
        """(window starts, image feature (b, 256) float32, voxel feature (b, 8, *patch) float16)."""
        if self._cache:
            yield from self._cache
            return
        starts = self.plan.starts
        for i in range(0, len(starts), self.batch):
            group = starts[i:i + self.batch]
            x = torch.stack([self.volume[self.plan.window(s)] for s in group]).unsqueeze(1)
            with _autocast(self.device, self.amp):
                image_feature, voxel_feature = self.model.features(x.to(self.device, non_blocking=True))
            del x
            item = (group, image_feature.float(), voxel_feature.half())
            del image_feature, voxel_feature
            if self.keep:
                self._cache.append(item)
            yield item
            del item  # (the caller has dropped its references too) nothing of this window outlives it


@dataclass
class ProbabilitySlab:
    """Final sigmoid probabilities of one class on consecutive x-rows of the (unpadded) model grid."""

    position: int  # index into the `classes` asked for
    start: int  # first x-row
    values: np.ndarray  # float32 (rows, y, z), the caller's
    last: bool  # the class's final slab: rows start..x-size


def blending_factors(plan: WindowPlan, gaussians: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per axis, each x (y, z) position's summed 1D Gaussian over the windows' starts on that axis.

    The importance map is the outer product of three 1D Gaussians and the windows form a grid, so
    the summed importance at a voxel is the product of these three factors: the blending weights
    never need a per-voxel buffer.
    """
    factors = []
    for axis, g in enumerate(gaussians):
        total = torch.zeros(plan.padded_shape[axis], dtype=torch.float32, device=g.device)
        for start in sorted({s[axis] for s in plan.starts}):
            total[start:start + plan.patch[axis]] += g
        factors.append(total)
    return factors


def window_weights(gaussians: Sequence[torch.Tensor], factors: Sequence[torch.Tensor],
                   start: Sequence[int]) -> torch.Tensor:
    """The window's share of each voxel's blend (P, P, P): its importance over the summed importance.

    Shares of all windows covering a voxel add up to 1, so the accumulated values are already the
    blended logits (no division afterwards, and no tiny float16 products at the windows' corners).
    """
    x, y, z = (g / f[s:s + len(g)] for g, f, s in zip(gaussians, factors, start))
    return x[:, None, None] * y[None, :, None] * z[None, None, :]


def _ring(start: int, length: int, size: int) -> list[tuple[int, slice]]:
    """(offset into the run, ring slice) pieces of rows start..start+length in a ring of `size` rows."""
    pieces, done = [], 0
    while done < length:
        row = (start + done) % size
        n = min(length - done, size - row)
        pieces.append((done, slice(row, row + n)))
        done += n
    return pieces


class _Band:
    """Blended logits of a class chunk on the x-rows that windows can still reach: a ring of one patch
    of rows (float16). Rows below the next window's start are final and leave as probabilities."""

    def __init__(self, n: int, plan: WindowPlan, device: torch.device):
        self.plan, self.rows = plan, min(plan.patch[0], plan.padded_shape[0])
        self.acc = torch.zeros((n, self.rows, *plan.padded_shape[1:]), dtype=torch.float16, device=device)
        self.base = 0  # first row not yet handed out

    def add(self, logits: torch.Tensor, window: tuple[slice, slice, slice], x: int = 0) -> None:
        """Add weighted logits (n, rows, *patch-yz) whose first row is `x` rows into `window`."""
        for offset, ring in _ring(window[0].start + x, logits.shape[1], self.rows):
            self.acc[:, ring, window[1], window[2]] += logits[:, offset:offset + ring.stop - ring.start]

    def release(self, stop: int, positions: Sequence[int], last: bool) -> Iterator[ProbabilitySlab]:
        """Hand out rows base..stop (padded coordinates) as probabilities and clear their ring rows."""
        lo, hi = max(self.base, self.plan.unpad[0].start), min(stop, self.plan.unpad[0].stop)
        if hi > lo:
            for row, position in enumerate(positions):
                parts = [self.acc[row, ring] for _, ring in _ring(lo, hi - lo, self.rows)]
                block = torch.cat(parts) if len(parts) > 1 else parts[0]
                values = block[(slice(None), *self.plan.unpad[1:])].float().sigmoid_()
                yield ProbabilitySlab(position, lo - self.plan.unpad[0].start, values.cpu().numpy(), last)
        for _, ring in _ring(self.base, stop - self.base, self.rows):
            self.acc[:, ring] = 0
        self.base = stop


def probability_slabs(model: UniversalModel, volume: np.ndarray, classes: Sequence[int], patch: Sequence[int],
                      overlap: float, device: torch.device, sw_batch_size: int = 1, class_chunk: int | None = None,
                      amp: bool = True, cache_features: bool | None = None,
                      progress: ProgressFn | None = None) -> Iterator[ProbabilitySlab]:
    """Yield each class's sigmoid probability on the model grid as x-slabs, in row order per class.

    `volume` is the preprocessed (x, y, z) model input; `classes` are indices into the model's
    class list. Windows run x-row by x-row; once no later window reaches a row, its values are final
    and leave (one class at a time) while the rest of the volume is still being computed, so only
    one patch of rows is ever held per class. Within a class chunk the slabs of all its classes
    alternate; a class's slab with `last` set ends it. `class_chunk`: classes per chunk (None: on
    CPU as many as `cpu_class_chunk` allows; on CUDA at least this many, more while half the free
    GPU memory holds them).
    """
    plan = WindowPlan.make(volume.shape, patch, overlap)
    padding = [p for pair in reversed(plan.pad) for p in pair]
    padded = torch.from_numpy(volume)  # shares the caller's array: no copy unless padding is needed
    if any(padding):
        padded = torch.nn.functional.pad(padded, padding)
    band_voxels = min(plan.patch[0], plan.padded_shape[0]) * plan.padded_shape[1] * plan.padded_shape[2]
    on_gpu = device.type == "cuda"
    if on_gpu:  # the band lives on the GPU: as many classes per chunk as fit (at least `class_chunk`)
        chunk = max(1, min(len(classes), class_chunk or 32))
        chunk = max(chunk, min(len(classes), _free_gpu_bytes(device) // 2 // (2 * band_voxels)))
    elif class_chunk is not None:
        chunk = max(1, min(len(classes), class_chunk))
    else:
        chunk = cpu_class_chunk(band_voxels, len(classes))
    chunks = [list(range(s, min(s + chunk, len(classes)))) for s in range(0, len(classes), chunk)]
    cache_bytes = len(plan.starts) * FEATURE_CHANNELS * int(np.prod(plan.patch)) * 2
    if cache_features is None:  # on CPU only while it adds at most a quarter to the band's memory
        cache_features = len(chunks) > 1 and (cache_bytes <= (_free_gpu_bytes(device) // 2 if on_gpu
                                                              else chunk * band_voxels // 2))
    acc_device = device if on_gpu else torch.device("cpu")
    features = _Features(model, padded, plan, sw_batch_size, device, amp, keep=cache_features)
    gaussians = [compute_importance_map((p,), mode="gaussian", sigma_scale=0.125, device=acc_device)
                 for p in plan.patch]
    factors = blending_factors(plan, gaussians)
    steps, done = len(chunks) * len(plan.starts), 0
    class_index = torch.as_tensor(list(classes), dtype=torch.long, device=device)
    for positions in chunks:
        band = _Band(len(positions), plan, acc_device)
        idx = class_index[positions]
        for group, image_feature, voxel_feature in features.batches():
            params = model.head_parameters(image_feature, idx)  # float32: tiny, and precision matters
            logits = None
            if on_gpu:
                with _autocast(device, amp):
                    logits = apply_dynamic_heads(voxel_feature if amp else voxel_feature.float(), params,
                                                 model.head_class_chunk)
            for b, s in enumerate(group):
                if s[0] > band.base:  # no later window reaches the rows below this one
                    yield from band.release(s[0], positions, last=False)
                share = window_weights(gaussians, factors, s)
                if logits is not None:
                    band.add(logits[b].float().mul_(share), plan.window(s))
                else:
                    _add_window_cpu(band, plan.window(s), voxel_feature[b], params[b:b + 1], share)
            done += len(group)
            del image_feature, voxel_feature, params, logits, share  # not alive during the next backbone pass
            if progress:
                progress(done / steps, "sliding window")
        yield from band.release(plan.padded_shape[0], positions, last=True)
        del band


def class_probabilities(model: UniversalModel, volume: np.ndarray, classes: Sequence[int], patch: Sequence[int],
                        overlap: float, device: torch.device, **kwargs) -> Iterator[tuple[int, np.ndarray]]:
    """(position in `classes`, float32 probability (x, y, z) on the model grid) per class, assembled from
    `probability_slabs` (holds a whole class chunk at once: for validation cases and small volumes)."""
    pending: dict[int, list[np.ndarray]] = {}
    for slab in probability_slabs(model, volume, classes, patch, overlap, device, **kwargs):
        pending.setdefault(slab.position, []).append(slab.values)
        if slab.last:
            yield slab.position, np.concatenate(pending.pop(slab.position))
