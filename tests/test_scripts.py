"""The benchmarks under scripts/ still run against today's library: each at its smallest size,
checked for the tables it prints (their figures are measured by running them in full, alone;
here nothing is timed). bench_gpu.py runs its CPU part: a GPU session has 15 minutes and should
not spend them on a script that broke on the CPU."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

pytestmark = pytest.mark.slow

BENCHES = {  # script: (tiny arguments, lines its output must contain)
    "bench_gpu.py": (["--device", "cpu", "--batch", "2", "--warmup", "0", "--steps", "1", "--windows", "1",
                      "--sample-n", "2", "--sample-batch", "2", "--fid-n", "2", "--fid-batch", "2", "--no-compile",
                      "--skip-diffusers"],
                     ["| fp32 | no | no |", "| bf16 (1 step, no warm-up) | no | no |", "| sampling, DDIM 20 steps (NFE 20), fp32, batch 2 (padded to 16 rows a network call) |",
                      "| FID Inception features (32x32 → 299x299, pool3), batch 2,"]),
    "bench_speed.py": (["--parts", "sampling", "training", "bf16", "--models", "study (digits, ch 16)",
                        "--train-steps", "1", "--rounds", "1", "--steps", "1"],
                       ["**Sampling: image-NFE/s of `generate`**", "**bfloat16 autocast vs float32**",
                        "| study (digits, ch 16) | 2500 → 500 | ddim-1 |"]),
    "bench_samplers.py": (["--steps", "4", "--samplers", "ddim", "pndm", "--batch", "2", "--ch", "16", "--ch-mult", "1",
                           "--num-res-blocks", "1", "--repeats", "1", "--stub-repeats", "1"],
                          ["| ddim | 4 | 4 |", "| pndm | 4 | 13 |", "| diffusers PNDM | 4 | 13 |"]),
    "bench_train.py": (["--parts", "loss", "diffusers", "--batch-digits", "8", "--batch-cifar", "2", "--repeats", "1",
                        "--fwd-repeats", "1", "--digits-repeats", "1", "--stub-repeats", "1", "--warmup", "0"],
                       ["Goal ≥ 1.10×"]),
    "bench_checkpoint.py": (["--repeats", "1", "--cifar-batch", "2"], ["| cifar10.yaml | 2 |", "`curves.png` redrawn"]),
    "bench_eval.py": (["--train-steps", "1", "--cifar-images", "2"], ["| digits (ch 32) | fd-pixels, n 1,000, ddim 20 |"]),
    "bench_fid.py": (["--n", "4", "--size", "8"], ["| one side from its cached `.npz` |"]),
}


@pytest.mark.parametrize("script", sorted(BENCHES))
def test_benchmark_runs_at_its_smallest_size(script, tmp_path):
    args, expected = BENCHES[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # a hang guard: bench_eval took 185 s on a busy AVX2 CPU
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    missing = [line for line in expected if line not in proc.stdout]
    assert not missing, f"{script} printed no {missing}:\n{proc.stdout[-3000:]}"


def test_fd_noise_prints_the_spread_of_a_distance(tmp_path):
    """scripts/fd_noise.py, the source of the tests' Fréchet-distance tolerances, on two folders
    of random 8x8 images (N > D = 64: a well-conditioned covariance, a tiny spread)."""
    rng = np.random.default_rng(0)
    for side, n in (("a", 100), ("b", 90)):
        (tmp_path / side).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / side / f"{i:06d}.png")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fd_noise.py"), str(tmp_path / "a"),
                           str(tmp_path / "b"), "--draws", "5"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    spread = float(proc.stdout.split("perturbations: ")[1])
    assert proc.stdout.startswith("N 100 and 90, D 64:") and 0 <= spread < 1e-6, proc.stdout


def test_bench_speed_counts_the_attention_and_the_rows_the_network_runs():
    """FLOPs per image-NFE include the attention's matmuls, which FlopCounterMode counts only
    when SDPA is decomposed (the math backend) and not in the CPU's fused kernel; a CIFAR10
    batch below the rows a network call is padded to is refused (it counted half the work)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_speed
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    cfg, model, *_ = bench_speed.model_of("study (digits, ch 16)")
    assert any(isinstance(m, bench_speed.AttnBlock) for m in model.modules())
    with sdpa_kernel(SDPBackend.MATH), torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 1, 8, 8), torch.tensor(500).expand(2))
    assert bench_speed.flops_per_image(model, (1, 8, 8)) == counter.get_total_flops() / 2
    with pytest.raises(SystemExit) as exit_:
        bench_speed.main(["--cifar-batch", "8"])
    assert exit_.value.code == 2
