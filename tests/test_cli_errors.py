"""What a user sees when the file system or the config is wrong: one line naming the path or the key,
exit status 2, and nothing half-written (issue 23, item 7)."""

import errno

import nibabel as nib
import yaml

from diffusion_glioma.cli import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_an_output_folder_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "cohort"
    target.write_text("not a folder")
    assert main(["phantom", "--out", str(target), "--n-adult", "1", "--n-pediatric", "0", "--spacing", "6", "--quiet"]) == 2
    assert str(target) in _one_error_line(capsys)


def test_a_full_disk_names_the_file_and_leaves_no_partial_volume(tmp_path, capsys, monkeypatch):
    real_save = nib.save
    written = []

    def save_until_full(img, filename):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        written.append(filename)
        real_save(img, filename)

    monkeypatch.setattr(nib, "save", save_until_full)
    out = tmp_path / "cohort"
    assert main(["phantom", "--out", str(out), "--n-adult", "1", "--n-pediatric", "0", "--spacing", "6", "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and str(out) in line
    files = [p.name for p in out.rglob("*.nii.gz")]
    assert len(files) == 3 and not any(name.startswith(".") for name in files)  # the fourth is not half there


def test_an_unknown_preset_or_model_argument_is_refused_before_anything_is_written(tmp_path, capsys):
    for model, named in (({"preset": "huge"}, "huge"), ({"preset": "tiny", "overrides": {"chanels": 8}}, "chanels")):
        run = tmp_path / f"run_{named}"
        config = tmp_path / f"{named}.yaml"
        config.write_text(yaml.safe_dump({"output_dir": str(run), "data": {"cache": str(tmp_path / "cache")},
                                          "model": model}))
        assert main(["train", "--config", str(config)]) == 2
        line = _one_error_line(capsys)
        assert str(config) in line and named in line
        assert not run.exists()
