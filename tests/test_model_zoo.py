"""The bundle as a MONAI Model Zoo submission, checked the way the Zoo's CI checks one (Project-MONAI/model-zoo ``ci/``).

The Zoo's own scripts are not part of this repository; each check below does what its counterpart there does, on a
copy of the bundle in the Zoo's layout (``models/<bundle name>``):

* ``verify_bundle.py --mode min``: the necessary and preferred files, the version in the changelog, the metadata
  against MONAI's schema. CS3F has no ``models/model.pt`` (its network is a frozen pretrained backbone whose
  published checkpoint ``large_files.yml`` downloads) and no TorchScript export; a submission lists the bundle in
  ``exclude_verify_preferred_files_list`` and ``exclude_verify_torchscript_list``, and ``docs/README.md`` says so.
* ``ci/unit_tests``: ``check_workflow(ConfigWorkflow(..., workflow_type="infer"), check_properties=True)`` on a
  small cohort, from the bundle folder with the bundle on ``PYTHONPATH``, as the Zoo's tests run.
* ``runtests.sh --codeformat`` and the pre-commit ``pretty-format-json`` hook, with the Zoo's settings (kept in
  ``pyproject.toml`` and ``setup.cfg``).
* ``verify_net_in_out``, and the packages a Zoo CI on Python 3.10 installs from ``required_packages_version``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from helpers import INFERENCE, PHANTOM, ROOT, TINY_VIT_SETTINGS
from scripts.phantoms import make_phantom_cohort

BUNDLE = ROOT / "bundle"
BUNDLE_NAME = "cs3f_zero_shot_anomaly"
META = BUNDLE / "configs" / "metadata.json"
MONAI_SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"  # MONAI's own, not a re-authored copy
# the Model Zoo's verify_bundle.py
NECESSARY_FILES = ("configs/metadata.json", "LICENSE")
PREFERRED_FILES = ("models/model.pt", "configs/inference.json")


@pytest.fixture(scope="module")
def zoo_bundle(tmp_path_factory) -> Path:
    """The bundle copied into a Model Zoo checkout's layout, without what a run leaves in it."""
    models = tmp_path_factory.mktemp("model-zoo") / "models"
    target = models / BUNDLE_NAME
    shutil.copytree(BUNDLE, target, ignore=shutil.ignore_patterns("__pycache__", "models", "*.pyc"))
    return target


def _zoo_env(bundle: Path) -> dict[str, str]:
    """The Zoo's tests put the bundle folder on PYTHONPATH (ci/unit_tests/utils.py)."""
    return {**os.environ, "PYTHONPATH": str(bundle), "PYTHONUNBUFFERED": "1"}


def _monai_bundle(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=bundle,
        capture_output=True,
        text=True,
        env=_zoo_env(bundle),
        timeout=600,
    )


