"""Threads on a shared machine (fuseseg.threads): the CPUs a process may use (affinity mask, cgroup
v1/v2 quota, SLURM allocation), the policy (load, CPUs, requested -> threads), the local
executor's share per job, the trainers re-deciding between epochs and the one collapse warning."""
from __future__ import annotations

import fusion_tiny
import pytest
import torch

from fuseseg import threads
from fuseseg.errors import ConfigError
from fuseseg.threads import (
    EpochPace,
    ThreadPolicy,
    cgroup_quota,
    cgroup_v1_cpus,
    cgroup_v2_cpus,
    collapse_warning,
    combine_limits,
    decide,
    runnable_others,
    slurm_cpus,
    threads_for_load,
)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    threads.reset()


def test_cgroup_files_parse_to_cpus():
    assert cgroup_v2_cpus("max 100000\n") is None
    assert cgroup_v2_cpus("150000 100000\n") == 1.5
    assert cgroup_v2_cpus("200000 50000") == 4.0
    assert cgroup_v2_cpus("") is None and cgroup_v2_cpus("x y") is None
    assert cgroup_v1_cpus("-1\n", "100000\n") is None
    assert cgroup_v1_cpus("250000\n", "100000\n") == 2.5
    assert cgroup_v1_cpus("oops", "100000") is None


def test_slurm_allocation_per_task_first():
    assert slurm_cpus({"SLURM_CPUS_PER_TASK": "3", "SLURM_CPUS_ON_NODE": "8"}) == 3
    assert slurm_cpus({"SLURM_CPUS_ON_NODE": "8"}) == 8
    assert slurm_cpus({"SLURM_CPUS_PER_TASK": "x", "SLURM_CPUS_ON_NODE": "6"}) == 6
    assert slurm_cpus({}) is None and slurm_cpus({"SLURM_CPUS_PER_TASK": "0"}) is None


def test_the_tightest_limit_wins_and_is_named():
    n, why = combine_limits(16, 4, 2.5, None)
    assert n == 2 and "machine 16" in why and "affinity mask 4" in why and "cgroup CPU quota 2" in why
    assert combine_limits(16, None, None, 6)[0] == 6
    assert combine_limits(16, 12, None, None) == (12, "12 usable CPUs (machine 16, affinity mask 12)")
    assert combine_limits(8, 8, 0.5, None)[0] == 1          # a half-CPU quota: one thread
    assert combine_limits(2, None, 3.0, 64)[0] == 2          # never more than the machine


def test_cgroup_quota_reads_the_process_cgroup_and_its_ancestors(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "a" / "cpu.max").write_text("300000 100000\n")   # the parent's quota binds
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path, "0::/a/b\n") == 3.0
    assert cgroup_quota(tmp_path, "0::/\n") is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "job").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1, "5:memory:/job\n4:cpu,cpuacct:/job\n") == 1.5
    assert cgroup_quota(tmp_path / "absent", "0::/a\n") is None


def test_usable_cpus_from_affinity_and_slurm(monkeypatch):
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 8)
    assert threads.usable_cpus({}, affinity=lambda pid: {0, 1, 2})[0] == 3
    assert threads.usable_cpus({"SLURM_CPUS_PER_TASK": "2"}, affinity=lambda pid: {0, 1, 2})[0] == 2
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 1.0)
    n, why = threads.usable_cpus({}, affinity=lambda pid: set(range(8)))
    assert n == 1 and "cgroup CPU quota 1" in why


@pytest.mark.parametrize("load, cpus, own, ceiling, expected", [
    (0.1, 2, 0, 2, 2),     # an idle machine: every CPU
    (1.0, 2, 1, 2, 2),     # our own one busy thread is not "others"
    (2.0, 2, 0, 2, 1),     # another process keeps both CPUs busy: one thread (not zero)
    (4.0, 2, 2, 2, 1),     # two processes with 2 threads each (measured 4.7 images/s each) -> 1
    (2.0, 2, 1, 2, 1),     # both at 1 thread: stays at 1 (44 images/s each)
    (5.2, 16, 4, 8, 8),    # 1.2 CPUs busy elsewhere of 16: the ceiling (the job's share)
    (0.6, 2, 0, 2, 1),     # 0.6 busy elsewhere: 1.4 free -> 1
    (0.4, 2, 0, 2, 2),     # 0.4 busy elsewhere: 1.6 free -> 2
    (11.7, 16, 0, 16, 4),  # 11.7 busy elsewhere: 4.3 free -> 4
])
def test_threads_for_load(load, cpus, own, ceiling, expected):
    assert threads_for_load(load, cpus, own, ceiling) == expected


