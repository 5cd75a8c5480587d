"""Datasets users can trust: nnU-Net regions decode back to their labels, a killed run resumes clean,
names survive a grown mask folder, manifests cannot reach outside their folder, provenance does not
depend on the working directory."""

import json
import shutil
from pathlib import Path

import pytest

from diffusion_glioma.errors import DataError
from diffusion_glioma.evaluation.sets import generator_training_cases, read_set
from diffusion_glioma.generate import GenerateOptions, generate_dataset
from diffusion_glioma.io import write_json
from tests.helpers import NNUNET_PYTHON, nnunet_checks
from tests.test_generate import FAST, files_of, model_dir  # noqa: F401  (the fixture)

MODALITIES = ("t1n", "t1c", "t2w", "t2f")


def _region_order(dataset_json: Path) -> list[str]:
    """The `labels` keys in file order, which is the order nnU-Net reads its regions in."""
    return list(json.loads(dataset_json.read_text())["labels"])


def test_nnunet_regions_are_written_outside_in(model_dir, phantom_dir, tmp_path):  # noqa: F811
    out = tmp_path / "nnunet"
    generate_dataset(model_dir, phantom_dir, out, GenerateOptions(format="nnunet", limit=2, **FAST), progress=False)
    info_path = out / "Dataset501_SyntheticGlioma" / "dataset.json"
    order = _region_order(info_path)
    assert order[:4] == ["background", "whole_tumor", "tumor_core", "enhancing_tumor"]
    info = json.loads(info_path.read_text())
    # Each region of regions_class_order is the region listed at that place (nnU-Net pairs them by position).
    firsts = [v if isinstance(v, int) else v[0] for k, v in info["labels"].items() if k != "background"]
    assert info["regions_class_order"] == firsts


@pytest.mark.skipif(not NNUNET_PYTHON.is_file(), reason=f"nnunetv2 is not installed ({NNUNET_PYTHON} missing; "
                    ".ci/run installs it)")
def test_nnunet_checks_the_export_and_decodes_every_label_file_back(model_dir, phantom_dir, tmp_path):
    out = tmp_path / "nnunet"
    generate_dataset(model_dir, phantom_dir, out, GenerateOptions(format="nnunet", **FAST), progress=False)
    root = out / "Dataset501_SyntheticGlioma"
    # The order that nnU-Net cannot read (what sorted keys wrote) must fail the same decoding.
    sorted_keys = out / "Dataset502_SortedKeys"
    shutil.copytree(root, sorted_keys)
    info = json.loads((root / "dataset.json").read_text())
    (sorted_keys / "dataset.json").write_text(json.dumps(info, sort_keys=True))
    results = nnunet_checks([("verify", root), ("decode", root), ("decode", sorted_keys)], tmp_path)
    assert results[("verify", root)] == "ok", results
    assert results[("decode", root)] == "decoded 5", results
    assert not results[("decode", sorted_keys)].startswith("decoded"), results


def test_a_killed_run_leaves_nothing_a_resume_or_nnunet_would_count(model_dir, phantom_dir, tmp_path):  # noqa: F811
    options = GenerateOptions(format="nnunet", limit=3, **FAST)
    out = tmp_path / "out"
    generate_dataset(model_dir, phantom_dir, out, options, progress=False)
    root = out / "Dataset501_SyntheticGlioma"
    records = out / ".records"
    done = sorted(records.glob("*.json"))
    # What kill -9 leaves: a temp image beside its target, a whole temp record, a truncated record.
    stray_image = root / "imagesTr" / f".{done[0].stem}_0000.tmp4242.nii.gz"
    shutil.copy(root / "imagesTr" / f"{done[0].stem}_0000.nii.gz", stray_image)
    shutil.copy(done[1], records / f".{done[1].stem}.tmp4242.json")
    done[2].write_text(done[2].read_text()[:40])
    resumed = generate_dataset(model_dir, phantom_dir, out, options, progress=False)
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]
    assert len(resumed) == 3
    manifest = (out / "manifest.jsonl").read_text().splitlines()
    info = json.loads((root / "dataset.json").read_text())
    labels = sorted(p.name for p in (root / "labelsTr").iterdir())
    assert len(manifest) == info["numTraining"] == len(labels) == len(list(records.glob("*.json"))) == 3
    assert len(list((root / "imagesTr").iterdir())) == 4 * 3
    assert json.loads(done[2].read_text())["output"] == done[2].stem  # the truncated record was redone


