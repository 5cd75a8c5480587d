"""Synthetic datasets from mask folders: formats, geometry, seeds, resume, two processes, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from diffusion_glioma.data.layouts import discover_cases

from diffusion_glioma import generate as gen
from diffusion_glioma.cli import main
from diffusion_glioma.errors import DataError, DiffusionGliomaError
from diffusion_glioma.generate import GenerateOptions, generate_dataset
from diffusion_glioma.io import write_json
from diffusion_glioma.models.unet3d import build_denoiser
from diffusion_glioma.pipeline import MaskToMRIPipeline, training_scheduler
from tests.helpers import write_nifti

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(steps=2, sampler="ddim", precision="fp32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny pipeline on a 16^3, 12 mm grid (generation does not care about quality)."""
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    unet = build_denoiser("tiny")
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    pipe = MaskToMRIPipeline(unet, training_scheduler("v_prediction"),
                             preprocess={"modalities": ["t1n", "t1c", "t2w", "t2f"], "shape": [16, 16, 16],
                                         "spacing": [12.0, 12.0, 12.0]})
    pipe.save_pretrained(folder)
    write_json(folder / "training.json", {"labels_seen": [0, 1, 2, 3, 4, 6]})
    return folder


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.nii.gz"))}


def volumes_of(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.rglob("*.nii.gz"))}


@pytest.mark.parametrize("fmt", ["pairs", "brats", "nnunet"])
def test_every_format_lands_on_the_mask_grid(model_dir, phantom_dir, tmp_path, fmt):
    out = tmp_path / fmt
    records = generate_dataset(model_dir, phantom_dir, out, GenerateOptions(format=fmt, per_mask=2, batch_size=3, **FAST),
                               progress=False)
    assert len(records) == 10
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["case_id"], r["k"]) for r in manifest] == sorted((r["case_id"], r["k"]) for r in manifest)
    for record in manifest:
        seg = nib.load(record["source_mask"])
        for name, rel in record["files"].items():
            img = nib.load(str(out / rel))
            assert img.shape == seg.shape, (name, rel)
            np.testing.assert_array_equal(img.affine, seg.affine)
            data = np.asarray(img.dataobj)
            if name != "mask":
                assert img.get_data_dtype() == np.float32 and data.min() >= 0 and data.max() <= 1
                assert (data[np.asarray(seg.dataobj) == 0] >= 0).all()
        assert record["sampler"] == "ddim" and record["steps"] == 2 and len(record["model_hash"]) == 16
    first = manifest[0]
    mask = np.asarray(nib.load(str(out / first["files"]["mask"])).dataobj)
    source = np.asarray(nib.load(first["source_mask"]).dataobj)
    if fmt in ("pairs", "brats"):  # adult BraTS-GLI labels are kept as they are
        np.testing.assert_array_equal(mask, source)
    if fmt == "brats":
        assert (out / "BraTS-GLI-90000-000" / "BraTS-GLI-90000-000-t2f.nii.gz").is_file()
        assert any(p.name.startswith("BraTS-PED-9") for p in out.iterdir())
        # read back as written, though a PED mask without oedema alone could be either release
        reread = {c.case_id: c.labels for c in discover_cases(out)}
        assert reread["BraTS-PED-90003-001"] == "brats_peds_2024" and reread["BraTS-GLI-90000-001"] == "brats_gli"
    if fmt == "nnunet":
        dataset = out / "Dataset501_SyntheticGlioma"
        info = json.loads((dataset / "dataset.json").read_text())
        assert info["numTraining"] == 10 and info["regions_class_order"] == [1, 2, 3, 4]  # WT, TC, ET, cyst
        assert len(list((dataset / "imagesTr").iterdir())) == 40
        assert set(np.unique(mask)) <= {0, 1, 2, 3, 4}


