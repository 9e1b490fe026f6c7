"""Sliding-window inference with compact stitching, one class chunk at a time.

Windows of the model's patch size overlap by `overlap` and are blended with a Gaussian
importance map (MONAI's `compute_importance_map`, as MONAI's inferer does). The backbone runs
once per window (batched, autocast on CUDA); only the requested classes' heads run.

Memory: the blended logits of at most `class_chunk` classes are accumulated at the model grid in
float16 (one float32 weight map is shared by all classes), and classes are handed out one at a
time as float32 probabilities on the model grid, so the caller can resample each to the input
grid and drop it before the next. With more classes than one chunk, the windows' backbone
features (8 channels, float16) are cached between chunks when that adds at most a quarter to the
accumulator's memory (on CUDA: whenever the GPU has room), else the backbone is re-run per chunk:
on CPU memory stays flat in the number of classes, at the price of time (`cache_features=True`
trades it back). Voxel features are rounded to float16 in every case, so results do not depend on
the chunking. On CPU the heads run a few x-planes of a window at a time, weighted and added straight
into the accumulator: cache-friendly, and no (classes x patch) float32 buffer is ever allocated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import compute_importance_map

from UniversalSegLib.model import UniversalModel, apply_dynamic_heads

ProgressFn = Callable[[float, str], None]
FEATURE_CHANNELS = 8
CPU_HEAD_TILE = 4096  # voxels per thread and head call on CPU (at least one x-plane of the window)
CPU_HEAD_CLASS_CHUNK = 16
GPU_MEMORY_SHARE = 0.5  # of the free GPU memory, for the accumulator and the feature cache


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


def _add_window_cpu(acc: torch.Tensor, window: tuple[slice, slice, slice], feature: torch.Tensor,
                    params: torch.Tensor, importance: torch.Tensor) -> None:
    """Heads of one window, weighted and added into `acc` slab by slab (CPU).

    The heads run on a few x-planes at a time: their activations stay in cache (2-4x faster than
    whole-window calls, same numbers) and no whole-window (classes x patch) float32 buffer exists.
    """
    feature = feature.float()
    planes = feature.shape[2] * feature.shape[3]
    rows = max(1, CPU_HEAD_TILE * torch.get_num_threads() // planes)
    wx, wy, wz = window
    for x in range(0, feature.shape[1], rows):
        part = feature[:, x:x + rows]
        logits = apply_dynamic_heads(part.reshape(1, part.shape[0], -1), params, CPU_HEAD_CLASS_CHUNK)
        logits = logits.reshape(-1, *part.shape[1:]).mul_(importance[x:x + rows])
        acc[:, wx.start + x:wx.start + x + part.shape[1], wy, wz] += logits


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
            item = (group, image_feature.float(), voxel_feature.half())
            if self.keep:
                self._cache.append(item)
            yield item


def class_probabilities(model: UniversalModel, volume: np.ndarray, classes: Sequence[int], patch: Sequence[int],
                        overlap: float, device: torch.device, sw_batch_size: int = 1, class_chunk: int = 32,
                        amp: bool = True, cache_features: bool | None = None,
                        progress: ProgressFn | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (position in `classes`, float32 sigmoid probability (x, y, z) on the model grid) per class.

    `volume` is the preprocessed (x, y, z) model input; `classes` are indices into the model's
    class list. Classes come in order, chunk by chunk; each yielded array is the caller's.
    """
    plan = WindowPlan.make(volume.shape, patch, overlap)
    padding = [p for pair in reversed(plan.pad) for p in pair]
    padded = torch.from_numpy(volume)  # shares the caller's array: no copy unless padding is needed
    if any(padding):
        padded = torch.nn.functional.pad(padded, padding)
    voxels = int(np.prod(plan.padded_shape))
    on_gpu = device.type == "cuda"
    chunk = max(1, min(len(classes), class_chunk))
    if on_gpu:  # the accumulator lives on the GPU: as many classes per chunk as fit
        chunk = max(chunk, min(len(classes), (_free_gpu_bytes(device) // 2 - 4 * voxels) // (2 * voxels)))
    chunks = [list(range(s, min(s + chunk, len(classes)))) for s in range(0, len(classes), chunk)]
    cache_bytes = len(plan.starts) * FEATURE_CHANNELS * int(np.prod(plan.patch)) * 2
    if cache_features is None:  # on CPU only while it adds at most a quarter to the accumulator's memory
        cache_features = len(chunks) > 1 and (cache_bytes <= (_free_gpu_bytes(device) // 2 if on_gpu
                                                              else chunk * voxels // 2))
    acc_device = device if on_gpu else torch.device("cpu")
    features = _Features(model, padded, plan, sw_batch_size, device, amp, keep=cache_features)
    importance = compute_importance_map(tuple(plan.patch), mode="gaussian", sigma_scale=0.125, device=acc_device)
    weight = torch.zeros(plan.padded_shape, dtype=torch.float32, device=acc_device)
    for s in plan.starts:
        weight[plan.window(s)] += importance
    weight = weight[plan.unpad]
    steps, done = len(chunks) * len(plan.starts), 0
    class_index = torch.as_tensor(list(classes), dtype=torch.long, device=device)
    for positions in chunks:
        acc = torch.zeros((len(positions), *plan.padded_shape), dtype=torch.float16, device=acc_device)
        idx = class_index[positions]
        for group, image_feature, voxel_feature in features.batches():
            params = model.head_parameters(image_feature, idx)  # float32: tiny, and precision matters
            if on_gpu:
                with _autocast(device, amp):
                    logits = apply_dynamic_heads(voxel_feature if amp else voxel_feature.float(), params,
                                                 model.head_class_chunk)
                logits = logits.float().mul_(importance)
                for b, s in enumerate(group):
                    acc[(slice(None), *plan.window(s))] += logits[b]
            else:
                for b, s in enumerate(group):
                    _add_window_cpu(acc, plan.window(s), voxel_feature[b], params[b:b + 1], importance)
            done += len(group)
            if progress:
                progress(done / steps, "sliding window")
        acc = acc[(slice(None), *plan.unpad)]
        for row, position in enumerate(positions):
            yield position, acc[row].float().div_(weight).sigmoid_().cpu().numpy()  # one float32 volume
        del acc
