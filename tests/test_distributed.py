"""torchrun with 2 CPU processes (gloo) must write exactly what a single-process run writes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np

from helpers import INFERENCE, PHANTOM, ROOT, TINY_VIT_SETTINGS
from scripts.outputs import subject_files
from scripts.phantoms import make_phantom_cohort


def bundle_args(config_files, data, out, tokenization):
    args = [
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr([str(f) for f in config_files]),
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--progress",
        "false",
        "--cache_dir",
        "''",
        "--tokenization",
        tokenization,
    ]
    for key, value in {**PHANTOM, **TINY_VIT_SETTINGS}.items():
        args += [f"--{key}", repr(value) if isinstance(value, dict) else str(value)]
    return args


def test_two_process_run_equals_single_process(tmp_path):
    data = tmp_path / "c"
    records = make_phantom_cohort(data, n_subjects=5, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    multi = ROOT / "bundle" / "configs" / "multi_gpu_inference.json"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    for tokenization in ("coarse", "coarse_to_fine"):
        single, double = tmp_path / f"single-{tokenization}", tmp_path / f"double-{tokenization}"
        one = subprocess.run(
            [sys.executable, *bundle_args([INFERENCE], data, single, tokenization)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert one.returncode == 0, one.stderr[-3000:]
        two = subprocess.run(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node",
                "2",
                *bundle_args([INFERENCE, multi], data, double, tokenization),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert two.returncode == 0, two.stderr[-3000:]
        assert json.loads((double / "run.json").read_text())["timings_s"]["processes"] == 2
        assert list(csv.DictReader(open(single / "scores.csv"))) == list(csv.DictReader(open(double / "scores.csv")))
        for rec in records:
            for key in ("anomaly", "anomaly_mask"):
                a = np.asanyarray(nib.load(subject_files(single, rec["subject"])[key]).dataobj)
                b = np.asanyarray(nib.load(subject_files(double, rec["subject"])[key]).dataobj)
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_each_rank_makes_its_own_gpu_the_current_device(monkeypatch):
    """The Model Zoo's multi-GPU pattern: under torchrun with NCCL, initialize joins the process group and makes this
    rank's GPU (LOCAL_RANK) the current device, on which the collectives run: rank 1 must not gather on GPU 0."""
    import torch
    import torch.distributed as dist
    from monai.bundle import ConfigParser

    current, groups = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(groups))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: groups.append(backend))
    monkeypatch.setenv("LOCAL_RANK", "1")
    parser = ConfigParser()
    parser.read_config([str(INFERENCE), str(ROOT / "bundle" / "configs" / "multi_gpu_inference.json")])
    for i in range(len(parser["initialize"])):
        parser.get_parsed_content(f"initialize#{i}")
    assert groups == ["nccl"] and current == [torch.device("cuda:1")]
    assert parser.get_parsed_content("device") == torch.device("cuda:1")
    assert parser["dataloader"]["sampler"] == "@sampler" and parser["sampler"]["_target_"] == "DistributedSampler"
