"""Training on tiny phantoms: overfitting, exact resume, fine-tuning, two processes, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffusion_glioma.cli import main
from diffusion_glioma.data.cache import prepare_dataset
from diffusion_glioma.errors import DataError
from diffusion_glioma.pipeline import MaskToMRIPipeline
from diffusion_glioma.training import diffusion as loop
from diffusion_glioma.training.common import TrainingError
from diffusion_glioma.training.config import load_train_config
from tests.helpers import assert_weights_readable_like, interrupt_after_checkpoint
from tests.conftest import SMALL, TINY_DATA

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, cache: Path, output_dir: Path, **sections) -> Path:
    config = {
        "output_dir": str(output_dir), "seed": 3,
        "data": {"cache": str(cache)},
        "model": {"preset": "tiny"},
        "optim": {"steps": 12, "batch_size": 2, "learning_rate": 3e-3, "warmup_steps": 2, "lr_schedule": "cosine"},
        "diffusion": {"prediction_type": "sample"},
        "ema": {"decay": 0.9},
        "validation": {"every": 1000, "num_inference_steps": 3},
        "checkpoints": {"every": 4, "total_limit": 5},
        "log_every": 1,
    }
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    path.write_text(yaml.safe_dump(config))
    return path


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_tiny_model_overfits_a_few_cases(tiny_cache, tmp_path, group_umask):
    config = write_config(tmp_path / "c.yaml", tiny_cache, tmp_path / "run",
                          data={"limit_cases": 2}, optim={"steps": 60, "lr_schedule": "constant", "warmup_steps": 0},
                          validation={"every": 60})
    assert main(["train", "--config", str(config)]) == 0
    history = losses(tmp_path / "run")
    assert len(history) == 60
    start, end = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert end < 0.4 * start, (start, end)
    assert (tmp_path / "run" / "validation" / "step-0000060.png").stat().st_size > 5000
    pipe = MaskToMRIPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.config.preprocess["shape"] == [16, 16, 16]
    assert pipe.disease_classes == ["none", "glioblastoma", "pediatric_diffuse_glioma"]
    facts = json.loads((tmp_path / "run" / "pipeline" / "training.json").read_text())
    assert len(facts["cases"]) == 2 and 4 in facts["labels_seen"]
    # The weights are as readable as the facts file: a lab's group can load what one member trained.
    assert_weights_readable_like(tmp_path / "run" / "pipeline", tmp_path / "run" / "pipeline" / "training.json")
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))[-1]
    assert_weights_readable_like(checkpoint, checkpoint / "trained_seconds.json")


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_cache, tmp_path, monkeypatch):
    straight = write_config(tmp_path / "a.yaml", tiny_cache, tmp_path / "straight")
    loop.train(load_train_config(straight))

    restore = interrupt_after_checkpoint(monkeypatch, loop, at_step=8)
    interrupted = write_config(tmp_path / "b.yaml", tiny_cache, tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        loop.train(load_train_config(interrupted))
    restore()
    assert not (tmp_path / "interrupted" / "pipeline").exists()
    with pytest.raises(TrainingError, match="pass --resume"):
        loop.train(load_train_config(interrupted))
    # As if killed while writing the step-8 checkpoint: the resume starts from step 4, after the logs
    # recorded steps 5-8, and the last log line is half written.
    shutil.rmtree(tmp_path / "interrupted" / "checkpoints" / "checkpoint-8")
    with (tmp_path / "interrupted" / "logs" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "lo')
    loop.train(load_train_config(interrupted), resume=True)

    for sub in ("pipeline/unet", "pipeline/unet_online"):
        a, b = weights(tmp_path / "straight" / sub), weights(tmp_path / "interrupted" / sub)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{sub}:{key}"
    # The logs read as the straight run's: every step and every batch once, in order, same losses.
    read = lambda run, name: [json.loads(line) for line in (tmp_path / run / "logs" / name).read_text().splitlines()]  # noqa: E731
    assert read("interrupted", "data_order_rank0.jsonl") == read("straight", "data_order_rank0.jsonl")
    resumed, straight_log = read("interrupted", "metrics.jsonl"), read("straight", "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight_log])


def test_pretrain_then_finetune_through_the_cli(tiny_cache, tmp_path):
    pre = write_config(tmp_path / "pre.yaml", tiny_cache, tmp_path / "pre",
                       data={"only_diseases": ["glioblastoma"]},
                       model={"preset": "tiny", "disease_classes": ["none", "glioblastoma"]})
    assert main(["train", "--config", str(pre)]) == 0
    source = tmp_path / "pre" / "pipeline"
    fine = write_config(tmp_path / "fine.yaml", tiny_cache, tmp_path / "fine",
                        data={"only_diseases": ["pediatric_diffuse_glioma"]},
                        model={"preset": "tiny", "disease_classes": ["none", "glioblastoma", "pediatric_diffuse_glioma"]},
                        optim={"steps": 6, "learning_rate": 1e-3},
                        finetune={"source": "unused", "mode": "frozen_encoder", "ewc_weight": 1.0})
    assert main(["train", "--config", str(fine), "--source", str(source), "--limit-cases", "1"]) == 0
    pipe = MaskToMRIPipeline.from_pretrained(tmp_path / "fine" / "pipeline")
    assert pipe.disease_classes == ["none", "glioblastoma", "pediatric_diffuse_glioma"]
    facts = json.loads((tmp_path / "fine" / "pipeline" / "training.json").read_text())
    assert facts["cases"] == ["BraTS-PED-00000-000"]
    drift = [json.loads(line)["source_drift"] for line in (tmp_path / "fine" / "logs" / "metrics.jsonl")
             .read_text().splitlines()]
    # The weights move away from the source as training goes (the first step's learning rate is 0: warm-up).
    assert drift[-1] > 0 and drift[-1] > drift[1] > drift[0]
    # Fine-tuning starts from the source's EMA weights (its default `unet`).
    before, after = weights(source / "unet"), weights(tmp_path / "fine" / "pipeline" / "unet_online")
    assert torch.equal(before["conv_in.weight"], after["conv_in.weight"])  # frozen encoder
    assert not torch.equal(before["conv_out.weight"], after["conv_out.weight"])  # decoder trained
    # The new class started from the mean of the known disease rows, then trained.
    assert after["class_embedding.weight"].shape[0] == 3
    out = pipe(torch.ones(1, 16, 16, 16, dtype=torch.long), "pediatric_diffuse_glioma", num_inference_steps=2,
               progress=False).volumes
    assert out.shape == (1, 4, 16, 16, 16)


def test_finetune_refuses_mismatched_data(tiny_cache, phantom_dir, tmp_path):
    from diffusion_glioma.config import DataConfig

    pre = write_config(tmp_path / "pre.yaml", tiny_cache, tmp_path / "pre", optim={"steps": 1})
    loop.train(load_train_config(pre))
    other = tmp_path / "other_cache"
    prepare_dataset(phantom_dir, other, DataConfig(preprocess=TINY_DATA.model_copy(update={"modalities": ("t1c", "t2f")})),
                    limit=1, progress=False)
    fine = write_config(tmp_path / "fine.yaml", other, tmp_path / "fine",
                        finetune={"source": str(tmp_path / "pre" / "pipeline")})
    with pytest.raises(TrainingError, match=r"modalities \['t1c', 't2f'\]"):
        loop.train(load_train_config(fine))
    other_target = write_config(tmp_path / "eps.yaml", tiny_cache, tmp_path / "eps", diffusion={"prediction_type": "epsilon"},
                                finetune={"source": str(tmp_path / "pre" / "pipeline")})
    with pytest.raises(TrainingError, match="predicts 'sample'"):
        loop.train(load_train_config(other_target))
    with_skip = write_config(tmp_path / "skip.yaml", tiny_cache, tmp_path / "skip", diffusion={
        "prediction_type": "sample", "skip_sigma_data": 0.5}, finetune={"source": str(tmp_path / "pre" / "pipeline")})
    with pytest.raises(TrainingError, match="EDM skip is skip_sigma_data=None"):
        loop.train(load_train_config(with_skip))
    missing = write_config(tmp_path / "missing.yaml", tiny_cache, tmp_path / "m", finetune={"source": str(tmp_path / "nope")})
    with pytest.raises(DataError, match="model folder not found"):
        loop.train(load_train_config(missing))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cache, tmp_path, monkeypatch):
    real = loop._diffusion_loss
    calls = []

    def nan_at_step_6(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(loop, "_diffusion_loss", nan_at_step_6)
    config = write_config(tmp_path / "c.yaml", tiny_cache, tmp_path / "run")
    with pytest.raises(TrainingError, match="loss became nan at step 6; the last good checkpoint is .*checkpoint-4"):
        loop.train(load_train_config(config))
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-4" / "model.safetensors").is_file()


def test_corrupt_checkpoint_and_bad_config(tiny_cache, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_cache, tmp_path / "run", optim={"steps": 4})
    loop.train(load_train_config(config))
    model_file = tmp_path / "run" / "checkpoints" / "checkpoint-4" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--resume", "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4: checkpoint cannot be loaded" in err and len(err.strip().splitlines()) == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("learning_rate", "learning_rat"))
    assert main(["train", "--config", str(bad)]) == 2
    assert "optim.learning_rat: unknown key" in capsys.readouterr().err
    # --set reaches any key, read as YAML, and is validated like the file.
    assert main(["train", "--config", str(config), "--set", "diffusion.noise_levels=sometimes"]) == 2
    assert "diffusion.noise_levels: Input should be 'uniform' or 'lognormal'" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--set", "diffusion.prediction_type=v_prediction",
                 "--set", "diffusion.skip_sigma_data=0.5"]) == 2
    assert "skip_sigma_data is a parametrisation of x0-prediction" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "set"), "--set", "optim.steps=2",
                 "--set", "diffusion.prediction_type=sample"]) == 0
    record = json.loads((tmp_path / "set" / "pipeline" / "training.json").read_text())
    assert record["steps"] == 2 and record["config"]["diffusion"]["prediction_type"] == "sample"


def test_shipped_configs_are_valid():
    for path in ["configs/demo.yaml", "configs/pretrain_gbm.yaml", "configs/finetune_peds.yaml"]:
        config = load_train_config(ROOT / path)
        assert config.optim.steps > 0


@pytest.mark.slow
def test_two_processes_split_the_cases_and_keep_one_model(tiny_cache, tmp_path):
    """Real DDP over gloo: per epoch the two processes together see every case exactly once, and
    their weights stay identical."""
    config = write_config(tmp_path / "c.yaml", tiny_cache, tmp_path / "run",
                          optim={"steps": 5, "batch_size": 1}, checkpoints={"every": 5}, log_every=5)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(ROOT / "scripts" / "train.py"), "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = tmp_path / "run" / "logs"
    orders = [[json.loads(line)["cases"] for line in (logs / f"data_order_rank{r}.jsonl").read_text().splitlines()]
              for r in (0, 1)]
    assert len(orders[0]) == len(orders[1]) == 5
    # Batches go to the processes in turn: micro-step k of rank r is sample 2k + r of the run.
    sequence = [case for step in zip(*orders) for batch in step for case in batch]
    cases = sorted(json.loads((tiny_cache / "dataset.json").read_text())["cases"], key=lambda e: e["case_id"])
    ids = sorted(e["case_id"] for e in cases)
    assert sorted(sequence[:5]) == ids and sorted(sequence[5:]) == ids
    fingerprints = [json.loads((logs / f"weights_rank{r}.json").read_text()) for r in (0, 1)]
    assert fingerprints[0] == fingerprints[1] and fingerprints[0]["step"] == 5
    assert (tmp_path / "run" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.fixture(scope="module")
def transfer_cache(tmp_path_factory):
    """Two adult and three pediatric phantoms (one to train on, one independent reference, one test case)."""
    from diffusion_glioma.config import DataConfig
    from diffusion_glioma.data.phantom import write_cohort

    raw, cache = tmp_path_factory.mktemp("transfer_raw"), tmp_path_factory.mktemp("transfer_cache")
    write_cohort(raw, n_adult=2, n_pediatric=3, spacing=3.0, seed=11, progress=False)
    prepare_dataset(raw, cache, DataConfig(preprocess=TINY_DATA), progress=False)
    return cache


def test_transfer_study_gives_every_arm_equal_compute_and_holds_the_test_cases_out(transfer_cache, tmp_path,
                                                                                   monkeypatch):
    """The four arms for 1 pediatric case and 2 seeds, scored on another one beside an independent third;
    re-running reuses every arm's kept scores without sampling again, unless a scoring setting changed;
    a study folder trained to other budgets is refused, not reused."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import transfer_study

    config = write_config(tmp_path / "c.yaml", transfer_cache, tmp_path / "unused", diffusion={"prediction_type": "epsilon"})
    study = tmp_path / "study"
    assert transfer_study.main(["--config", str(config), "--out", str(study), "--counts", "1", "--seeds", "0", "1",
                                "--source-steps", "4", "--target-steps", "3", "--test-cases", "1",
                                "--sample-steps", "2", "--features", "random", "--quiet"]) == 0
    results = json.loads((study / "transfer.json").read_text())
    assert results["held_out"] == ["BraTS-PED-00002-000"] and results["reference_cohort"] == ["BraTS-PED-00001-000"]
    facts = lambda run: json.loads((study / run / "pipeline" / "training.json").read_text())  # noqa: E731
    # Equal compute: scratch and joint train 4 + 3 steps; fine-tuning 3 on top of the 4-step source model.
    assert facts("seed0/scratch_1")["steps"] == facts("seed1/joint_1")["steps"] == 7
    assert facts("seed0/finetuned_1")["steps"] == 3 and facts("seed0/source")["steps"] == 4
    assert facts("seed0/scratch_1")["cases"] == ["BraTS-PED-00000-000"]
    assert sorted(facts("seed1/joint_1")["cases"]) == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-PED-00000-000"]
    assert facts("seed1/scratch_target_steps_1")["steps"] == 3
    for run in ("seed0/source", "seed0/scratch_1", "seed0/scratch_target_steps_1", "seed0/finetuned_1", "seed0/joint_1"):
        assert not {"BraTS-PED-00001-000", "BraTS-PED-00002-000"} & set(facts(run)["cases"])
        # The config's 2 warm-up steps are more than a tenth of any phase here: none is spent warming up.
        assert yaml.safe_load((study / run / "config.yaml").read_text())["optim"]["warmup_steps"] == 0
    # Fine-tuning learns on target data for 3 of scratch's 7 steps (a cosine from the peak: 2.0 of 4.0 peak
    # rates), as much as the short scratch arm; joint's 7 steps draw the one target case a third of the time.
    learning = results["learning_on_target"]["1"]
    assert learning["scratch"] == pytest.approx(4.0 * 3e-3) and learning["joint"] == pytest.approx(4.0 * 3e-3 / 3)
    assert learning["fine-tuned"] == pytest.approx(learning["scratch, target steps"]) == pytest.approx(2.0 * 3e-3)
    for arm in ("scratch", "scratch, target steps", "fine-tuned", "joint"):
        entry = results["arms"][arm]["1"]
        assert set(entry["per_seed"]) == {"0", "1"}
        assert entry["mean"]["ssim"] == pytest.approx(np.mean([s["ssim"] for s in entry["per_seed"].values()]))
        assert entry["sd"]["psnr"] is not None and entry["per_seed"]["0"]["kid_2d"] is not None
    # Seeds differ: the two scratch models are not the same model.
    assert results["arms"]["scratch"]["1"]["per_seed"]["0"] != results["arms"]["scratch"]["1"]["per_seed"]["1"]
    # The independent real case scores a KID and a paired SSIM of its own (another head), and is not mean-fill.
    references = results["references"]
    assert list(references) == ["mean-fill inside the head", "independent real target cohort"]
    assert references["independent real target cohort"]["ssim"] != references["mean-fill inside the head"]["ssim"]
    assert (study / "transfer.png").stat().st_size > 5000 and "| joint | 1 |" in (study / "transfer.md").read_text()
    from diffusion_glioma.evaluation import transfer

    def sampled_again(*args, **kwargs):
        raise AssertionError("a scored arm was sampled again")

    monkeypatch.setattr(transfer, "sample", sampled_again)
    arguments = ["--config", str(config), "--out", str(study), "--counts", "1", "--seeds", "0", "1", "--source-steps",
                 "4", "--target-steps", "3", "--test-cases", "1", "--features", "random", "--quiet"]
    assert transfer_study.main(arguments + ["--sample-steps", "2"]) == 0
    assert json.loads((study / "transfer.json").read_text())["arms"] == results["arms"]
    with pytest.raises(AssertionError, match="sampled again"):
        transfer_study.main(arguments + ["--sample-steps", "3"])
    assert transfer_study.main(["--config", str(config), "--out", str(study), "--counts", "1", "--seeds", "0",
                                "--source-steps", "5", "--target-steps", "3", "--test-cases", "1",
                                "--sample-steps", "2", "--features", "random", "--quiet"]) == 2
    # Asking for more cases than there are is refused before any training.
    assert transfer_study.main(["--config", str(config), "--out", str(tmp_path / "s2"), "--counts", "2",
                                "--test-cases", "1"]) == 2