def test_threads_running_now_count_before_the_load_average_notices():
    # another 2-thread training just started: the 1-minute load is still 0.3, 2 others run now
    assert threads_for_load(0.3, 2, 0, 2, running_others=2.0) == 1
    assert threads_for_load(0.3, 2, 0, 2, running_others=0.0) == 2
    assert threads_for_load(4.0, 2, 2, 2, running_others=0.0) == 1   # the load average still counts
    # /proc/loadavg's runnable count includes the reader: the median less one, never negative
    assert runnable_others([3, 1, 3, 9, 3]) == 2.0
    assert runnable_others([1, 1, 0]) == 0.0 and runnable_others([]) is None
    pol = decide(0, env={}, load1=0.2, running=2.0, cpus=(2, "2 usable CPUs"))
    assert pol.threads == 1 and "2 other threads running now" in pol.why


def test_decide_given_count_wins_then_omp_then_share_and_load():
    cpus = (4, "4 usable CPUs (machine 4)")
    pol = decide(3, env={"OMP_NUM_THREADS": "1"}, load1=9.0, cpus=cpus)
    assert (pol.threads, pol.adaptive) == (3, False) and "as given" in pol.why
    pol = decide(0, env={"OMP_NUM_THREADS": "2"}, load1=9.0, cpus=cpus)
    assert (pol.threads, pol.adaptive) == (2, False) and "OMP_NUM_THREADS" in pol.why
    pol = decide(None, jobs=2, env={}, load1=0.0, cpus=cpus)
    assert (pol.threads, pol.ceiling, pol.adaptive) == (2, 2, True) and "2 jobs at once: 2 each" in pol.why
    pol = decide(0, env={}, load1=3.5, cpus=cpus)   # 3.5 CPUs busy elsewhere: one thread, said why
    assert (pol.threads, pol.ceiling) == (1, 4) and "load average 3.5" in pol.why
    rec = pol.record()
    assert rec["threads"] == 1 and rec["usable_cpus"] == 4 and rec["load_average_1min"] == 3.5
    with pytest.raises(ConfigError, match="--threads / threads: -2"):
        decide(-2, env={}, cpus=cpus)


def test_negative_threads_in_a_config_is_refused_naming_the_key():
    from pipelines.experiment import ExperimentConfig

    with pytest.raises(ConfigError, match="threads=-1"):
        ExperimentConfig(threads=-1)


def test_readapt_follows_the_load_only_for_an_adaptive_policy(restore_threads):
    threads.apply(ThreadPolicy(2, 2, 2, True, "test"))
    assert torch.get_num_threads() == 2
    assert threads.readapt(load1=4.0, running=0.0) == 1 and torch.get_num_threads() == 1   # another 2-thread process
    assert threads.readapt(load1=1.0, running=0.0) == 2 and torch.get_num_threads() == 2   # it ended: back to 2
    threads.apply(ThreadPolicy(2, 2, 2, False, "given"))
    assert threads.readapt(load1=9.0) is None and torch.get_num_threads() == 2
    threads.reset()
    assert threads.readapt(load1=9.0) is None


