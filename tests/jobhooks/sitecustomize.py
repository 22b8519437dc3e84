"""Test-only start-up hook of the jobs of tests/test_executor.py (never on a user's path).

The SLURM tests put this folder on the jobs' PYTHONPATH; Python imports ``sitecustomize`` at
start-up, and when ``FUSESEG_TEST_HOLD`` is set this installs :func:`executor_jobs.hold_segment_trainer`:
the segmentation trainer of one stage folder stops after writing the checkpoint of a given epoch
and waits there while a file exists, so a test cancels it at a known point instead of racing it.
"""
import os

if os.environ.get("FUSESEG_TEST_HOLD"):
    import executor_jobs

    executor_jobs.hold_segment_trainer(os.environ["FUSESEG_TEST_HOLD"])