def test_transfer_comparisons_pair_the_arms_by_seed():
    """Seeds move every arm together (scratch's KID 0.1, 0.5, 0.9); fine-tuning 0.01 below scratch on
    every seed is a difference, though the unpaired spreads overlap; joint on both sides of scratch is
    within noise; one seed gives no interval."""
    from diffusion_glioma.evaluation.transfer import markdown_table, paired_by_seed

    scratch = [0.1, 0.5, 0.9]
    arms = {"scratch": scratch, "fine-tuned": [k - 0.01 for k in scratch], "joint": [0.12, 0.47, 0.92],
            "scratch, target steps": [k + 0.05 for k in scratch]}
    per_seed = lambda values: {str(s): {"kid_2d": v, "ssim": 0.5, "psnr": 20.0, "mae": 0.1}  # noqa: E731
                               for s, v in enumerate(values)}
    results = {"counts": [4], "seeds": [0, 1, 2], "references": {}, "source_steps": 1, "target_steps": 1,
               "arms": {arm: {"4": {"per_seed": per_seed(v), "mean": {}, "sd": {}}} for arm, v in arms.items()}}
    paired = paired_by_seed(results)
    finetuned = paired["fine-tuned - scratch"]["4"]
    assert finetuned["mean"] == pytest.approx(-0.01) and finetuned["ci95"][1] < 0
    joint = paired["joint - scratch"]["4"]
    assert joint["ci95"][0] < 0 < joint["ci95"][1]
    assert paired["fine-tuned - scratch, target steps"]["4"]["mean"] == pytest.approx(-0.06)
    for entry in results["arms"].values():
        entry["4"]["mean"] = {m: 0.5 for m in ("kid_2d", "ssim", "psnr", "mae")}
        entry["4"]["sd"] = {m: None for m in ("kid_2d", "ssim", "psnr", "mae")}
    results["paired_kid"] = paired
    table = markdown_table(results)
    assert "| fine-tuned - scratch | -0.0100 [-0.0100, -0.0100] lower (3 seeds) |" in table and "within noise" in table
    for entry in results["arms"].values():
        entry["4"]["per_seed"] = {"0": entry["4"]["per_seed"]["0"]}
    assert paired_by_seed(results)["fine-tuned - scratch"]["4"]["ci95"] is None


