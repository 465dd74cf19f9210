"""The reference bank: one study scored at once against stored reference tokens, independently of the others."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from helpers import INFERENCE, PHANTOM, ROOT, TINY_VIT_SETTINGS, run_bundle
from scripts.bank import BankError, BankMismatchError, ReferenceBank
from scripts.outputs import subject_files
from scripts.phantoms import make_phantom_cohort

BUILD_BANK = ROOT / "bundle" / "configs" / "build_bank.json"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    return make_phantom_cohort(
        tmp_path_factory.mktemp("cohort"), n_subjects=6, shape=(40, 48, 40), spacing=3.5, n_lesion_free=2, seed=4
    )


def _folder(records: list[dict], ids: list[str], folder: Path) -> Path:
    """A dataset folder holding the given subjects (links: inputs are never modified)."""
    for r in records:
        if r["subject"] in ids:
            (folder / r["subject"]).mkdir(parents=True, exist_ok=True)
            for key in ("image", "mask"):
                os.symlink(r[key], folder / r["subject"] / Path(r[key]).name)
    return folder


def _parser(config_files: list[Path], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(
        {
            "bundle_root": str(ROOT / "bundle"),
            "progress": False,
            "write_overview": False,
            "cache_dir": "",
            **PHANTOM,
            **TINY_VIT_SETTINGS,
            **overrides,
        }
    )
    return parser


def _build(data: Path, bank: Path) -> tuple[ReferenceBank, list[str]]:
    """Build (or grow) the bank; returns it and the ids the encoder encoded."""
    parser = _parser([INFERENCE, BUILD_BANK], dataset_dir=str(data), reference_bank=str(bank))
    built = parser.get_parsed_content("bank_builder").run()
    return built, [e.subject["subject"] for e in parser.get_parsed_content("encoder").encoded]


def _score(data: Path, bank: Path | None, out: Path):
    parser = _parser(
        [INFERENCE], dataset_dir=str(data), output_dir=str(out), reference_bank=str(bank) if bank else None
    )
    evaluator = parser.get_parsed_content("evaluator")
    return evaluator.run(), evaluator


def test_one_study_is_scored_against_the_bank_independently_of_the_others(records, tmp_path):
    ids = [r["subject"] for r in records]
    bank_file = tmp_path / "models" / "bank.pt"
    bank, encoded = _build(_folder(records, ids[:4], tmp_path / "references"), bank_file)
    assert bank.subjects == ids[:4] and sorted(encoded) == ids[:4] and bank_file.is_file()
    assert ReferenceBank.load(bank_file).subjects == ids[:4]  # a plain tensor file: torch.load(weights_only=True)

    alone, _ = _score(_folder(records, ids[4:5], tmp_path / "alone"), bank_file, tmp_path / "out_alone")
    together, evaluator = _score(_folder(records, ids[4:], tmp_path / "together"), bank_file, tmp_path / "out_together")
    assert alone.problems == [] and [r["subject"] for r in alone.subjects] == ids[4:5]  # one study is enough
    statistics = ReferenceBank.load(bank_file).statistics_for(evaluator.inferer, evaluator.network, evaluator.threshold)
    assert alone.threshold == together.threshold == statistics["threshold"]  # the bank's, not the run's
    for key in ("anomaly", "anomaly_mask"):
        a = nib.load(subject_files(tmp_path / "out_alone", ids[4])[key]).get_fdata()
        b = nib.load(subject_files(tmp_path / "out_together", ids[4])[key]).get_fdata()
        np.testing.assert_array_equal(a, b)  # the other study of the folder changes nothing
    run = json.loads((tmp_path / "out_alone" / "run.json").read_text())
    assert run["reference_bank"]["subjects"] == ids[:4] and run["reference_bank"]["path"] == str(bank_file)

    moved = shutil.copy(bank_file, tmp_path / "elsewhere.pt")  # a bank is what it holds, wherever it lies
    again, _ = _score(tmp_path / "alone", moved, tmp_path / "out_moved")
    assert again.problems == [] and again.threshold == alone.threshold


def test_bank_scores_equal_the_cohort_scores_against_the_same_references(records, tmp_path):
    """Scoring a study against a bank of the other subjects gives its cohort-mode token scores (the threshold is
    the only difference: the bank's reference statistics instead of the whole cohort's)."""
    ids = [r["subject"] for r in records[:4]]
    _build(_folder(records, ids[1:], tmp_path / "references"), tmp_path / "bank.pt")
    _, banked = _score(_folder(records, ids[:1], tmp_path / "query"), tmp_path / "bank.pt", tmp_path / "out_bank")
    _, cohort = _score(_folder(records, ids, tmp_path / "cohort"), None, tmp_path / "out_cohort")
    torch.testing.assert_close(banked.scores[0], cohort.scores[0], equal_nan=True)


def test_banks_grow_and_encode_only_new_subjects(records, tmp_path):
    ids = [r["subject"] for r in records]
    bank_file = tmp_path / "bank.pt"
    _build(_folder(records, ids[:3], tmp_path / "first"), bank_file)
    grown, encoded = _build(_folder(records, ids[2:5], tmp_path / "more"), bank_file)
    assert sorted(encoded) == ids[3:5], "a subject already in the bank with the same files was encoded again"
    assert grown.subjects == ids[:5] and len(ReferenceBank.load(bank_file)) == 5


def test_a_bank_of_other_settings_is_refused_with_the_settings_that_differ(records, tmp_path):
    ids = [r["subject"] for r in records]
    bank_file = tmp_path / "bank.pt"
    _build(_folder(records, ids[:3], tmp_path / "references"), bank_file)
    query = _folder(records, ids[3:4], tmp_path / "query")
    parser = _parser(
        [INFERENCE],
        dataset_dir=str(query),
        output_dir=str(tmp_path / "out"),
        reference_bank=str(bank_file),
        proj_dim=12,
    )
    evaluator = parser.get_parsed_content("evaluator")
    with pytest.raises(BankMismatchError, match=r"proj_dim: bank 16, this run 12"):
        evaluator.run()
    assert not list((tmp_path / "out").glob("*.nii.gz")), "refused before anything was written"
    # as a user sees it: one line, exit status 2
    result = run_bundle(
        tmp_path,
        dataset_dir=query,
        output_dir=tmp_path / "out_cli",
        reference_bank=bank_file,
        cache_dir="''",
        **PHANTOM,
        **{**TINY_VIT_SETTINGS, "grid_size": 48},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cs3f: error: reference bank" in result.stderr and "grid_size: bank 32, this run 48" in result.stderr


def test_a_bank_needs_two_subjects_and_says_so_before_encoding(records, tmp_path):
    one = _folder(records, [records[0]["subject"]], tmp_path / "one")
    parser = _parser([INFERENCE, BUILD_BANK], dataset_dir=str(one), reference_bank=str(tmp_path / "bank.pt"))
    builder = parser.get_parsed_content("bank_builder")
    with pytest.raises(BankError, match=r"1 subject\(s\) found in .* a reference bank needs at least 2 subjects"):
        builder.run()
    assert not builder.encoder.encoded and not (tmp_path / "bank.pt").exists()
