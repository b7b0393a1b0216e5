"""Fault injection, the reduced form of ``python -m experiments.bench.faults`` that CI runs:
SIGKILLs (one while an async save is in flight) with exact resume, SIGTERM to the entry point,
a NaN batch, a full disk (with and without the best-checkpoint hook), determinism, double
launches into one workdir, a lock left by ``kill -9``, and a resume with other run-defining
keys.

Kills and SIGTERM need subprocesses (``experiments.bench.faults`` children); the rest trains in
this process, against an in-process reference on the same two devices (the children's count).
A truncated newest checkpoint is tested in ``test_train.py`` (the fallback) and here, end to
end with the resumed run replacing it, as a ``slow`` test.
"""

import json
import random
import re

import jax
import pytest

from experiments.bench import faults
from fmjax import checkpoint, data, train
from fmjax.mesh import make_mesh

STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return faults.Setup(
        tmp_path_factory.mktemp("faults"), steps=STEPS, checkpoint_every=EVERY, devices=2
    )


def train_here(workdir, source=None, hooks=()):
    """The children's run (``faults.child_config``, ``faults.model_of``), in this process on
    two devices."""
    config = faults.child_config("mlp", STEPS, EVERY, keep=1000)
    source = source or data.digits(seed=config.seed)
    mesh = make_mesh(jax.devices()[:2])
    return train.train_and_evaluate(
        config, workdir, model=faults.model_of(config), source=source, hooks=hooks, mesh=mesh
    )


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run, every checkpoint kept."""
    workdir = setup.workdir / "reference"
    train_here(workdir)
    return workdir


def assert_rows(rows):
    assert all(row.ok for row in rows), "\n" + faults.table(rows)


def test_sigkills_during_a_save_and_at_a_step_resume_exactly(setup, reference):
    rows = faults.kills(setup, reference, count=2, rng=random.Random(0))
    assert_rows(rows)
    assert rows[0].injection.startswith("SIGKILL 1 during an async save")
    assert rows[1].injection.startswith("SIGKILL 2 at a random step")
    assert "state bit-identical, metrics identical" in rows[-1].observed


@pytest.mark.slow
def test_five_sigkills_resume_exactly(setup, reference):
    assert_rows(faults.kills(setup, reference, count=5, rng=random.Random(1)))


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_replaced_after_the_fallback(setup, reference):
    assert_rows(faults.corrupted_checkpoint(setup, reference))


# ~50 s of subprocesses; CI keeps under 25 minutes with it marked. SIGTERM itself stays
# covered by default in tests/test_train.py (checkpoint, return, handler restored).
@pytest.mark.slow
def test_sigterm_to_the_entry_point_checkpoints_exits_0_and_resumes(setup):
    assert_rows(faults.sigterm_entry_point(setup))


def test_the_same_config_and_seed_give_the_same_metrics_and_state(setup, reference):
    again = setup.workdir / "again"
    train_here(again)
    assert faults.metrics_without_timing(again) == faults.metrics_without_timing(reference)
    assert len(faults.metrics_without_timing(again)) == STEPS
    assert faults.identical(faults.load_state(again)[0], faults.load_state(reference)[0])


def test_a_nan_batch_names_its_step_and_leaves_the_last_checkpoint_untouched(setup, reference):
    workdir = setup.workdir / "nan"
    source = faults.PoisonedSource(EVERY + 2, data.digits(seed=0))
    with pytest.raises(FloatingPointError, match=f"Non-finite loss at step {EVERY + 2}"):
        train_here(workdir, source=source)
    state, step = faults.load_state(workdir)
    assert step == EVERY and faults.complete_steps(workdir) == [EVERY]
    assert faults.identical(state, faults.load_state(reference, EVERY)[0])
    assert faults.logged_steps(workdir) == list(range(1, EVERY + 2))


@pytest.fixture
def tmpfs(tmp_path):
    reason = faults.mount_tmpfs(tmp_path / "disk", "16m")
    if reason is not None:
        pytest.skip(f"needs a small tmpfs to fill: {reason}")
    yield tmp_path / "disk"
    faults.unmount(tmp_path / "disk")


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmpfs, reference):
    workdir = tmpfs / "run"
    # Filled at the last step, after its metrics line and before its checkpoint.
    fill = train.EvalHook(
        every=STEPS, fn=lambda step, state: faults.fill_disk(workdir, step, EVERY)
    )
    message = (
        f"The checkpoint at step {STEPS} could not be written to {workdir}/checkpoints: the "
        r"disk is full \(\d+(\.\d)? k?B free\). The complete checkpoints to resume from are "
        rf"intact: steps \[{EVERY}, {2 * EVERY}\] in {workdir}/checkpoints\."
    )
    with pytest.raises(checkpoint.CheckpointWriteError, match=message):
        train_here(workdir, hooks=[fill])
    state, step = faults.load_state(workdir)
    assert step == STEPS - EVERY
    assert faults.identical(state, faults.load_state(reference, step)[0])
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))


def test_a_full_disk_mid_run_fails_clearly_with_whole_metric_lines(tmpfs, reference):
    workdir = tmpfs / "run"
    fill_at = EVERY + 1
    fill = train.EvalHook(
        every=fill_at, fn=lambda step, state: faults.fill_disk(workdir, step, EVERY)
    )
    # On tmpfs an append that fits in an allocated page still succeeds: which write fails
    # first (metrics.jsonl, TensorBoard, a checkpoint) depends on where pages end.
    with pytest.raises(OSError, match=re.escape(str(workdir)) + r".*disk") as error:
        train_here(workdir, hooks=[fill])
    assert "full" in str(error.value)
    logged = faults.logged_steps(workdir)
    assert logged == list(range(1, logged[-1] + 1)) and logged[-1] >= fill_at
    assert (workdir / "metrics.jsonl").read_bytes().endswith(b"\n")
    state, step = faults.load_state(workdir)
    assert step >= EVERY and faults.identical(state, faults.load_state(reference, step)[0])


def test_a_full_disk_during_the_best_checkpoint_save_names_the_resumable_steps(setup, tmpfs):
    workdir = tmpfs / "run"
    fill = train.EvalHook(
        every=2 * EVERY, fn=lambda step, state: faults.fill_disk(workdir, step, EVERY)
    )
    message = (
        f"The checkpoint at step {2 * EVERY} could not be written to {workdir}/checkpoints_best: "
        r"the disk is full .*The complete checkpoints to resume from are intact: steps "
        rf"\[{EVERY}\] in {workdir}/checkpoints\."
    )
    with pytest.raises(checkpoint.CheckpointWriteError, match=message):
        train_here(workdir, hooks=[fill, faults.best_hook(EVERY)])
    assert not (workdir / "config.json.tmp").exists()


def test_a_staggered_double_launch_refuses_the_second_run(setup, reference):
    rows = faults.double_launch(setup, reference, staggered=True)
    assert_rows(rows)
    assert "refused: run [2]" in rows[0].observed


@pytest.mark.slow
def test_a_simultaneous_double_launch_leaves_one_run_bit_identical(setup, reference):
    assert_rows(faults.double_launch(setup, reference, staggered=False))


def test_a_lock_left_by_kill_9_is_recovered_and_the_run_resumes_exactly(setup, reference):
    assert_rows(faults.stale_lock(setup, reference))


def test_a_resume_with_other_run_defining_keys_is_refused_untouched(setup, reference):
    assert_rows(faults.changed_run(setup, reference))