def test_same_seed_same_output_and_resume_after_a_crash(model_dir, phantom_dir, tmp_path, monkeypatch):
    options = GenerateOptions(per_mask=2, batch_size=2, **FAST)
    generate_dataset(model_dir, phantom_dir, tmp_path / "a", options, progress=False)
    # Batching does not change an output beyond float rounding (kernels differ with the batch size).
    generate_dataset(model_dir, phantom_dir, tmp_path / "b", GenerateOptions(per_mask=2, batch_size=1, **FAST),
                     progress=False)
    a, b = volumes_of(tmp_path / "a"), volumes_of(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    other = generate_dataset(model_dir, phantom_dir, tmp_path / "c", GenerateOptions(per_mask=2, seed=1, **FAST),
                             progress=False)
    c = volumes_of(tmp_path / "c")
    assert not np.allclose(c["BraTS-GLI-00000-000_syn000/t1n.nii.gz"], a["BraTS-GLI-00000-000_syn000/t1n.nii.gz"])
    assert len(other) == 10

    real_save = gen.save_volume
    saved = []

    def crash_in_the_seventh_output(path, *args, **kwargs):
        saved.append(path)
        if len(saved) == 6 * 5 + 2:  # two files into output 7: a partial output
            raise KeyboardInterrupt
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(gen, "save_volume", crash_in_the_seventh_output)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(model_dir, phantom_dir, tmp_path / "d", options, progress=False)
    monkeypatch.setattr(gen, "save_volume", real_save)
    assert len(list((tmp_path / "d" / ".records").iterdir())) == 6
    assert not list((tmp_path / "d").rglob(".*.tmp*"))  # no half-written file under any name
    resumed = generate_dataset(model_dir, phantom_dir, tmp_path / "d", options, progress=False)
    assert len(resumed) == 10
    assert files_of(tmp_path / "d") == files_of(tmp_path / "a")


def test_dry_run_and_limit(model_dir, phantom_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "--masks", str(phantom_dir), "--out", str(tmp_path / "o"),
                 "--limit", "2", "--per-mask", "3", "--dry-run", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "6 outputs to write, 0 already done"
    assert len(lines) == 6 * 5 + 1 and not (tmp_path / "o").exists()


def test_plain_common_masks_and_missing_head(model_dir, phantom_dir, tmp_path):
    from diffusion_glioma.config import PreprocessConfig
    from diffusion_glioma.data.layouts import discover_cases
    from diffusion_glioma.data.preprocess import load_case

    masks = tmp_path / "masks"
    for case in discover_cases(phantom_dir)[:2]:
        loaded = load_case(case, PreprocessConfig(shape=(16, 16, 16)))
        write_nifti(masks / f"{case.case_id}.nii.gz", loaded.labels, loaded.images["t1n"].affine, dtype=np.int16)
    records = generate_dataset(model_dir, masks, tmp_path / "out", GenerateOptions(disease="glioblastoma", **FAST),
                               progress=False)
    assert [r["case_id"] for r in records] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]

    tumour_only = tmp_path / "tumour_only"
    tumour_only.mkdir()
    seg = next(phantom_dir.glob("BraTS-GLI-00000-000/*-seg.nii.gz"))
    shutil.copy(seg, tumour_only / "BraTS-GLI-00000-000-seg.nii.gz")
    with pytest.raises(DataError, match="has no head label and the case has no t1n/t1c/t2w/t2f images"):
        generate_dataset(model_dir, tumour_only, tmp_path / "out2", GenerateOptions(**FAST), progress=False)


def test_bad_input_is_refused_and_nothing_is_lost(model_dir, phantom_dir, tmp_path, capsys):
    out = tmp_path / "out"
    generate_dataset(model_dir, phantom_dir, out, GenerateOptions(limit=1, **FAST), progress=False)
    before = files_of(out)
    with pytest.raises(DataError, match="other settings \\(steps\\)"):
        generate_dataset(model_dir, phantom_dir, out, GenerateOptions(limit=1, steps=3, sampler="ddim", precision="fp32"), progress=False)
    assert files_of(out) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate_dataset(model_dir, phantom_dir, tmp_path / "busy", GenerateOptions(**FAST), progress=False)
    with pytest.raises(DiffusionGliomaError, match="between 1 and 1000"):
        generate_dataset(model_dir, phantom_dir, tmp_path / "x", GenerateOptions(steps=5000), progress=False)
    assert main(["generate", "--model", str(tmp_path / "no_model"), "--masks", str(phantom_dir),
                 "--out", str(tmp_path / "y")]) == 2
    assert "model folder not found" in capsys.readouterr().err

    # A model that never saw a cyst refuses pediatric masks with one.
    picky = tmp_path / "picky"
    shutil.copytree(model_dir, picky)
    write_json(picky / "training.json", {"labels_seen": [0, 1, 2, 3, 4]})
    cyst_case = tmp_path / "cyst"
    shutil.copytree(phantom_dir / "BraTS-PED-00001-000", cyst_case / "BraTS-PED-00001-000")
    seg_path = next(cyst_case.rglob("*-seg.nii.gz"))
    seg = nib.load(str(seg_path))
    labels = np.asarray(seg.dataobj).copy()
    labels[tuple(np.argwhere(labels == 2)[0])] = 3  # make sure there is a cyst voxel
    nib.save(nib.Nifti1Image(labels, seg.affine), str(seg_path))
    with pytest.raises(DataError, match=r"labels \['cyst'\] were never seen by the model"):
        generate_dataset(picky, cyst_case, tmp_path / "z", GenerateOptions(**FAST), progress=False)


@pytest.mark.slow
def test_two_processes_write_each_output_once(model_dir, phantom_dir, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
         str(ROOT / "scripts" / "generate.py"), "--model", str(model_dir), "--masks", str(phantom_dir),
         "--out", str(out), "--per-mask", "2", "--steps", "2", "--sampler", "ddim", "--precision", "fp32", "--quiet"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    outputs = [r["output"] for r in manifest]
    assert len(outputs) == len(set(outputs)) == 10
    # Outputs split, not masks: in (mask, k) order output j goes to process j mod 2, so each mask's two
    # draws go to both processes.
    assert [r["process"] for r in manifest] == [j % 2 for j in range(10)]
    single = tmp_path / "single"
    generate_dataset(model_dir, phantom_dir, single, GenerateOptions(per_mask=2, **FAST), progress=False)
    a, b = volumes_of(out), volumes_of(single)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)


def test_precision_and_device_options(model_dir, phantom_dir, tmp_path, capsys):
    """bf16 sampling writes the same kind of dataset, says so in the manifest, and stays close to fp32."""
    outputs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["generate", "--model", str(model_dir), "--masks", str(phantom_dir), "--out", str(out),
                     "--limit", "1", "--steps", "2", "--sampler", "ddim", "--precision", precision,
                     "--device", "cpu", "--quiet"]) == 0
        record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
        assert record["precision"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
        outputs[precision] = volumes_of(out)
    for name, volume in outputs["fp32"].items():
        assert np.abs(volume - outputs["bf16"][name]).mean() < 0.02, name
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_dir), "--masks", str(phantom_dir), "--out", str(tmp_path / "x"),
              "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_disease_comes_from_the_option_the_layout_or_the_name(capsys):
    from diffusion_glioma.data.layouts import Case
    from diffusion_glioma.generate import _told, resolve_disease

    classes = ["none", "glioblastoma", "pediatric_diffuse_glioma"]
    plain = lambda name: Case(name, {}, Path(f"/masks/{name}.nii.gz"), "common", "unknown", "masks")  # noqa: E731
    options = GenerateOptions()
    assert resolve_disease(plain("BraTS-GLI-01234-000"), options, classes) == "glioblastoma"
    assert resolve_disease(plain("BraTS2021_00012"), options, classes) == "glioblastoma"
    assert resolve_disease(plain("UPENN-GBM-00042_11"), options, classes) == "glioblastoma"
    assert resolve_disease(plain("BraTS-PED-00007-000"), options, classes) == "pediatric_diffuse_glioma"
    _told.clear()
    assert resolve_disease(plain("subject_17"), options, classes) == "none"
    assert resolve_disease(plain("subject_18"), options, classes) == "none"
    out = capsys.readouterr().err  # a note: on stderr
    assert out.count("unconditional class 'none'") == 1 and "subject_17" in out  # said once, naming the file
    assert resolve_disease(plain("subject_17"), GenerateOptions(disease="glioblastoma"), classes) == "glioblastoma"
    layout_says = Case("x", {}, Path("/m/x.nii.gz"), "brats_peds", "pediatric_diffuse_glioma", "brats_ped")
    assert resolve_disease(layout_says, options, classes) == "pediatric_diffuse_glioma"
    with pytest.raises(DataError, match="not one of the model's classes"):
        resolve_disease(plain("BraTS-PED-00007-000"), options, ["none", "glioblastoma"])