def test_verify_bundle_min_mode(zoo_bundle):
    """verify_bundle.py --mode min: files, version and changelog, metadata format."""
    for name in NECESSARY_FILES:
        assert (zoo_bundle / name).is_file(), f"necessary file {name} is not existing"
    docs = (zoo_bundle / "docs" / "README.md").read_text()
    missing = [name for name in PREFERRED_FILES if not (zoo_bundle / name).is_file()]
    assert missing == ["models/model.pt"]  # so the bundle goes in exclude_verify_preferred_files_list ...
    for exclusion in ("exclude_verify_preferred_files_list", "exclude_verify_torchscript_list"):
        assert exclusion in docs, f"docs/README.md must say that the bundle belongs in {exclusion}"  # ... and says so
    metadata = json.loads((zoo_bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"], "the version must have a changelog entry"
    assert next(iter(metadata["changelog"])) == metadata["version"], "the newest changelog entry comes first"
    assert (zoo_bundle / "docs" / "data_license.txt").is_file()


@pytest.mark.skipif(not MONAI_SCHEMA.is_file(), reason=f"MONAI's bundle metadata schema not present at {MONAI_SCHEMA}")
def test_metadata_verifies_against_monais_schema(zoo_bundle):
    assert json.loads(META.read_text())["schema"].endswith(MONAI_SCHEMA.name)
    result = _monai_bundle(
        zoo_bundle, "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(MONAI_SCHEMA)
    )
    assert result.returncode == 0 and "verified with no error" in result.stdout + result.stderr, result.stderr[-2000:]


def test_network_in_out_verify(zoo_bundle):
    result = _monai_bundle(
        zoo_bundle,
        "verify_net_in_out",
        "--net_id",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--backbone",
        "random",
        "--grid_size",
        "28",
        "--n",
        "2",
        "--device",
        "cpu",
    )
    assert result.returncode == 0 and "verified with no error" in result.stdout + result.stderr, result.stderr[-2000:]


ZOO_UNIT_TEST = """
import json, sys
from monai.bundle import ConfigWorkflow

def check_workflow(workflow, check_properties=False):  # the Model Zoo's ci/unit_tests/utils.py
    workflow.initialize()
    if check_properties is True:
        check_result = workflow.check_properties()
        if check_result is not None and len(check_result) > 0:
            raise ValueError(f"check properties for workflow failed: {check_result}")
    workflow.run()
    workflow.finalize()

override = json.loads(sys.argv[2])
workflow = ConfigWorkflow(workflow_type="infer", config_file=json.loads(sys.argv[1]),
                          logging_file="configs/logging.conf", meta_file="configs/metadata.json", **override)
check_workflow(workflow, check_properties=True)
print("checked properties:", json.dumps(sorted(workflow.properties)))
"""


@pytest.mark.parametrize("configs", [["inference.json"], ["inference.json", "evaluate.json"]])
def test_zoo_unit_test_checks_the_infer_workflow(zoo_bundle, tmp_path, configs):
    """``check_workflow(ConfigWorkflow(..., workflow_type="infer"), check_properties=True)``: every property of an
    inference workflow (dataset, evaluator, network_def, inferer, and the optional preprocessing, postprocessing
    and handlers with the IDs MONAI expects), then a whole run on a tiny cohort."""
    data = tmp_path / "cohort"
    make_phantom_cohort(data, n_subjects=3, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=2)
    override = {
        "bundle_root": str(zoo_bundle),
        "dataset_dir": str(data),
        "output_dir": str(tmp_path / "eval"),
        "progress": False,
        **PHANTOM,
        **TINY_VIT_SETTINGS,
    }
    result = subprocess.run(
        [sys.executable, "-c", ZOO_UNIT_TEST, json.dumps([f"configs/{c}" for c in configs]), json.dumps(override)],
        cwd=zoo_bundle,
        capture_output=True,
        text=True,
        env=_zoo_env(zoo_bundle),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checked = json.loads(result.stdout.split("checked properties:")[1].splitlines()[0])
    assert {"dataset", "evaluator", "inferer", "network_def", "preprocessing", "postprocessing", "handlers"} <= set(
        checked
    )
    assert (tmp_path / "eval" / "run.json").is_file() and (tmp_path / "eval" / "sub-01_anomaly.nii.gz").is_file()
    assert ("metrics.json" in os.listdir(tmp_path / "eval")) == ("evaluate.json" in configs)


def test_torchscript_export_is_not_supported_as_the_docs_say():
    """The docs put the bundle in exclude_verify_torchscript_list because the tokenizer cannot be scripted; if that
    ever changes, this test says it is time to drop the exclusion."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    parser.update({"bundle_root": str(BUNDLE), **TINY_VIT_SETTINGS})
    with pytest.raises(Exception):  # noqa: B017 (TorchScript raises several error types)
        torch.jit.script(parser.get_parsed_content("network_def"))


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_code_format_as_runtests_codeformat():
    """isort, black (--skip-magic-trailing-comma, 120 columns) and flake8 with the Zoo's plugins and settings."""
    for tool in (
        ("isort", "--check-only", "--diff", "."),
        ("black", "--check", "--diff", "."),
        ("flake8", ".", "--count"),
    ):
        result = _tool(*tool)
        assert result.returncode == 0, f"{tool[0]}:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"


def test_json_files_are_pretty_formatted_as_the_zoo_hook_wants():
    """pre-commit's pretty-format-json, as the Zoo configures it: --no-sort-keys --indent=4."""
    files = sorted(str(p) for p in (*BUNDLE.rglob("*.json"), *(ROOT / "configs").glob("*.json")))
    hook = shutil.which("pretty-format-json", path=os.path.dirname(sys.executable))
    assert hook, "pre-commit-hooks is not installed (make install)"
    result = subprocess.run([hook, "--no-sort-keys", "--indent=4", *files], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if found:
            pins[found.group(1).lower().replace("_", "-")] = found.group(2)
    return pins


def test_required_packages_are_the_bundles_imports_at_the_tested_versions():
    """``required_packages_version`` lists every third-party package the bundle's scripts import (scipy too), at
    the version requirements.txt installs and the tests run with: versions a Python 3.10 Zoo CI can install."""
    metadata = json.loads(META.read_text())
    required = {k.lower().replace("_", "-"): v for k, v in metadata["required_packages_version"].items()}
    own = {"monai", "torch", "numpy"}  # metadata has fields of their own for these
    modules = set()
    for path in (BUNDLE / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    distributions = packages_distributions()
    imported = {d.lower().replace("_", "-") for m in modules for d in distributions.get(m, [])}
    imported = {"itk" if d.startswith("itk-") else d for d in imported} - own  # itk comes as itk-core, itk-io, ...
    assert (
        imported - set(required) == set()
    ), f"imported but not in required_packages_version: {imported - set(required)}"
    pins = _pins()
    for name, version in required.items():
        assert pins.get(name) == version, f"{name}: metadata says {version}, requirements.txt installs {pins.get(name)}"
    assert metadata["monai_version"] == pins["monai"] and metadata["pytorch_version"] == pins["torch"]


def test_docs_follow_the_zoo_template():
    docs = (BUNDLE / "docs" / "README.md").read_text()
    for section in (
        "Model Overview",
        "Data",
        "Preprocessing",
        "Performance",
        "System Configuration",
        "Limitations",
        "Citation",
        "References",
        "License",
    ):
        assert re.search(rf"^#+ {section}\b", docs, re.MULTILINE), f"docs/README.md has no '{section}' section"
    assert "python -m monai.bundle run" in docs
