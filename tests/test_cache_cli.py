import json

import numpy as np
import pytest
import torch

from diffusion_glioma.cli import main
from diffusion_glioma.data import cache as cache_module
from diffusion_glioma.data.cache import prepare_dataset, read_case, read_index
from diffusion_glioma.data.dataset import CachedCases
from diffusion_glioma.data.preprocess import to_source
from diffusion_glioma.errors import DataError
from diffusion_glioma.io import load_volume
from tests.helpers import assert_weights_readable_like
from diffusion_glioma.labels import SCHEMES, TUMOUR_LABELS


def test_phantom_prepare_inspect_through_the_cli(tmp_path, capsys, group_umask):
    raw, cache, report = tmp_path / "raw", tmp_path / "cache", tmp_path / "report"
    assert main(["phantom", "--out", str(raw), "--n-adult", "2", "--n-pediatric", "1", "--spacing", "4",
                 "--quiet"]) == 0
    config = tmp_path / "data.yaml"
    config.write_text("preprocess:\n  shape: [24, 24, 24]\n  spacing: [8.0, 8.0, 8.0]\n")
    assert main(["prepare", str(raw), "--out", str(cache), "--config", str(config), "--quiet"]) == 0
    assert "prepared 3" in capsys.readouterr().out
    assert_weights_readable_like(cache, config)  # the cached cases, as readable as a file the user wrote
    assert main(["inspect", str(raw), "--out", str(report), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "BraTS-PED-00000-000" in out and "no problems found" in out
    assert (report / "montage.png").stat().st_size > 10_000
    listed = json.loads((report / "inspect.json").read_text())
    assert len(listed["cases"]) == 3 and listed["problems"] == []


def test_cached_case_writes_back_onto_the_raw_grid(phantom_dir, tmp_path, small_config):
    prepare_dataset(phantom_dir, tmp_path, small_config, progress=False)
    index = read_index(tmp_path)
    assert [c["disease"] for c in index["cases"]].count("pediatric_diffuse_glioma") == 2
    case = read_case(tmp_path / "cases" / "BraTS-GLI-00000-000.safetensors")
    seg = load_volume(case["source"]["seg"], kind="label")
    back = to_source(case["labels"].numpy().astype(np.uint8), case["geometry"], label=True)
    assert back.shape == seg.shape
    np.testing.assert_array_equal(case["geometry"].source_affine_array, seg.affine)
    # 8 mm model voxels written back on the 3 mm grid: the tumour is where it was.
    tumour = np.isin(SCHEMES["brats_gli"].to_common(seg.array), TUMOUR_LABELS)
    tumour_back = np.isin(back, TUMOUR_LABELS)
    dice = 2 * (tumour & tumour_back).sum() / (tumour.sum() + tumour_back.sum())
    assert dice > 0.6


def test_prepare_resumes_after_an_interruption(phantom_dir, tmp_path, small_config, monkeypatch):
    real = cache_module.prepare_case
    calls = []

    def crash_on_third(case, config):
        calls.append(case.case_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(case, config)

    monkeypatch.setattr(cache_module, "prepare_case", crash_on_third)
    with pytest.raises(KeyboardInterrupt):  # one worker: the patched function runs in this process
        prepare_dataset(phantom_dir, tmp_path / "cache", small_config, progress=False, workers=1)
    assert len(read_index(tmp_path / "cache")["cases"]) == 2
    assert not list((tmp_path / "cache").rglob(".*"))  # no half-written file
    monkeypatch.setattr(cache_module, "prepare_case", real)
    summary = prepare_dataset(phantom_dir, tmp_path / "cache", small_config, progress=False)
    assert len(summary.reused) == 2 and len(summary.prepared) == 3
    # Two worker processes write the same cache as one process does.
    uninterrupted = prepare_dataset(phantom_dir, tmp_path / "fresh", small_config, progress=False, workers=2)
    assert len(uninterrupted.prepared) == 5
    assert read_index(tmp_path / "fresh")["cases"] == read_index(tmp_path / "cache")["cases"]
    for cid in uninterrupted.prepared:
        a = read_case(tmp_path / "cache" / "cases" / f"{cid}.safetensors")
        b = read_case(tmp_path / "fresh" / "cases" / f"{cid}.safetensors")
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])


def test_changed_settings_need_a_new_cache(phantom_dir, tmp_path, small_config):
    prepare_dataset(phantom_dir, tmp_path, small_config, limit=1, progress=False)
    other = small_config.model_copy(update={"preprocess": small_config.preprocess.model_copy(update={"shape": (16, 16, 16)})})
    with pytest.raises(DataError, match="other preprocessing settings"):
        prepare_dataset(phantom_dir, tmp_path, other, limit=1, progress=False)


def test_bad_cases_are_skipped_only_when_asked(phantom_dir, tmp_path, small_config, capsys):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(phantom_dir, raw)
    bad = raw / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t2w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(DataError, match="t2w.nii.gz"):
        prepare_dataset(raw, tmp_path / "cache", small_config, progress=False)
    summary = prepare_dataset(raw, tmp_path / "cache", small_config, skip_bad=True, progress=False)
    assert list(summary.skipped) == ["BraTS-GLI-00001-000"]
    # The first run kept the cases it finished (with parallel workers, maybe more than the first).
    assert "BraTS-GLI-00000-000" in summary.reused and len(summary.reused) + len(summary.prepared) == 4
    assert "BraTS-GLI-00001-000" not in [c["case_id"] for c in read_index(tmp_path / "cache")["cases"]]
    # inspect lists the problem in one line and exits non-zero; the CLI shows no traceback.
    assert main(["inspect", str(raw), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and str(bad) in err and "Traceback" not in err
    assert main(["prepare", str(raw), "--out", str(tmp_path / "other"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("preprocess:\n  shape: [24, 24]\n  spacng: [1, 1, 1]\n")
    assert main(["prepare", str(tmp_path), "--out", str(tmp_path / "c"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "preprocess.spacng: unknown key" in err and "preprocess.shape" in err


def test_dataset_items(phantom_dir, tmp_path, small_config):
    prepare_dataset(phantom_dir, tmp_path, small_config, progress=False)
    data = CachedCases(tmp_path)
    assert data.diseases == ["none", "glioblastoma", "pediatric_diffuse_glioma"]
    item = data[4]
    # The storage types travel through the data loader; training casts on the device.
    assert item["image"].shape == (4, 24, 24, 24) and item["image"].dtype == torch.float16
    assert item["labels"].dtype == torch.uint8 and int(item["disease"]) == 2
    full = read_case(tmp_path / "cases" / f"{item['case_id']}.safetensors")
    assert torch.equal(full["image"], item["image"].float()) and torch.equal(full["labels"], item["labels"].long())
    # By default every read goes to the file; with a bound, the first cases that fit stay in memory.
    assert data[0] is not data[0]
    case_bytes = item["image"].nbytes + item["labels"].nbytes
    bounded = CachedCases(tmp_path, memory_cache_gb=2.5 * case_bytes / 1e9)
    kept = [i for i in range(5) if bounded[i] is bounded[i]]
    assert kept == [0, 1]
    few = CachedCases(tmp_path, only_diseases=["pediatric_diffuse_glioma"], limit=1, diseases=data.diseases)
    assert len(few) == 1 and int(few[0]["disease"]) == 2
    with pytest.raises(DataError, match="not among the model's classes"):
        CachedCases(tmp_path, diseases=["none", "glioblastoma"])
