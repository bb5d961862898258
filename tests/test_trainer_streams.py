"""Training data that cannot make progress stops the run with one line and exit status 1 (issue
28), never a hang: generated WebDataset shards all unreadable, mostly unreadable (above
--max-unreadable over --unreadable-window), a loader worker that stalls past --data-timeout, one
that dies (test doubles patched into the real `calrft train`). Each case is a child process
waited for with a timeout (killed by its pid past it). Plus the pieces: the monitor's window, the
one-line error through a DataLoader worker, and a worker's death held back to the next fetch."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from calrft import data, models, preempt
from calrft.config import TrainConfig

from test_trainer_webdataset import write_shards

pytestmark = pytest.mark.usefixtures("one_thread")

CHILD_TIMEOUT_S = 120   # startup (imports, the tiny model) plus the documented time of each case
ARGS = ["--model", models.TINY, "--pretrained", "", "--method", "flyp", "--templates", "short",
        "--batch-size", "4", "--warmup", "1", "--log-every", "1", "--no-progress", "--steps", "3"]
# the real command with one sample's decode replaced by a test double, in the loader worker
DOUBLE = """
import os, sys, time
from calrft import cli, data
def stall(*args):   # until the trainer stops it, or the trainer is gone (never an orphan)
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.1)
    os._exit(0)
real = data.WebDatasetCaptions._decode
def decode(self, sample):
    if sample.get("__key__") == os.environ["DOUBLE_KEY"]:
        if os.environ["DOUBLE"] == "stall":
            stall()
        os._exit(3)
    return real(self, sample)
data.WebDatasetCaptions._decode = decode
if os.environ["DOUBLE"] == "eval_stall":     # the evaluation loader's worker stalls instead
    data.eval_collate = stall