def test_shards_split_outputs_not_masks_and_the_unsharded_run_writes_the_manifest(model_dir, phantom_dir, tmp_path):
    """One mask's 4 draws over 2 job-array shards: 2 each, no folder-wide file from either; the same
    command without --shard then samples nothing and writes the manifest. The volumes are the ones an
    unsharded run writes (each output has its own seed)."""
    options = dict(per_mask=4, limit=1, **FAST)
    whole = tmp_path / "whole"
    generate_dataset(model_dir, phantom_dir, whole, GenerateOptions(**options), progress=False)
    sharded = tmp_path / "sharded"
    written = [generate_dataset(model_dir, phantom_dir, sharded, GenerateOptions(**options, shard=(i, 2)),
                                progress=False) for i in range(2)]
    assert [sorted(r["k"] for r in shard) for shard in written] == [[0, 2], [1, 3]]
    assert not (sharded / "manifest.jsonl").exists() and not (sharded / "samples.png").exists()
    records_before = {p.name: p.stat().st_mtime_ns for p in (sharded / ".records").glob("*.json")}
    final = generate_dataset(model_dir, phantom_dir, sharded, GenerateOptions(**options), progress=False)
    assert len(final) == 4 and records_before == {p.name: p.stat().st_mtime_ns
                                                  for p in (sharded / ".records").glob("*.json")}
    manifest = [json.loads(line) for line in (sharded / "manifest.jsonl").read_text().splitlines()]
    assert [r["k"] for r in manifest] == [0, 1, 2, 3]
    for record in manifest:
        for m, name in record["files"].items():
            a = np.asarray(nib.load(str(sharded / name)).dataobj)
            b = np.asarray(nib.load(str(whole / name)).dataobj)
            assert np.array_equal(a, b), (record["output"], m)


def test_shard_argument_is_checked(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "m", "--masks", "x", "--out", "y", "--shard", "2/2"])
    assert "I must be between 0 and N - 1" in capsys.readouterr().err


def test_quiet_silences_every_bar_and_notes_go_to_stderr(model_dir, tmp_path, capsys):
    """--quiet: no bar of ours, diffusers' or the hub's; a note (the unknown disease) on stderr, the
    result line on stdout."""
    gen._told.clear()  # the note is said once per process
    masks = tmp_path / "masks"
    masks.mkdir()
    write_nifti(masks / "case1.nii.gz", np.pad(np.ones((8, 8, 8), np.int16), 4), np.diag([12.0, 12.0, 12.0, 1.0]))
    assert main(["generate", "--model", str(model_dir), "--masks", str(masks), "--out", str(tmp_path / "out"),
                 "--steps", "2", "--sampler", "ddim", "--precision", "fp32", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "Loading pipeline components" not in err and "%|" not in err
    assert "unconditional class 'none'" in err and "unconditional" not in out
    assert "1 outputs in" in out