def _mask_folder(phantom_dir: Path, folder: Path, names: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name in names:
        if not (folder / name).exists():
            shutil.copytree(phantom_dir / name, folder / name)
    return folder


def test_a_grown_mask_folder_adds_outputs_and_renames_none(model_dir, phantom_dir, tmp_path):  # noqa: F811
    names = sorted(p.name for p in phantom_dir.iterdir() if p.is_dir())
    masks, out = tmp_path / "masks", tmp_path / "out"
    options = GenerateOptions(format="brats", per_mask=2, **FAST)
    _mask_folder(phantom_dir, masks, names[1:3])
    generate_dataset(model_dir, masks, out, options, progress=False)
    before = files_of(out)
    before_records = {json.loads(line)["output"]: json.loads(line)
                      for line in (out / "manifest.jsonl").read_text().splitlines()}
    _mask_folder(phantom_dir, masks, names[:3])  # a mask that sorts first
    written = []
    import diffusion_glioma.generate as gen
    real_save = gen.save_volume
    try:
        gen.save_volume = lambda path, *a, **k: (written.append(Path(path)), real_save(path, *a, **k))[1]
        generate_dataset(model_dir, masks, out, options, progress=False)
    finally:
        gen.save_volume = real_save
    after = files_of(out)
    assert {name: after[name] for name in before} == before  # nothing renamed or overwritten
    assert len(after) == len(before) + 2 * 5 and len(written) == 2 * 5  # only the new mask's two draws
    records = {json.loads(line)["output"]: json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()}
    for output, record in before_records.items():
        assert records[output]["files"] == record["files"]
    new = [r for r in records.values() if r["case_id"] == names[0]]
    assert sorted(Path(r["files"]["mask"]).parent.name for r in new) == ["BraTS-GLI-90002-000", "BraTS-GLI-90002-001"]


def _one_record_set(folder: Path, phantom_dir: Path, **changes) -> Path:
    case = sorted(p for p in phantom_dir.iterdir() if p.is_dir())[0]
    folder.mkdir()
    files = {}
    for m in MODALITIES:
        shutil.copy(next(case.glob(f"*-{m}.nii.gz")), folder / f"{m}.nii.gz")
        files[m] = f"{m}.nii.gz"
    record = {"output": "case_syn000", "case_id": case.name, "files": files,
              "source_mask": str(next(case.glob("*-seg.nii.gz"))), "label_scheme": "brats_gli",
              "disease": "glioblastoma", **changes}
    (folder / "manifest.jsonl").write_text(json.dumps({"output": "x", "case_id": "x", "files": files,
                                                       "source_mask": record["source_mask"]}) + "\n"
                                           + json.dumps(record) + "\n")
    return folder


@pytest.mark.parametrize("changes, problem", [
    ({"output": "../../../../x"}, "is not a plain name"),
    ({"files": {**{m: f"{m}.nii.gz" for m in MODALITIES}, "t1n": "../outside.nii.gz"}}, "leaves"),
    ({"files": {**{m: f"{m}.nii.gz" for m in MODALITIES}, "t2f": "/etc/passwd"}}, "must be relative"),
])
def test_a_manifest_cannot_reach_outside_its_folder(phantom_dir, tmp_path, changes, problem):
    from diffusion_glioma.evaluation.nnunet_study import export_study

    folder = _one_record_set(tmp_path / "syn", phantom_dir, **changes)
    (tmp_path / "outside.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=rf"manifest.jsonl:2: .*{problem}"):
        read_set(folder, MODALITIES)
    victim = tmp_path / "study"
    with pytest.raises(DataError, match="manifest.jsonl:2"):
        export_study(phantom_dir, folder, victim, progress=False)
    assert not victim.exists() and (tmp_path / "outside.nii.gz").read_bytes() == b""


def test_provenance_reads_the_same_from_any_working_directory(model_dir, phantom_dir, tmp_path, monkeypatch):  # noqa: F811
    write_json(model_dir / "training.json", {"labels_seen": [0, 1, 2, 3, 4, 6], "cases": ["BraTS-GLI-00000-000"]})
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(model_dir.parent)
    out = tmp_path / "out"
    generate_dataset(Path(model_dir.name), phantom_dir, out, GenerateOptions(limit=1, **FAST), progress=False)
    monkeypatch.chdir(tmp_path / "here")
    assert generator_training_cases(out) == {"BraTS-GLI-00000-000"}
    # The same weights by another path are the same model: the run resumes instead of refusing.
    assert len(generate_dataset(model_dir.resolve(), phantom_dir, out, GenerateOptions(limit=1, **FAST),
                                progress=False)) == 1
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert len(generate_dataset(copy, phantom_dir, out, GenerateOptions(limit=1, **FAST), progress=False)) == 1