sys.exit(cli.main(sys.argv[1:]))
"""


def run(shards, out, *extra, script=None, env=None):
    """(exit status, the `calrft train` lines of stderr, seconds, stderr) of a child run."""
    argv = ["train", *ARGS, "--train-data", shards, "--out", str(out), *extra]
    cmd = [sys.executable, "-c", script, *argv] if script else [sys.executable, "-m", "calrft.cli", *argv]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        _, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)
        pytest.fail(f"calrft train did not stop within {CHILD_TIMEOUT_S} s (a hang)")
    lines = [line for line in err.splitlines() if line.startswith("calrft train")]
    return proc.returncode, lines, time.monotonic() - start, err


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_without_a_readable_sample_stop_after_one_pass(tmp_path, workers):
    keys = [f"{k:06d}" for k in range(5)]
    shards = write_shards(str(tmp_path / "bad"), n_shards=1, per_shard=5, corrupt=keys)
    code, lines, _, err = run(shards, tmp_path / "out", "--workers", str(workers))
    assert code == 1 and len(lines) == 1, err[-3000:]
    line = lines[0]
    assert line.startswith("calrft train: error: train data: no readable sample in a full pass over 1 "
                           f"shards ({tmp_path / 'bad' / 'shard-00000.tar'}): 5 unreadable; first: "), line
    assert "#000000" in line and "Traceback" not in line
    assert "the last checkpoint is step 0" in line     # nothing was trained; the state is saved


def test_mostly_unreadable_shards_stop_above_the_threshold(tmp_path):
    corrupt = [f"{k:06d}" for k in range(20) if k % 5]          # 16 of 20 unreadable
    shards = write_shards(str(tmp_path / "bad"), n_shards=4, per_shard=5, corrupt=corrupt)
    code, lines, _, err = run(shards, tmp_path / "out", "--workers", "0", "--max-unreadable", "0.5",
                              "--unreadable-window", "20")
    assert code == 1 and len(lines) == 1, err[-3000:]
    line = lines[0]
    # the first batch waited for the shuffle buffer (256 readable samples): 4 of 5 unreadable
    assert re.search(r"train data: (\d+) of the last (\d+) samples read were unreadable", line), line
    bad, read = map(int, re.search(r"(\d+) of the last (\d+) samples", line).groups())
    assert 0.75 < bad / read < 0.85 and read >= 20, line
    assert "more than --max-unreadable 0.5 over --unreadable-window 20" in line
    # the three shards with the most unreadable samples, with their counts
    named = re.findall(r"bad/shard-0000\d.tar \((\d+)\)", line)
    assert len(named) == 3 and ", ... (4 files); first: " in line, line
    # the same shards under a threshold they do not cross train to the end
    code, lines, _, err = run(shards, tmp_path / "out2", "--workers", "0", "--max-unreadable", "0.9")
    assert code == 0, err[-3000:]


def test_a_stalled_worker_stops_after_the_data_timeout(tmp_path):
    shards = write_shards(str(tmp_path / "s"), n_shards=2, per_shard=5, corrupt=())
    code, lines, seconds, err = run(shards, tmp_path / "out", "--workers", "1", "--data-timeout", "3",
                                    script=DOUBLE, env={"DOUBLE": "stall", "DOUBLE_KEY": "000002"})
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "train data: no batch from the data-loader workers in 3 s (--data-timeout): a worker " \
           "stalled" in lines[0], lines
    assert seconds < 60    # start-up (~5-15 s here) + 3 s, where the stall itself never ends


def test_a_stalled_evaluation_worker_stops_after_the_data_timeout(tmp_path):
    from test_trainer_data import make_tree
    shards = write_shards(str(tmp_path / "s"), n_shards=2, per_shard=5, corrupt=())
    make_tree(str(tmp_path / "val"), ["ant", "bee", "cat"], per_class=2)
    (tmp_path / "classes.txt").write_text("ant\nbee\ncat\n")
    code, lines, _, err = run(shards, tmp_path / "out", "--workers", "1", "--data-timeout", "3",
                              "--id-eval", str(tmp_path / "val"), "--classnames", str(tmp_path / "classes.txt"),
                              script=DOUBLE, env={"DOUBLE": "eval_stall", "DOUBLE_KEY": "none"})
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "evaluation data: no batch from the data-loader workers in 3 s (--data-timeout)" in lines[0]
    assert "the last checkpoint is step 3" in lines[0]   # written before the final evaluation


def test_a_dead_worker_stops_with_one_line(tmp_path):
    shards = write_shards(str(tmp_path / "s"), n_shards=2, per_shard=5, corrupt=())
    code, lines, _, err = run(shards, tmp_path / "out", "--workers", "1", script=DOUBLE,
                              env={"DOUBLE": "die", "DOUBLE_KEY": "000002"})
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert "train data: a data-loader worker died (DataLoader worker (pid" in lines[0], lines
    assert "exited unexpectedly" in lines[0] and "Traceback" not in lines[0]


# ---- the pieces ----

def _skipped(n, shard="a.tar"):
    return [data.Skipped(f"{shard}#{k}", "OSError: broken") for k in range(n)]


def test_the_monitor_counts_over_its_window():
    m = data.UnreadableMonitor(max_fraction=0.5, window=10)
    m.observe(0, _skipped(8))                    # 8 read: the window is not covered yet
    m.observe(10, [])                            # the last batches covering 10: this one alone
    m.observe(5, _skipped(4, "b.tar"))           # 4 of 9 over the last 9 (+ the 10 before: 4 of 19)
    m.observe(0, _skipped(1, "c.tar"))           # 5 of 10: not more than half
    with pytest.raises(data.DataStreamError, match=r"7 of the last 12 samples read were unreadable, more "
                       r"than --max-unreadable 0.5 over --unreadable-window 10 \(15 of 30 in all\); "
                       r"from b.tar \(4\), c.tar \(3\); first: b.tar#0: OSError: broken"):
        m.observe(0, _skipped(2, "c.tar"))          # 7 of 12 over the fewest batches covering 10
    never = data.UnreadableMonitor(max_fraction=1.0, window=4)
    never.observe(0, _skipped(50))
    assert never.total_unreadable == 50 and len(never.seen) == 50


def test_an_indexed_set_stops_on_a_run_of_unreadable_images(tmp_path):
    from test_trainer_data import _corrupt
    for name in ("a", "b"):
        _corrupt(str(tmp_path / "ant" / f"{name}.png"))
    ds = data.ImageFolderCaptions(str(tmp_path), None, "short")
    with pytest.raises(data.DataStreamError, match=rf"train data: {data.MAX_SUBSTITUTIONS} unreadable "
                       r"images in a row from .*a.png; first: UnidentifiedImageError"):
        ds[0]


def test_the_error_stays_one_line_through_a_worker():
    wrapped = ("Caught DataStreamError in DataLoader worker process 0.\nOriginal Traceback (most "
               "recent call last):\n  File \"x.py\", line 1, in f\ncalrft.data.DataStreamError: train "
               "data: the line\n")
    assert str(data.DataStreamError(wrapped)) == "train data: the line"
    assert data.loader_failure(RuntimeError("DataLoader timed out after 3 seconds"), 3) is not None
    assert data.loader_failure(RuntimeError("DataLoader worker (pid(s) 12) exited unexpectedly"), 3)
    assert data.loader_failure(RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed."), 3)
    assert data.loader_failure(RuntimeError("CUDA out of memory"), 3) is None
    assert data.loader_failure(ValueError("DataLoader timed out after 3 seconds"), 3) is None


class _DiesAtTwo(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            time.sleep(1)        # items 0 and 1 leave the worker's queue first
            os._exit(3)
        return torch.tensor([i])


def test_a_worker_death_is_held_back_to_the_next_fetch():
    """The DataLoader's SIGCHLD report of a dead worker raises at the next fetch (a step
    boundary), not in the middle of the step that runs meanwhile."""
    loader = torch.utils.data.DataLoader(_DiesAtTwo(), batch_size=1, num_workers=1, timeout=60,
                                         prefetch_factor=4)
    with preempt.StopSignals() as signals:
        batches = iter(loader)
        with signals.fetch():
            assert next(batches).item() == 0
        with signals.fetch():
            assert next(batches).item() == 1
        deadline = time.monotonic() + 30        # "the step": the worker dies during it
        while not signals._child_exited and time.monotonic() < deadline:
            time.sleep(0.05)
        assert signals._child_exited
        with pytest.raises(RuntimeError, match="DataLoader worker .* exited unexpectedly"):
            with signals.fetch():
                next(batches)
    del batches
    assert signal.getsignal(signal.SIGTERM) is not signals._handle     # handlers restored


@pytest.mark.parametrize("field,value,message", [
    ("data_timeout", -1, "data_timeout: must be >= 0"),
    ("data_timeout", float("inf"), "data_timeout: must be a finite number"),
    ("max_unreadable", 1.5, r"max_unreadable: must lie in \[0, 1\]"),
    ("unreadable_window", 0, "unreadable_window: must be >= 1")])
def test_the_stream_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(model=models.TINY, pretrained=None, device="cpu", **{field: value}).validate()
