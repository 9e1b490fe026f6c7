"""DistributedDataParallel: 2 CPU processes under torchrun (gloo) end with identical weights."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each rank trains the tiny model on the synthetic partially labelled data through the real
# Trainer, then dumps a hash of its weights and the cases it was fed.
SCRIPT = r'''
import hashlib, json, sys
import torch
from UniversalSegLib.train.config import TrainSettings
from UniversalSegLib.device import resolve_device
from UniversalSegLib.train.distributed import dist_info_from_env, init_distributed, shutdown_distributed
from UniversalSegLib.train.loop import Trainer
from support import SyntheticPartialDataset, tiny_model

torch.set_num_threads(1)
out = sys.argv[1]
info = dist_info_from_env()
device = resolve_device("cpu", info)
init_distributed(info, device)
model, manifest = tiny_model(["liver", "spleen", "pancreas"], seed=info.rank, patch_size=(16, 16, 16))
initial = {k: v.clone() for k, v in model.state_dict().items()}
data = SyntheticPartialDataset({"A": [0, 1], "B": [1, 2]}, 3, (16, 16, 16), length=12, seed=0)
settings = TrainSettings(steps=3, batch_size=2, lr=1e-3, checkpoint_every=2, num_workers=0, progress=False)
seen = []

steps = []

class Recording(Trainer):
    def train_step(self, batch):
        seen.extend(batch["case"])
        loss, parts = super().train_step(batch)
        names = [str(n) for n in batch["dataset"]]
        steps.append({"parts": parts, "counts": {n: names.count(n) for n in names}})
        return loss, parts

trainer = Recording(model, manifest, data, settings, out, device=device, dist_info=info, datasets=["A", "B"])
trainer.fit()
digest = hashlib.sha256()
for k, v in sorted(model.state_dict().items()):
    digest.update(k.encode()); digest.update(v.detach().cpu().numpy().tobytes())
changed = any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())
with open(f"{out}/rank{info.rank}.json", "w") as f:
    json.dump({"hash": digest.hexdigest(), "seen": seen, "world": info.world_size, "changed": changed,
               "steps": steps}, f)
shutdown_distributed()
'''


def test_two_cpu_ranks_hold_identical_weights(tmp_path):
    """Acceptance: torchrun --nproc_per_node 2 on CPU (gloo); ranks see different data and end equal."""
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "Testing")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["changed"] for r in ranks)
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP kept the replicas in lock-step
    assert len(ranks[0]["seen"]) == 6 and not set(ranks[0]["seen"]) & set(ranks[1]["seen"])  # disjoint shards
    # only rank 0 writes the run's records
    assert (tmp_path / "train_log.csv").read_text().count("\n") == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.json", "step_00000002",
                                                                             "step_00000003"]
    assert (tmp_path / "model" / "manifest.json").is_file()
    # each dataset's loss column: the mean over both ranks' samples of that dataset, not rank 0's
    with open(tmp_path / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    differs = False
    for i, row in enumerate(rows):
        for name in ("A", "B"):
            own = [(r["steps"][i]["parts"][name], r["steps"][i]["counts"][name]) for r in ranks
                   if name in r["steps"][i]["parts"]]
            expected = sum(v * c for v, c in own) / sum(c for _, c in own)
            assert float(row[f"loss/{name}"]) == pytest.approx(expected, rel=1e-4), (i, name)
            differs |= len(own) == 2 and abs(own[0][0] - own[1][0]) > 1e-3 * abs(expected)
    assert differs  # the ranks' own losses differ somewhere, so rank 0's alone would not pass