def test_a_phase_warms_up_over_at_most_a_tenth_of_its_steps_and_learning_on_target_follows_the_schedule():
    from diffusion_glioma.evaluation.transfer import learning_on_target, phase_warmup
    from diffusion_glioma.training.config import TrainConfig

    assert phase_warmup(50, 60) == 6 and phase_warmup(50, 2000) == 50  # the old study: 50 of 60 steps
    constant = TrainConfig.model_validate({"output_dir": "o", "data": {"cache": "c"}, "optim": {"learning_rate": 1e-3, "warmup_steps": 0,
                                                                             "lr_schedule": "constant"}})
    assert learning_on_target(constant, [(100, 0.0), (40, 1.0)]) == pytest.approx(40 * 1e-3)
    assert learning_on_target(constant, [(40, 0.25)]) == pytest.approx(10 * 1e-3)
    cosine = constant.model_copy(update={"optim": constant.optim.model_copy(update={"lr_schedule": "cosine",
                                                                                     "warmup_steps": 10})})
    # A linear warm-up then a cosine to 0 sums to half the peak rate per step, for any warm-up: the
    # old study's fine-tune phase was short in steps (60 of scratch's 260), not in rate.
    assert learning_on_target(cosine, [(1000, 1.0)]) == pytest.approx(0.5 * 1000 * 1e-3, rel=1e-3)
    assert learning_on_target(cosine, [(40, 1.0), (20, 0.0)]) == pytest.approx(0.5 * 40 * 1e-3, rel=1e-3)


