"""Preemption (issue 28): a real `calrft train` child on the tiny model gets SIGTERM or SIGUSR1
from the test, by the child's own pid (never a process group, never by name). It finishes the
step in progress, writes one checkpoint, prints one line and exits 75; resuming from that
checkpoint ends bit-identical to the straight run. On 2 gloo ranks, only rank 1 is signalled:
both ranks stop at the same step and rank 0 writes the one checkpoint. A second signal during
the save leaves a loadable checkpoint. Every child is waited for with a timeout and killed (by
its pid) if it outlives it, so a regression fails instead of hanging the suite."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from calrft import checkpoint, dist, models, preempt
from calrft.preempt import EXIT_PREEMPTED

from test_trainer_data import make_tree

STEPS = 60          # long enough that a signal sent at step 2 lands well before the end
WAIT_S = 180        # the longest a child may take for any one phase
ARGS = ["--model", models.TINY, "--pretrained", "", "--templates", "short", "--workers", "0",
        "--batch-size", "4", "--warmup", "2", "--ema-every", "3", "--log-every", "1", "--no-progress",
        "--lr", "1e-4", "--steps", str(STEPS), "--save-every", "1000"]
# the second-signal child: the real command, its checkpoint write paused half-way (after half
# the bytes are written) until the test has sent a second signal
PAUSED_SAVE = """
import io, os, sys, time
from calrft import checkpoint, cli
marker = os.environ["PAUSE_MARKER"]
def write(obj, f):
    if os.path.exists(marker + ".go"):
        return real(obj, f)
    buf = io.BytesIO()
    real(obj, buf)
    raw = buf.getvalue()
    f.write(raw[:len(raw) // 2]); f.flush()
    open(marker, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(marker + ".go") and time.monotonic() < deadline:
        time.sleep(0.01)
    f.write(raw[len(raw) // 2:])
real, checkpoint._write = checkpoint._write, write
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt") / "train"
    make_tree(str(root), ["ant", "bee", "cat"], per_class=4)
    return root


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def start(tree, out, *extra, env=None, script=None, tag="run"):
    """A `calrft train` child (stderr to a file beside `out`)."""
    argv = ["train", *ARGS, "--train-folder", str(tree), "--out", str(out), *extra]
    cmd = [sys.executable, "-c", script, *argv] if script else [sys.executable, "-m", "calrft.cli", *argv]
    err = open(f"{out}.{tag}.stderr", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env or _env())
    proc.stderr_path = err.name
    err.close()
    return proc


def finish(procs, timeout=WAIT_S):
    """Each child's exit status; a child still running after `timeout` is killed by its pid and
    the test fails."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a calrft train child did not exit within {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return codes


def stderr(proc):
    with open(proc.stderr_path) as f:
        return f.read()


def wait_for(condition, procs, what, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for p in procs:
            if p.poll() is not None:
                finish(procs)
                pytest.fail(f"the child exited ({p.returncode}) before {what}:\n{stderr(p)[-2000:]}")
        time.sleep(0.02)
    finish(procs, timeout=1)
    pytest.fail(f"no {what} within {timeout} s")


def logged_step(out):
    """The last step in rank 0's log.jsonl (0 if none yet)."""
    path = os.path.join(out, "log.jsonl")
    step = 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    step = max(step, json.loads(line).get("step", 0))
                except json.JSONDecodeError:   # a line being written
                    pass
    return step


def ranks_env(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                 RANK=str(r), LOCAL_RANK=str(r)) for r in range(world)]


def run_ranks(tree, out, world, *extra, tag="run"):
    if world == 1:
        return [start(tree, out, *extra, tag=tag)]
    return [start(tree, out, *extra, env=env, tag=f"{tag}{r}") for r, env in enumerate(ranks_env(world))]


def assert_same_state(got_path, want_path):
    """Everything a continued run depends on is bit-identical: weights, EMA teacher, optimiser
    moments, schedule, step, RNG."""
    got, want = (torch.load(p, weights_only=True) for p in (got_path, want_path))
    assert got["step"] == want["step"] == STEPS
    for key in ("state_dict", "teacher"):
        assert got[key].keys() == want[key].keys()
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), (key, name)
    for index, state in want["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["optimizer"]["state"][index][name], value), (index, name)
    assert got["scheduler"] == want["scheduler"]
    assert torch.equal(got["rng"]["torch"], want["rng"]["torch"])


@pytest.fixture(scope="module")
def straight(tree, tmp_path_factory):
    """The uninterrupted runs to STEPS, on 1 process and on 2 gloo ranks (started together)."""
    root = tmp_path_factory.mktemp("straight")
    procs = {world: run_ranks(tree, root / f"w{world}", world) for world in (1, 2)}
    for world, ps in procs.items():
        assert finish(ps) == [0] * world, [stderr(p)[-2000:] for p in ps]
    return {world: root / f"w{world}" / "checkpoint.pt" for world in (1, 2)}


def _stopped_at(out, err, signame):
    """The step the run stopped at: its one line says so and names the checkpoint, which holds
    that step, and nothing half-written is left beside it."""
    lines = [line for line in err.splitlines() if line.startswith("calrft train:")]
    ckpt = os.path.join(out, "checkpoint.pt")
    assert len(lines) == 1, err[-2000:]
    assert f"stopped by {signame} after step " in lines[0], lines
    assert f"rerun the same command with --resume {ckpt} to continue" in lines[0]
    assert f"(exit status {EXIT_PREEMPTED})" in lines[0]
    step = checkpoint.load(ckpt, what="resume")["step"]
    assert f"after step {step} of {STEPS}, saved;" in lines[0]
    assert 2 <= step < STEPS
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert records[-1] == {"step": step, "event": "preempted", "signal": signame}
    return step


@pytest.mark.parametrize("world", [1, 2])
def test_a_signal_stops_at_a_step_and_the_resume_equals_the_straight_run(tree, straight, tmp_path, world):
    out = tmp_path / "run"
    procs = run_ranks(tree, out, world, tag="first")
    wait_for(lambda: logged_step(out) >= 2, procs, "step 2")
    procs[-1].send_signal(signal.SIGTERM)        # rank 1 only, on 2 ranks: the ranks agree
    assert finish(procs) == [EXIT_PREEMPTED] * world
    step = _stopped_at(out, stderr(procs[0]), "SIGTERM")
    for p in procs[1:]:  # only the writer reports
        assert "calrft train:" not in stderr(p), stderr(p)[-2000:]
    procs = run_ranks(tree, out, world, "--resume", str(out / "checkpoint.pt"), tag="resume")
    assert finish(procs) == [0] * world, [stderr(p)[-2000:] for p in procs]
    assert_same_state(out / "checkpoint.pt", straight[world])
    steps = [r["step"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), step   # each step logged once across the stop


def test_a_second_signal_during_the_save_leaves_a_loadable_checkpoint(tree, straight, tmp_path):
    out = tmp_path / "run"
    marker = str(tmp_path / "saving")
    proc = start(tree, out, env=_env(PAUSE_MARKER=marker), script=PAUSED_SAVE, tag="first")
    wait_for(lambda: logged_step(out) >= 2, [proc], "step 2")
    proc.send_signal(signal.SIGUSR1)             # SLURM's early warning (--signal=USR1@...)
    wait_for(lambda: os.path.exists(marker), [proc], "the checkpoint write")
    assert [n for n in os.listdir(out) if n.endswith(".tmp")]   # half of it is on disk
    proc.send_signal(signal.SIGTERM)             # the cluster's SIGTERM, mid-write
    time.sleep(0.2)
    open(marker + ".go", "w").close()
    assert finish([proc]) == [EXIT_PREEMPTED]
    _stopped_at(out, stderr(proc), "SIGUSR1")
    proc = start(tree, out, "--resume", str(out / "checkpoint.pt"), tag="resume")
    assert finish([proc]) == [0], stderr(proc)[-2000:]
    assert_same_state(out / "checkpoint.pt", straight[1])


# ---- the pieces ----

def test_stop_signals_record_and_restore():
    before = signal.getsignal(signal.SIGUSR1)
    with preempt.StopSignals() as stop:
        assert stop.requested is None
        signal.raise_signal(signal.SIGUSR1)      # this process: recorded, not acted on
        signal.raise_signal(signal.SIGUSR1)
        assert (stop.requested, stop.count) == ("SIGUSR1", 2)
    assert signal.getsignal(signal.SIGUSR1) is before
    box = {}

    def in_a_thread():                           # no handlers outside the main thread
        with preempt.StopSignals() as s:
            box["active"] = s._active
    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join(timeout=30)
    assert box == {"active": False}


def _agree_worker(rank, world):
    import torch.distributed as tdist
    from calrft import dist
    out = {"gloo_is_world": dist.cpu_group() is tdist.group.WORLD,
           "agreed": dist.agree([15 if rank == 1 else 0, rank == 0, 0])}
    # a default group of another backend (NCCL on GPUs): one gloo group, made once, carries it
    real = tdist.get_backend
    tdist.get_backend = lambda group=None: "nccl"
    try:
        group = dist.cpu_group()
        out["separate"] = group is not tdist.group.WORLD and dist.cpu_group() is group
        out["agreed_separate"] = dist.agree([10 if rank == 0 else 0, 0, rank], group)
    finally:
        tdist.get_backend = real
    return out


def test_the_ranks_agree_in_one_cpu_all_reduce(tmp_path_factory):
    from _dist_util import spawn_with_retry
    got = spawn_with_retry(tmp_path_factory, _agree_worker, 2)
    for rank in (0, 1):
        assert got[rank] == {"gloo_is_world": True, "agreed": [15, 1, 0], "separate": True,
                             "agreed_separate": [10, 0, 1]}
    assert dist.agree([3, 0]) == [3, 0]           # one process: its own values, no collective


def _signalled_at(trainer, at_step):
    """The trainer's handler records SIGTERM as step `at_step` finishes (as a real signal would,
    without sending one to the test process)."""
    real = trainer.train_step

    def train_step(batch):
        terms = real(batch)
        if trainer.step == at_step:
            trainer.signals._handle(signal.SIGTERM, None)
        return terms
    trainer.train_step = train_step
    return trainer


@pytest.mark.parametrize("at_step", [2, 4])
def test_a_pending_signal_skips_the_evaluation_and_the_resume_does_the_final_one(tmp_path, at_step):
    """eval_every 2 of 4 steps: a signal during step 2 stops before step 2's evaluation; one
    during the last step stops before the final evaluation, which the resumed run does."""
    from calrft.train import Trainer
    from _trainer_util import CLASSES, tiny_config, tiny_data, tiny_model

    def trainer(**kw):
        model, tok = tiny_model()
        train, eval_sets = tiny_data()
        return Trainer(tiny_config(tmp_path, steps=4, eval_every=2, **kw), model=model, tokenizer=tok,
                       train_set=train, eval_sets=eval_sets, classnames=CLASSES)
    t = _signalled_at(trainer(), at_step)
    with pytest.raises(preempt.Preempted) as info:
        t.fit()
    assert (info.value.step, info.value.signame) == (at_step, "SIGTERM")
    assert info.value.path == str(tmp_path / "checkpoint.pt")
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records if "eval" in r] == [2] * (at_step > 2)   # none at the stop
    assert records[-1] == {"step": at_step, "event": "preempted", "signal": "SIGTERM"}
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == at_step
    result = trainer(resume=str(tmp_path / "checkpoint.pt")).fit()
    assert result is not None and result["id"]["acc"] is not None   # the final evaluation


def _data_error_worker(rank, world, root):
    import torch.distributed as tdist
    from calrft import data
    from calrft.train import Trainer
    from _trainer_util import CLASSES, tiny_config, tiny_data, tiny_model
    torch.set_num_threads(1)
    # a folder of this attempt's own (spawn_with_retry may start the ranks twice; a second attempt
    # in the first one's folder would be refused as a folder holding a run)
    name = [f"run-{os.getpid()}" if rank == 0 else None]
    tdist.broadcast_object_list(name, src=0)
    out = os.path.join(root, name[0])
    model, tok = tiny_model()
    train, _ = tiny_data()
    t = Trainer(tiny_config(out, steps=6), model=model, tokenizer=tok, train_set=train, classnames=CLASSES)
    real = t.next_batch

    def next_batch(batches):   # rank 1's stream fails before step 3
        batch, error = real(batches)
        if rank == 1 and t.step == 2:
            return None, data.DataStreamError("train data: rank 1's shards are gone")
        return batch, error
    t.next_batch = next_batch
    try:
        t.fit()
    except data.DataStreamError as exc:
        return str(exc), t.step, out
    return None, t.step, out


def test_a_rank_whose_data_fails_stops_every_rank_at_the_same_step(tmp_path, tmp_path_factory):
    from _dist_util import spawn_with_retry
    got = spawn_with_retry(tmp_path_factory, _data_error_worker, 2, str(tmp_path))
    out = got[0][2]
    assert got[1] == ("train data: rank 1's shards are gone", 2, out)
    assert got[0][1] == 2 and got[0][0].startswith("train data: another rank's data stream failed at step 2")
    assert checkpoint.load(os.path.join(out, "checkpoint.pt"))["step"] == 2   # rank 0 saved it
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert records[-1] == {"step": 2, "event": "data_error", "error": "another rank"}
