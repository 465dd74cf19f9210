"""`python -m monai.bundle run` as a user types it: each common mistake is one line and exit status 2, before
any work and with nothing written; a good run ends with a summary and no progress bars when asked."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import PHANTOM, TINY_VIT_SETTINGS, run_bundle
from scripts.command_line import EXIT_USER_ERROR, SettingsError, check_overrides, command_line_overrides, user_message
from scripts.phantoms import make_phantom_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    make_phantom_cohort(folder, n_subjects=4, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=3)
    return folder


MISTAKES = [
    ({"matchng": "global"}, "unknown setting --matchng; did you mean --matching?"),
    ({"grid_size": "abc"}, "--grid_size must be a number (default 224), got 'abc'"),
    ({"overwrite": "flase"}, "--overwrite must be true or false, got 'flase'"),
    ({"grid_size": "36"}, "--grid_size 36: must be a multiple of slice_depth 8 (the depth of a token), e.g. 32 or 40"),
    ({"dataset_dir": "/no/such/folder"}, "dataset_dir '/no/such/folder' is not a folder"),
    ({"image_pattern": "{id}/{id}_t1.nii.gz"}, "0 subject(s) found in"),
    (
        {"weights_path": "/no/such/weights.pth", "backbone": "dinov2_vits14"},
        "weights_path '/no/such/weights.pth' for backbone",
    ),
]
if not torch.cuda.is_available():
    MISTAKES.append(({"device": "cuda"}, "--device cuda: no CUDA GPU is available on this machine; use --device cpu"))


@pytest.mark.parametrize("mistake,message", MISTAKES, ids=[next(iter(m)) for m, _ in MISTAKES])
def test_a_mistake_is_one_line_and_exit_status_2(cohort, tmp_path, mistake, message):
    out = tmp_path / "out"
    settings = {"dataset_dir": cohort, "output_dir": out, **PHANTOM, **TINY_VIT_SETTINGS, **mistake}
    result = run_bundle(tmp_path, **settings)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("cs3f: error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()  # refused before anything was written


def test_fewer_than_three_subjects_are_refused_before_encoding(cohort, tmp_path):
    data = tmp_path / "two"
    data.mkdir()
    for sid in ("sub-01", "sub-02"):
        os.symlink(cohort / sid, data / sid)
    result = run_bundle(
        tmp_path,
        dataset_dir=data,
        output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        **PHANTOM,
        **TINY_VIT_SETTINGS,
    )
    assert result.returncode == EXIT_USER_ERROR
    assert "cs3f: error: 2 subject(s) found in" in result.stderr and "needs at least 3" in result.stderr
    assert "encoding" not in result.stderr and not (tmp_path / "cache").exists()


def test_a_good_run_ends_with_a_summary_and_draws_no_progress_bars(cohort, tmp_path):
    out = tmp_path / "out"
    result = run_bundle(tmp_path, dataset_dir=cohort, output_dir=out, progress="false", **PHANTOM, **TINY_VIT_SETTINGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "it/s]" not in result.stderr and "%|" not in result.stderr
    summary = result.stdout[result.stdout.index("CS3F: ") :]
    assert "4 subject(s) scored, 0 skipped" in summary and f"results in {out}" in summary
    assert "backbone: random" in summary and "threshold" in summary and "most anomalous" in summary
    assert sum(line.startswith("    sub-0") for line in summary.splitlines()) == 4

    # the cohort report: every subject, most anomalous first, its figure on the cohort's one colour scale
    page = (out / "report.html").read_text()
    run = json.loads((out / "run.json").read_text())
    ranked = sorted(run["results"], key=lambda s: -run["results"][s]["row"]["subject_score"])
    assert [page.index(f"<td>{s}<br>") for s in ranked] == sorted(page.index(f"<td>{s}<br>") for s in ranked)
    assert all(f'src="{s}_overview.png"' in page for s in ranked)
    assert f"Operating threshold <b>{run['threshold']['score']:.4g}</b>" in page and "one colour scale" in page


def test_overrides_are_read_as_monai_bundle_run_reads_them():
    argv = ["--config_file", "['a.json','b.json']", "--grid_size", "112", "--overwrite", "false", "--amp", "--x=1"]
    parsed = command_line_overrides(argv)
    assert parsed == {"config_file": ["a.json", "b.json"], "grid_size": 112, "overwrite": "false", "amp": True, "x": 1}
    config = {"grid_size": 224, "overwrite": False, "network_def": {}, "spacing": 1.0}
    check_overrides(config, {"grid_size": 112, "overwrite": "false", "network_def#proj_dim": 8, "spacing": [1, 1, 2]})
    with pytest.raises(SettingsError, match="unknown setting --network; did you mean --network_def"):
        check_overrides(config, {"network": 1})


def test_internal_errors_keep_their_traceback():
    assert user_message(RuntimeError("a bug")) is None
    try:
        raise KeyError("x")
    except KeyError as err:
        assert user_message(RuntimeError("failed to instantiate")) is None and user_message(err) is None
    wrapped = RuntimeError("Failed to evaluate ConfigExpression")
    wrapped.__cause__ = SettingsError("unknown setting --matchng")
    assert user_message(wrapped) == "unknown setting --matchng"
