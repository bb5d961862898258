"""Units behind the run-safety rules (issue 15): the progress display, the out-folder policy, the
log truncation of a resumed run, the report of unreadable images and rank-deficient sigma_min."""
import io
import json

import pytest

from calrft import report, rundir
from calrft.progress import Progress


def test_progress_prints_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = Progress(5, "carot", every=2, stream=stream)  # StringIO is not a terminal
    for k in range(5):
        bar.update(loss=f"{k:.1f}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split()[:3] for line in lines] == [["carot", "step", "2/5"], ["carot", "step", "4/5"],
                                                    ["carot", "step", "5/5"]]
    assert "loss 3.0" in lines[1] and "eta" in lines[1]


def test_progress_bar_redraws_at_most_once_per_step():
    bar = Progress(6, "flyp", stream=io.StringIO(), terminal=True, initial=1)
    bar._bar.mininterval = bar._bar.miniters = 0  # redraw whenever asked
    draws = []
    real = bar._bar.refresh
    bar._bar.refresh = lambda *a, **k: (draws.append(1), real(*a, **k))[1]
    for _ in range(5):
        bar.update(loss="1.0", lr="1e-5")
    assert len(draws) == 5
    bar.close()


def test_progress_disabled_writes_nothing():
    stream = io.StringIO()
    bar = Progress(3, "x", enabled=False, stream=stream, every=1)
    for _ in range(3):
        bar.update()
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="every"):
        Progress(3, "x", every=0)


def test_prepare_policy(tmp_path):
    out = tmp_path / "o"
    rundir.prepare(out, "train")  # a new folder
    (out / "results.json").write_text("{}")
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="already holds a run \\(results.json\\)"):
        rundir.prepare(out, "eval")
    rundir.prepare(out, "train", resume=True)
    assert (out / "results.json").exists()
    rundir.prepare(out, "eval", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    rundir.prepare(out, "train")  # other files alone do not make a run
    with pytest.raises(ValueError, match="exclude each other"):
        rundir.prepare(out, "train", resume=True, overwrite=True)


def test_demo_policy_looks_into_method_and_seed_folders(tmp_path):
    (tmp_path / "seed1" / "carot").mkdir(parents=True)
    (tmp_path / "seed1" / "carot" / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "results.json").write_text("user file in another folder")
    with pytest.raises(ValueError, match="seed1/carot/checkpoint.pt"):
        rundir.prepare(tmp_path, "demo")
    rundir.prepare(tmp_path, "demo", overwrite=True)
    assert not (tmp_path / "seed1" / "carot" / "checkpoint.pt").exists()
    assert (tmp_path / "data" / "results.json").exists()


def test_truncate_log(tmp_path):
    path = tmp_path / "log.jsonl"
    records = [{"step": s, "loss": 1.0} for s in (1, 2, 3)] + [{"step": 2, "eval": {}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    assert rundir.truncate_log(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]
    assert rundir.truncate_log(path, 2) == 0
    assert rundir.truncate_log(tmp_path / "none.jsonl", 1) == 0


def _result(**kw):
    m = {"acc": 0.5, "ece": 0.1, "nll": 1.0, "brier": 0.6}
    base = {"id": m, "ood": {"s": m, "avg": m}, "sigma_min": 1e-3, "unreadable": {"id": 0, "s": 0}}
    base.update(kw)
    return base


def test_report_of_unreadable_images_rank_deficiency_and_no_id_set():
    methods = {"a": _result(unreadable={"id": 3, "s": 0}), "b": _result(sigma_min=0.0, sigma_min_rank_deficient=True),
               "c": _result(id=None, sigma_min=None)}
    doc = report.results_json(methods, {})
    assert doc["methods"]["a"]["unreadable"] == {"id": 3, "s": 0}
    assert doc["methods"]["b"]["sigma_min_rank_deficient"] is True
    assert doc["methods"]["c"]["id"] is None
    text = report.markdown(methods, {})
    assert "- a: unreadable images skipped (metrics exclude them): id 3" in text
    assert "| b |" in text and "0 (rank-deficient)" in text
    assert "- c: no ID evaluation set" in text
    row_c = next(line for line in text.splitlines() if line.startswith("| c |"))
    assert row_c.split("|")[2].strip() == "-"
