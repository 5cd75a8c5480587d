"""The sweep runner: every setting trained, generated and evaluated, ranked, resumable."""

import json

import pytest
import yaml

from diffusion_glioma import sweep
from diffusion_glioma.cli import main
from diffusion_glioma.errors import DiffusionGliomaError
from tests.test_training import write_config


def test_grid_and_random_settings():
    grid = {"parameters": {"optim.learning_rate": [1e-4, 3e-4], "gan.dropout": [0.0, 0.2, 0.4]}}
    assert len(sweep.settings(grid)) == 6
    assert {"optim.learning_rate": 3e-4, "gan.dropout": 0.4} in sweep.settings(grid)
    random = sweep.settings({**grid, "mode": "random", "samples": 4, "seed": 1})
    assert len(random) == 4 and len({json.dumps(r, sort_keys=True) for r in random}) == 4
    assert random == sweep.settings({**grid, "mode": "random", "samples": 4, "seed": 1})  # reproducible


def test_sweep_trains_evaluates_ranks_and_resumes(tiny_cache, phantom_dir, tmp_path, capsys, monkeypatch):
    base = write_config(tmp_path / "base.yaml", tiny_cache, tmp_path / "unused",
                        optim={"steps": 4, "batch_size": 1, "warmup_steps": 0}, checkpoints={"every": 2})
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "parameters": {"optim.learning_rate": [1.0e-9, 3.0e-3]},
        "evaluate": {"real": str(phantom_dir), "rank_by": "psnr", "features": "random", "sample_steps": 2}}))
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(base), "--grid", str(grid), "--out", str(out), "--print-commands"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("--only 0") and printed[1].endswith("--only 1") and len(printed) == 3

    # A job-array task runs one setting; then the plain command runs the rest and ranks all.
    assert main(["sweep", "--config", str(base), "--grid", str(grid), "--out", str(out), "--only", "1", "--quiet"]) == 0
    first = json.loads((out / "run-001" / "result.json").read_text())
    assert first["overrides"] == {"optim.learning_rate": 3.0e-3}
    calls = []
    real_run = sweep._run
    monkeypatch.setattr(sweep, "_run", lambda *a, **k: calls.append(a[2].name) or real_run(*a, **k))
    assert main(["sweep", "--config", str(base), "--grid", str(grid), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["runs"]) == 2 and summary["rank_by"] == "psnr"
    assert json.loads((out / "run-001" / "result.json").read_text()) == first  # finished runs are not redone
    psnr = [r["scores"]["psnr"] for r in summary["runs"]]
    assert psnr == sorted(psnr, reverse=True)  # ranked, higher PSNR first
    assert all(r["scores"]["fid_3d"] is not None and r["scores"]["kid_2d"] is not None for r in summary["runs"])
    table = (out / "sweep.md").read_text()
    assert "| 1 | run-00" in table and "optim.learning_rate" in table
    assert (out / "sweep.png").stat().st_size > 3000
    name, steps, values = sweep.training_curve(out / "run-001")  # the figure's loss panel reads each run's log
    assert name == "loss" and steps == [1, 2, 3, 4] and all(v > 0 for v in values)
    with pytest.raises(DiffusionGliomaError, match="--only 5: the sweep has runs 0 to 1"):
        main(["--debug", "sweep", "--config", str(base), "--grid", str(grid), "--out", str(out), "--only", "5"])
    changed = tmp_path / "changed.yaml"  # a grid edited under a finished sweep does not reuse its runs
    changed.write_text(yaml.safe_dump({"parameters": {"optim.learning_rate": [2.0e-3, 3.0e-3]},
                                       "evaluate": {"real": str(phantom_dir)}}))
    with pytest.raises(DiffusionGliomaError, match="run-000/result.json: a run of other settings"):
        main(["--debug", "sweep", "--config", str(base), "--grid", str(changed), "--out", str(out)])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"parameters": {"optim.learning_rate": 1e-4}, "evaluate": {"real": "x"}}))
    with pytest.raises(DiffusionGliomaError, match="parameters.optim.learning_rate must be a non-empty list"):
        main(["--debug", "sweep", "--config", str(base), "--grid", str(bad), "--out", str(out)])


def test_sweep_with_a_seed_key_summarises_each_setting_over_its_seeds(tmp_path):
    """Runs that differ only in `seed` are one setting: its mean and sd per metric (the sd says how
    much of a difference between settings a reseed alone makes)."""
    def run(seed, lr, ssim):
        scores = {m: None for m in sweep.METRICS}
        scores["ssim"] = ssim
        return {"overrides": {"seed": seed, "optim.learning_rate": lr}, "scores": scores, "run": str(tmp_path / "x")}

    runs = [run(0, 1e-3, 0.30), run(1, 1e-3, 0.32), run(0, 1e-4, 0.20), run(1, 1e-4, 0.21)]
    summary = sweep._rank(tmp_path, [r["overrides"] for r in runs], runs, "ssim")
    groups = {g["setting"]["optim.learning_rate"]: g for g in summary["over_seeds"]}
    assert groups[1e-3]["seeds"] == [1, 0] and groups[1e-3]["scores"]["ssim"]["mean"] == pytest.approx(0.31)
    assert groups[1e-3]["scores"]["ssim"]["sd"] == pytest.approx(0.01414, abs=1e-4)
    assert groups[1e-4]["scores"]["psnr"] is None
    assert "| 0.001 | 2 | n/a | n/a | n/a | n/a | 0.31 ± 0.014 |" in (tmp_path / "sweep.md").read_text()
