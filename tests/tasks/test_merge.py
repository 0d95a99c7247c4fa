"""python -m diffseg.tasks.merge on run dirs it cannot use: one error line, exit 2."""

from __future__ import annotations

from diffseg.tasks.merge import main


def test_a_run_dir_of_an_older_version_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "config_resolved.yaml").write_text("resolution: 512\ndataset:\n  name: voc\n")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "older diffseg" in err[0]


def test_not_a_run_dir(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