def test_scoped_policy_restores_the_callers_threads(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    with threads.scoped(2) as pol:
        assert pol.threads == 2 and torch.get_num_threads() == 2 and threads.active() is pol
    assert torch.get_num_threads() == 1 and threads.active() is None


def test_collapse_warned_once_with_the_rate():
    said = []
    pace = EpochPace("segmentation training", say=said.append)
    for ep, rate in enumerate([60.0, 50.0, 21.0, 15.0, 4.7], start=1):
        pace.epoch_done(rate, ep, load1=4.1)
    assert len(said) == 1
    assert "15.0 images/s in epoch 4" in said[0] and "best 60.0 images/s" in said[0]
    assert "load average 4.1" in said[0] and "--threads 1" in said[0]
    assert collapse_warning("x", 20.0, 60.0, 1, None) is None   # exactly a third: no warning
    assert collapse_warning("x", 19.9, 60.0, 1, None) is not None


def test_local_executor_gives_each_job_a_share(monkeypatch, restore_threads):
    from pipelines.executor import ExecutorConfig, LocalExecutor

    monkeypatch.setattr(threads, "usable_cpus", lambda env=None, affinity=None: (5, "5 usable CPUs"))
    assert LocalExecutor(ExecutorConfig(kind="local", jobs=2))._threads() == (2, True)
    assert LocalExecutor(ExecutorConfig(kind="local", jobs=8))._threads() == (1, True)
    threads.apply(ThreadPolicy(3, 3, 5, False, "given"))   # --threads 3: each job 3, fixed
    assert LocalExecutor(ExecutorConfig(kind="local", jobs=2))._threads() == (3, False)


def test_job_process_takes_its_share(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads.enter_job(1, True)
    assert torch.get_num_threads() == 1 and threads.active().adaptive and threads.active().ceiling == 1
    # a SLURM job without cpus_per_job: its allocation, not the node's cores
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    monkeypatch.setattr(threads, "load_average", lambda: 0.0)
    torch.set_num_threads(2)
    threads.enter_job(None, False)
    assert torch.get_num_threads() == 1 and "SLURM allocation 1" in threads.active().why
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    threads.enter_job(1, True)   # OMP_NUM_THREADS wins
    assert torch.get_num_threads() == 2


def _spy_epochs(monkeypatch):
    """Records (what, images/s, epoch, threads the epoch ran with) per epoch; the machine is
    loaded by others (load 5 on 2 CPUs) until the first epoch ends, then idle."""
    calls, load = [], [5.0]
    orig = EpochPace.epoch_done

    def spy(self, rate, epoch, load1=None):
        calls.append((self.what, rate, epoch, torch.get_num_threads()))
        load[0] = 0.5
        return orig(self, rate, epoch, load1)

    monkeypatch.setattr(EpochPace, "epoch_done", spy)
    monkeypatch.setattr(threads, "load_average", lambda: load[0])
    monkeypatch.setattr(threads, "sample_runnable", lambda: [])
    return calls


def test_fusion_trainer_readapts_between_epochs(tmp_path, monkeypatch, restore_threads):
    from fusion.train import FusionTrainConfig, train_fusion

    fusion_tiny.make_pairs(tmp_path / "pairs", n=8, size=(40, 48))
    calls = _spy_epochs(monkeypatch)
    threads.apply(ThreadPolicy(2, 2, 2, True, "test"))
    cfg = FusionTrainConfig(method="tiny-trainable", plugins=["fusion_tiny"], data_root=str(tmp_path / "pairs"),
                            structure_epochs=1, epochs=2, batch_size=4, crop_size=32, workers=0, lr=1e-2,
                            seed=0, device="cpu", amp="off", log_every=1)
    train_fusion(cfg, tmp_path / "run", progress=False)
    assert [c[2] for c in calls] == ["structure 1", "fusion 1", "fusion 2"]
    assert calls[0][0] == "fusion training" and all(c[1] > 0 for c in calls)
    # loaded at the start: one thread (2 before it); idle after the first epoch: 2 again
    assert [c[3] for c in calls] == [1, 2, 2] and torch.get_num_threads() == 2


def test_segmentation_trainer_readapts_between_epochs(tmp_path, monkeypatch, restore_threads):
    from segmentation.config import SegConfig
    from segmentation.train import train_segmenter
    from tests.test_segmentation_train import make_scenes

    tr = make_scenes(tmp_path / "train", 4)
    calls = _spy_epochs(monkeypatch)
    threads.apply(ThreadPolicy(2, 2, 2, True, "test"))
    cfg = SegConfig(encoder="tu-mobilenetv3_small_050", decoder_channels=16, epochs=2, frozen_epochs=0,
                    batch_size=2, frozen_batch_size=2, crop_size=32, workers=0, device="cpu",
                    max_steps_per_epoch=1)
    train_segmenter(*tr, cfg, tmp_path / "out", progress=False)
    assert [(c[0], c[2]) for c in calls] == [("segmentation training", 1), ("segmentation training", 2)]
    assert [c[3] for c in calls] == [1, 2] and torch.get_num_threads() == 2