def test_untrained_classes_start_from_the_mean_of_the_trained_ones(tiny_cache, tmp_path):
    from diffusion_glioma.data.cache import read_index

    # Pretraining declares the pediatric class (the shipped config does) but sees adult cases only.
    pre = write_config(tmp_path / "pre.yaml", tiny_cache, tmp_path / "pre", data={"only_diseases": ["glioblastoma"]},
                       optim={"steps": 2})
    loop.train(load_train_config(pre))
    source = tmp_path / "pre" / "pipeline"
    facts = json.loads((source / "training.json").read_text())
    assert facts["disease_classes_trained"] == ["glioblastoma"]
    rows_before = weights(source / "unet")["class_embedding.weight"]
    assert not torch.equal(rows_before[2], rows_before[1])  # the untrained row is still its random start

    fine = write_config(tmp_path / "fine.yaml", tiny_cache, tmp_path / "fine", finetune={"source": str(source)})
    model, _ = loop.build_model(load_train_config(fine), read_index(tiny_cache))
    rows = model.class_embedding.weight.detach()
    assert torch.equal(rows[0], rows_before[0]) and torch.equal(rows[1], rows_before[1])
    assert torch.equal(rows[2], rows_before[1])  # the mean of the one trained disease

    # With two trained diseases, a class new to the model starts from their mean.
    from diffusion_glioma.training.common import with_classes

    extended = with_classes(model, ["none", "glioblastoma", "pediatric_diffuse_glioma", "dipg"],
                                  ["glioblastoma", "pediatric_diffuse_glioma"])
    torch.testing.assert_close(extended.class_embedding.weight[3].detach(), (rows[1] + rows[2]) / 2)


