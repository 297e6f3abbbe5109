import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # tests use repo-relative config paths
# One intra-op thread per test process (and, through the environment, per subprocess it
# starts): the tiny models gain nothing from more, and on a shared 2-core machine OpenMP
# threads that spin against other processes slow the suite tenfold. OMP_NUM_THREADS overrides.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"] or 1)))

# A tiny digits model that trains in well under a second per step on 2 cores.
TINY = [
    "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
    "train.batch_size=32", "train.log_every=5", "train.checkpoint_every=10", "train.sample_every=1000",
    "sample.steps=5", "sample.mosaic_images=16", "optim.warmup=0", "optim.lr=2e-3", "train.ema_decay=0.9",
]


def tiny_args(out, steps, *extra):
    args = ["train", "--config", "configs/digits.yaml", "--out", str(out), "--set", f"train.steps={steps}"]
    for item in TINY + list(extra):
        args += ["--set", item]
    return args


def read_log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One short digits run shared by the sampling tests."""
    from s2dm.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(tiny_args(out, 20)) == 0
    return out
