"""Which GPU a job takes (slidesnake.devices), tested without a GPU: the environment and the GPU
count are given, and the slots are real flock()s held by real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from slidesnake.devices import choose_device, claim_gpu, release_all, visible_gpus

CLAIM = ("import sys; from slidesnake.devices import choose_device; "
         "print(choose_device(sys.argv[1], cuda_available=True, n_physical=int(sys.argv[2])), flush=True); "
         "sys.stdin.read()")


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({}, 4) == ["0", "1", "2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}, 8) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}, 8) == ["GPU-aa", "GPU-bb"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, 8) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,3"}, 8) == ["1"]  # CUDA stops at an invalid id


def test_explicit_and_cpu_requests_are_taken_as_given(tmp_path):
    env = {"SLIDESNAKE_GPU_LOCK_DIR": str(tmp_path)}
    assert choose_device("auto", cuda_available=False, n_physical=0, env=env) == "cpu"
    assert choose_device("cpu", cuda_available=True, n_physical=4, env=env) == "cpu"
    assert choose_device("cuda:3", cuda_available=True, n_physical=4, env=env) == "cuda:3"
    assert not list(tmp_path.iterdir())  # no slot claimed


def test_one_visible_gpu_is_cuda_0_as_slurm_gives_it(tmp_path):
    # a SLURM job with --gpus=1 sees its GPU (whatever its number on the node) as cuda:0
    env = {"SLIDESNAKE_GPU_LOCK_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": "6", "SLURM_JOB_GPUS": "6"}
    for _ in range(3):
        assert choose_device("auto", cuda_available=True, n_physical=8, env=env) == "cuda:0"
    assert not list(tmp_path.iterdir())


def _claimers(n: int, tmp_path, visible: str | None, physical: int = 4):
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts"), "SLIDESNAKE_GPU_LOCK_DIR": str(tmp_path)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    procs, devices = [], []
    for _ in range(n):
        p = subprocess.Popen([sys.executable, "-c", CLAIM, "auto", str(physical)], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        devices.append(p.stdout.readline().strip())  # claimed (and still held) before the next starts
        procs.append(p)
    return procs, devices


def _finish(procs):
    for p in procs:
        p.communicate("", timeout=30)


def test_concurrent_jobs_on_a_multi_gpu_workstation_get_distinct_gpus(tmp_path):
    procs, devices = _claimers(4, tmp_path, visible=None, physical=4)
    try:
        assert sorted(devices) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    finally:
        _finish(procs)
    # the slots are free again once the jobs have exited: the next job gets cuda:0
    procs, devices = _claimers(1, tmp_path, visible=None, physical=4)
    _finish(procs)
    assert devices == ["cuda:0"]


def test_a_freed_slot_is_taken_by_the_next_job(tmp_path):
    procs, devices = _claimers(3, tmp_path, visible="0,1,2")
    try:
        assert devices == ["cuda:0", "cuda:1", "cuda:2"]
        procs[1].communicate("", timeout=30)  # the job on cuda:1 ends
        more, again = _claimers(1, tmp_path, visible="0,1,2")
        assert again == ["cuda:1"]
        _finish(more)
    finally:
        _finish([p for i, p in enumerate(procs) if i != 1])


def test_jobs_seeing_different_gpus_do_not_share_slots(tmp_path):
    # two SLURM jobs on one node, each given two GPUs: each uses its own cuda:0 and cuda:1
    a, da = _claimers(2, tmp_path, visible="0,1")
    b, db = _claimers(2, tmp_path, visible="2,3")
    _finish(a + b)
    assert sorted(da) == sorted(db) == ["cuda:0", "cuda:1"]


def test_same_process_keeps_its_slot_and_all_taken_without_wait_raises(tmp_path):
    env = {"SLIDESNAKE_GPU_LOCK_DIR": str(tmp_path)}
    try:
        assert claim_gpu(["0", "1"], env) == 0
        assert claim_gpu(["0", "1"], env) == 0  # e.g. tuning: many trainings in one job
        procs, devices = _claimers(1, tmp_path, visible="0,1", physical=2)
        assert devices == ["cuda:1"]
        with pytest.raises(BlockingIOError, match="GPU slots"):
            # a second process would wait; here: this process asks for a fresh slot of a full set
            release_all()
            procs2, _ = _claimers(1, tmp_path, visible="0,1", physical=2)  # takes 0 back
            claim_gpu(["0", "1"], env, wait=False)
        _finish(procs + procs2)
    finally:
        release_all()