PEAK_RSS = """
import json, resource, sys
from diffusion_glioma.training.config import load_train_config
from diffusion_glioma.training.diffusion import train
train(load_train_config(sys.argv[1]))
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_host_memory_does_not_grow_with_the_number_of_cases(phantom_dir, tmp_path):
    """Training passes over every case of a 48-case cache at 96x96x64 with the peak memory of a
    4-case one: cases are read when needed, not kept. Keeping them would add 5.3 MB a case as stored
    (250 MB here; the old dataset kept float32, twice that); the peak itself moves by up to about
    80 MB from run to run (the C heap), hence 48 cases and a margin of 120 MB."""

    from diffusion_glioma.config import DataConfig
    from diffusion_glioma.data.cache import read_index

    one = tmp_path / "one"
    prepare_dataset(phantom_dir, one, DataConfig(preprocess=SMALL.model_copy(update={"shape": (96, 96, 64),
                    "spacing": (2.0, 2.0, 2.0)})), limit=1, progress=False)
    index = read_index(one)
    peaks = {}
    for n in (4, 48):
        cache = tmp_path / f"cache{n}"
        (cache / "cases").mkdir(parents=True)
        entries = []
        for k in range(n):  # copies of one case under new ids: what matters here is their number and size
            entry = {**index["cases"][0], "case_id": f"case-{k:03d}"}
            (cache / "cases" / f"{entry['case_id']}.safetensors").write_bytes(
                (one / "cases" / f"{index['cases'][0]['case_id']}.safetensors").read_bytes())
            entries.append(entry)
        (cache / "dataset.json").write_text(json.dumps({**index, "cases": entries}))
        config = write_config(tmp_path / f"c{n}.yaml", cache, tmp_path / f"run{n}",
                              optim={"steps": 24, "batch_size": 2}, ema={"enabled": False},
                              model={"preset": "tiny", "overrides": {"base_channels": 4, "norm_groups": 2,
                                                                     "wavelet": True}},
                              checkpoints={"every": 1000}, validation={"every": 1000, "num_inference_steps": 1},
                              log_every=3, diffusion={"prediction_type": "v_prediction"})
        script = tmp_path / "peak.py"
        script.write_text(PEAK_RSS)
        result = subprocess.run([sys.executable, str(script), str(config)], capture_output=True, text=True,
                                timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[n] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
        visited = {c for line in (tmp_path / f"run{n}" / "logs" / "data_order_rank0.jsonl").read_text().splitlines()
                   for c in json.loads(line)["cases"]}
        assert len(visited) == n
    print(peaks)
    assert peaks[48] - peaks[4] < 120, peaks


def test_bf16_config_trains_in_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    """Emulated bf16 was 36x slower than fp32 on an AMD EPYC: such a CPU trains in fp32, with a warning."""
    import diffusion_glioma.precision as precision
    from diffusion_glioma.training.common import effective_mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "fast_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert effective_mixed_precision("bf16") == "no"
    monkeypatch.setattr(precision, "fast_bf16", lambda device: True)
    assert effective_mixed_precision("bf16") == "bf16" and effective_mixed_precision("no") == "no"


def test_wavelet_bands_meet_the_noise_at_unit_variance(tiny_cache):
    """The band scale measured on the cache makes every Haar band of the training heads unit-variance
    in the space the model diffuses in, and decode undoes encode exactly."""
    from diffusion_glioma.data.dataset import CachedCases
    from diffusion_glioma.models.unet3d import build_denoiser

    classes = ["none", "glioblastoma", "pediatric_diffuse_glioma"]
    scale = loop.wavelet_band_scale(tiny_cache, classes)
    assert max(scale) / min(scale) > 3  # raw detail bands are much smaller than the low-pass band
    model = build_denoiser("tiny", wavelet=True, wavelet_band_scale=scale)
    dataset = CachedCases(tiny_cache, diseases=classes)
    coded, heads = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["image"].float()[None]
        encoded = model.encode(image)
        torch.testing.assert_close(model.decode(encoded), image, atol=1e-5, rtol=0)
        heads.append(loop.head_on_model_grid(item["labels"][None], wavelet=True)[0, 0] > 0)
        coded.append(encoded[0].view(-1, 8, *encoded.shape[2:]))
    bands = torch.cat([c[:, :, h] for c, h in zip(coded, heads)], dim=2)  # (modality, band, voxels)
    std = bands.transpose(0, 1).reshape(8, -1).std(dim=1)
    torch.testing.assert_close(std, torch.ones(8), atol=0.02, rtol=0)


def test_a_run_on_a_few_cases_measures_the_wavelet_bands_on_those_cases_alone(tiny_cache, tmp_path):
    """A fresh wavelet model's band scale comes from the cases the run trains on (`data.case_ids`), not
    from the first cases of the whole cache: a run on scarce cases learns nothing from the others."""
    from diffusion_glioma.data.cache import read_index
    from diffusion_glioma.data.dataset import CachedCases

    classes = ["none", "glioblastoma", "pediatric_diffuse_glioma"]
    first, *_, last = CachedCases(tiny_cache, diseases=classes).case_ids
    config = write_config(tmp_path / "c.yaml", tiny_cache, tmp_path / "run", data={"case_ids": [last]},
                          model={"preset": "tiny", "overrides": {"wavelet": True}})
    model, _ = loop.build_model(load_train_config(config), read_index(tiny_cache))
    alone = tuple(model.config.wavelet_band_scale)
    assert alone == loop.wavelet_band_scale(tiny_cache, classes, case_ids=[last])
    assert alone != loop.wavelet_band_scale(tiny_cache, classes)  # the whole cache's first cases
    assert loop.wavelet_band_scale(tiny_cache, classes, cases=1) == loop.wavelet_band_scale(tiny_cache, classes,
                                                                                              case_ids=[first])


def test_trackers_get_the_full_config_and_the_validation_figures(tiny_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path / "c.yaml", tiny_cache, tmp_path / "run", tracker="tensorboard",
                          optim={"steps": 2}, validation={"every": 2, "num_inference_steps": 2})
    assert main(["train", "--config", str(config)]) == 0
    events = [p for p in (tmp_path / "run" / "logs").rglob("events.out.tfevents.*")]
    tags = {"images": set(), "scalars": set()}
    for path in events:
        accumulator = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags().get(kind, []))
    assert "validation" in tags["images"] and "loss" in tags["scalars"]
    hparams = next((tmp_path / "run" / "logs" / "train").rglob("hparams.yml")).read_text()
    assert "optim.learning_rate: 0.003" in hparams and "diffusion.prediction_type: sample" in hparams


def test_a_tracker_that_is_not_installed_is_a_warning_not_silence(tiny_cache, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    config = write_config(tmp_path / "c.yaml", tiny_cache, tmp_path / "run", tracker="wandb", optim={"steps": 1})
    with pytest.warns(UserWarning, match="tracker wandb: not installed"):
        loop.train(load_train_config(config))
    assert len(losses(tmp_path / "run")) == 1  # the run's own log is written anyway


def test_a_run_begun_before_a_setting_existed_resumes(tiny_cache, tmp_path):
    """A run's config.yaml written by an older version lacks settings added since; they take their
    defaults, so the run resumes instead of being refused as "another config"."""
    config = write_config(tmp_path / "c.yaml", tiny_cache, tmp_path / "run", optim={"steps": 4})
    assert main(["train", "--config", str(config)]) == 0
    saved = tmp_path / "run" / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    del older["tracker"]
    saved.write_text(yaml.safe_dump(older))
    assert main(["train", "--config", str(config), "--resume", "--steps", "6"]) == 0
    assert len(losses(tmp_path / "run")) == 6


def test_a_wall_clock_budget_stops_a_run_at_a_log_step_and_records_the_steps_taken(tiny_cache, tmp_path):
    """`--max-minutes` (equal-compute studies): the run stops at the first log step past the budget,
    with its checkpoint and pipeline written there and training.json saying how far it got; a GAN
    loop stops the same way, and a resumed run counts the time trained before it."""
    from tests.test_cgan import GAN, gan_config

    config = write_config(tmp_path / "d.yaml", tiny_cache, tmp_path / "diffusion", log_every=3,
                          optim={"steps": 30, "max_minutes": 1e-7})
    assert main(["train", "--config", str(config)]) == 0
    facts = json.loads((tmp_path / "diffusion" / "pipeline" / "training.json").read_text())
    assert facts["steps"] == 3
    checkpoint = tmp_path / "diffusion" / "checkpoints" / "checkpoint-3"
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint-3"]
    # The budget counts the whole run: a checkpoint that has trained an hour leaves no time in 30 minutes.
    (checkpoint / "trained_seconds.json").write_text(json.dumps({"seconds": 3600.0}))
    assert main(["train", "--config", str(config), "--resume", "--max-minutes", "30"]) == 0
    assert json.loads((tmp_path / "diffusion" / "pipeline" / "training.json").read_text())["steps"] == 6
    assert main(["train", "--config", str(config), "--resume", "--max-minutes", "120"]) == 0
    assert json.loads((tmp_path / "diffusion" / "pipeline" / "training.json").read_text())["steps"] == 30

    gan = gan_config(tmp_path / "g.yaml", tiny_cache, tmp_path / "gan", gan={**GAN, "kind": "pix2pix"},
                     optim={"steps": 30, "max_minutes": 1e-7}, log_every=3)
    assert main(["train", "--config", str(gan)]) == 0
    assert json.loads((tmp_path / "gan" / "pipeline" / "training.json").read_text())["steps"] == 3


def test_lognormal_noise_levels_follow_edm_and_uniform_covers_every_level():
    """EDM's log-normal sigma, mapped to the discrete cosine schedule: log sigma of the drawn levels has
    the asked mean and sd (a mapping in the wrong units, or to t directly, would not)."""
    from types import SimpleNamespace

    from diffusion_glioma.pipeline import training_scheduler

    scheduler = training_scheduler("v_prediction")
    alpha_bar = scheduler.alphas_cumprod.double()

    def drawn(kind, mean=-1.2, sd=1.2):
        config = SimpleNamespace(diffusion=SimpleNamespace(noise_levels=kind, lognormal_mean=mean, lognormal_std=sd))
        return loop.training_timesteps(scheduler, 50_000, torch.Generator().manual_seed(0), config, "cpu")

    for mean, sd in ((-1.2, 1.2), (0.5, 0.6)):
        t = drawn("lognormal", mean, sd)
        log_sigma = 0.5 * ((1 - alpha_bar[t]) / alpha_bar[t]).log()
        assert abs(float(log_sigma.mean()) - mean) < 0.03 and abs(float(log_sigma.std()) - sd) < 0.03
    uniform = drawn("uniform")
    assert abs(float(uniform.float().mean()) - 499.5) < 5 and int(uniform.min()) == 0 and int(uniform.max()) == 999


def test_the_edm_skip_trains_and_samples_in_one_parametrisation():
    """The training target of an x0 model with EDM's skip, read back by the pipeline's x0 estimate,
    is x0 at every noise level (a target and a sampler that disagreed would train one thing and
    sample another); at sigma_data = 1 the skip is v-prediction, as its docstring says."""
    from diffusion_glioma.models.unet3d import build_denoiser
    from diffusion_glioma.pipeline import training_scheduler

    scheduler = training_scheduler("sample")
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 8, 4, 4, 4, generator=generator), torch.randn(3, 8, 4, 4, 4, generator=generator)
    t = torch.tensor([0, 39, 700])
    noisy = scheduler.add_noise(x0, noise, t)
    target = loop.diffusion_target(scheduler, x0, noise, noisy, t, "sample", 0.5)
    pipe = MaskToMRIPipeline(build_denoiser("tiny", skip_sigma_data=0.5), scheduler)
    torch.testing.assert_close(pipe.x0_estimate(target, t, noisy), x0, atol=1e-4, rtol=0)
    assert not torch.allclose(target, x0, atol=0.1)  # the network's output is F, not x0
    torch.testing.assert_close(loop.diffusion_target(scheduler, x0, noise, noisy, t, "sample", 1.0),
                               -scheduler.get_velocity(x0, noise, t), atol=1e-4, rtol=0)
