"""The throughput benchmark end to end: the real entry point on the smoke profile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_smoke_writes_json(tmp_path):
    out = tmp_path / "tmp.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--device", "cpu", "--profile", "smoke",
         "--steps", "2", "--members", "2", "--kernels", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "frame-steps/s" in completed.stdout and "(c) packed: 2 members" in completed.stdout

    result = json.loads(out.read_text())
    assert result["profile"] == "smoke" and result["members"] == 2 and result["steps"] == 2
    assert result["device"] == "cpu" and result["peak_flops"] == {}
    assert result["macs_per_frame_step"] > 0
    assert result["flops_per_frame_step"] == 6 * result["macs_per_frame_step"]
    assert set(result["paths"]) == {"reference", "runner", "packed"}
    for path in result["paths"].values():
        assert path["frame_steps_per_s"] > 0 and path["gflops_per_s"] > 0
        assert path["speedup_vs_reference"] > 0 and path["mfu"] is None
    clip_steps = result["batch_size"] * (result["clip_length"] - 1)
    assert result["paths"]["runner"]["frame_steps"] == 2 * clip_steps
    assert result["paths"]["packed"]["frame_steps"] == 2 * 2 * clip_steps
    assert result["paths"]["reference"]["speedup_vs_reference"] == 1.0
    # Round by round: one step per path per round; the overall ratio is a weighted mean of
    # the rounds' ratios, so it lies within their range.
    from benchmarks.throughput import round_ratios

    spread = round_ratios(result)
    assert set(spread) == {"runner", "packed"}
    for key, ratios in spread.items():
        path = result["paths"][key]
        assert len(path["round_seconds"]) == 2
        assert sum(path["round_seconds"]) == pytest.approx(path["seconds"])
        assert min(ratios) - 1e-9 <= path["speedup_vs_reference"] <= max(ratios) + 1e-9
    assert "x (a) round by round (2 rounds): (b) " in completed.stdout
    assert result["eval"]["frames"] == 64 and result["eval"]["frames_per_s"] > 0
    # --kernels: each path's costliest operators, convolutions among them, shares summing <= 1
    for path in result["paths"].values():
        top = path["profile"]["top"]
        assert len(top) == 6 and 0 < sum(entry["share"] for entry in top) <= 1 + 1e-9
        assert any("convolution" in entry["name"] for entry in top)
    assert "(c) profile: cpu operators (self time)" in completed.stdout


def test_macs_match_the_lab_count():
    from benchmarks.throughput import model_macs
    from cvae.model import VideoCVAE

    macs = model_macs(VideoCVAE(), 32, 64)  # lab dims: ~3.2 GMAC per frame step
    assert 3.1e9 < macs["train"] < 3.3e9
    assert macs["eval"] < macs["train"]
