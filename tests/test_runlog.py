"""The run log: the window's means (overall and per t quartile) against a hand computation,
the lr of the warm-up steps, and truncate_log (atomic, drops cut lines and later steps)."""
import copy
import json

import pytest
import torch

from conftest import read_log, tiny_args
from s2dm.training.runlog import Window, truncate_log

T = 1000


def terms(loss, l0=None, lskip=None):
    loss = torch.tensor(loss, dtype=torch.float64)
    return {"loss": loss, "l0": loss if l0 is None else torch.tensor(l0), "lskip":
            torch.zeros_like(loss) if lskip is None else torch.tensor(lskip)}


def test_window_means_by_t_quartile_equal_a_hand_computation():
    w = Window(T)
    # quartile of t = min(3, floor(4 t / T)): [0, 250) → q1, [250, 500) → q2, [500, 750) → q3, [750, 999] → q4
    w.add(torch.tensor([0, 249, 250, 499, 500, 750, 999]), terms([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
                                                               l0=[1.0] * 7, lskip=[0.0] * 6 + [7.0]), 0.5)
    w.add(torch.tensor([100, 800]), terms([10.0, 20.0], l0=[2.0, 4.0], lskip=[8.0, 16.0]), 1.5)
    s = w.summary(batch_size=9)
    assert s["loss_t_q1"] == pytest.approx((1 + 2 + 10) / 3, rel=1e-12)
    assert s["loss_t_q2"] == pytest.approx((3 + 4) / 2, rel=1e-12)
    assert s["loss_t_q3"] == pytest.approx(5.0, rel=1e-12)
    assert s["loss_t_q4"] == pytest.approx((6 + 7 + 20) / 3, rel=1e-12)
    assert s["loss"] == pytest.approx(58 / 9, rel=1e-12)  # over samples, not over steps
    assert s["l0"] == pytest.approx(13 / 9, rel=1e-12) and s["lskip"] == pytest.approx(31 / 9, rel=1e-12)
    assert s["grad_norm"] == pytest.approx(1.0, rel=1e-12)  # over steps
    assert s["images_per_s"] == pytest.approx(9 * s["steps_per_s"])


def test_an_empty_quartile_is_left_out_and_reset_clears():
    w = Window(10)  # T not a multiple of 4: 4t // 10 puts t = 0..2 in q1, 3..4 in q2, 5..7 in q3, 8..9 in q4
    w.add(torch.tensor([2, 3, 8]), terms([1.0, 2.0, 4.0]), 0.0)
    s = w.summary(batch_size=3)
    assert (s["loss_t_q1"], s["loss_t_q2"], s["loss_t_q4"]) == (1.0, 2.0, 4.0) and "loss_t_q3" not in s
    w.reset()
    assert set(w.summary(batch_size=3)) == {"steps_per_s", "images_per_s"}


def all_reduce_two_ranks(w0: Window, w1: Window) -> None:
    """Both ranks' ``Window.all_reduce``, with the sum of what each sends as the reduction."""
    sent = []
    for w, main in ((w0, True), (w1, False)):
        copy.deepcopy(w).all_reduce(lambda xs: sent.append(list(xs)) or xs, main)
    total = [a + b for a, b in zip(*sent)]
    w0.all_reduce(lambda xs: total, True)
    w1.all_reduce(lambda xs: total, False)


def test_window_all_reduce_and_state_dict():
    w, w1 = Window(T), Window(T)
    for rank in (w, w1):  # two ranks with the same window: same means
        rank.add(torch.tensor([0, 999]), terms([1.0, 3.0]), 2.0)
    all_reduce_two_ranks(w, w1)
    s = w.summary(batch_size=2)
    assert w.counts["loss"] == 4 and w.counts["grad_norm"] == 1  # one grad norm a step, whatever the ranks
    assert (s["loss"], s["loss_t_q1"], s["loss_t_q4"], s["grad_norm"]) == (2.0, 1.0, 3.0, 2.0)
    other = Window(T)
    other.load_state_dict(json.loads(json.dumps(w.state_dict())))  # it travels in a checkpoint
    assert {k: v for k, v in other.summary(2).items() if "_per_s" not in k} == \
        {k: v for k, v in s.items() if "_per_s" not in k}


def test_a_window_saved_on_two_ranks_resumes_on_one_with_each_step_weighed_once():
    """Steps 1-2 on two ranks (each half the batch), a checkpoint mid-window (rank 0 keeps the
    reduced sums, rank 1 starts afresh), step 3: the window's means equal those of one process
    that took the three steps, whether step 3 runs on the two ranks or, resumed, on one. Before,
    each rank's copy of the grad norm was summed: resumed on one process, steps 1-2 weighed 2."""
    grads, rows = [1.0, 3.0, 5.0], [([0, 999], [1.0, 3.0]), ([300, 600], [2.0, 4.0]), ([10, 900], [6.0, 8.0])]
    one = Window(T)
    for g, (t, loss) in zip(grads, rows):
        one.add(torch.tensor(t), terms(loss), g)
    expected = {k: v for k, v in one.summary(2).items() if "_per_s" not in k}
    assert expected["grad_norm"] == 3.0

    w0, w1 = Window(T), Window(T)
    for g, (t, loss) in zip(grads[:2], rows[:2]):  # rank r gets row r of each step
        w0.add(torch.tensor(t[:1]), terms(loss[:1]), g)
        w1.add(torch.tensor(t[1:]), terms(loss[1:]), g)
    all_reduce_two_ranks(w0, w1)  # the checkpoint
    saved = json.loads(json.dumps(w0.state_dict()))
    w1.clear()

    resumed = Window(T)  # on one process
    resumed.load_state_dict(saved)
    resumed.add(torch.tensor(rows[2][0]), terms(rows[2][1]), grads[2])
    assert {k: v for k, v in resumed.summary(2).items() if "_per_s" not in k} == pytest.approx(expected, rel=1e-12)

    w0.add(torch.tensor(rows[2][0][:1]), terms(rows[2][1][:1]), grads[2])  # on the same two ranks
    w1.add(torch.tensor(rows[2][0][1:]), terms(rows[2][1][1:]), grads[2])
    all_reduce_two_ranks(w0, w1)  # the log line
    assert {k: v for k, v in w0.summary(2).items() if "_per_s" not in k} == pytest.approx(expected, rel=1e-12)


def test_a_step_copies_nothing_to_the_host():
    """The terms stay on their device until a log line: on the meta device any copy to the
    host (.cpu(), float(), .item()) raises, so add() makes none; the counts come from t."""
    w = Window(T)
    on_meta = {k: torch.ones(5, device="meta") for k in Window.TERMS}
    w.add(torch.tensor([0, 300, 600, 900, 999]), on_meta, 1.0)
    assert (w.counts["loss"], w.counts["loss_t_q1"], w.counts["loss_t_q4"], w.steps) == (5, 1, 2, 1)
    with pytest.raises(NotImplementedError):  # the log line is where they come back
        w.summary(batch_size=5)


def test_warmup_lr_is_linear_then_constant(tmp_path):
    from s2dm.cli import main

    out = tmp_path / "run"
    assert main(tiny_args(out, 6, "optim.warmup=4", "optim.lr=2e-3", "train.log_every=1",
                          "train.checkpoint_every=6", "model.ch=16")) == 0
    lrs = {r["step"]: r["lr"] for r in read_log(out) if "lr" in r}
    # the lr of step k (1-based in the log) is lr * min(1, k / warmup)
    assert lrs == pytest.approx({1: 5e-4, 2: 1e-3, 3: 1.5e-3, 4: 2e-3, 5: 2e-3, 6: 2e-3}, rel=1e-12)


LINES = [{"step": 0, "event": "start"}, {"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5},
         {"step": 6, "loss": 0.25}]


def test_truncate_log_drops_later_steps_and_cut_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in LINES) + '{"step": 8, "lo')  # cut by a kill
    stale = tmp_path / ".log.jsonl.abcd1234.tmp"  # a rewrite killed before its rename
    stale.write_text("{}\n")
    truncate_log(log, 4)
    assert [json.loads(x) for x in log.read_text().splitlines()] == LINES[:3]
    assert log.read_text().endswith("\n") and not stale.exists()
    truncate_log(tmp_path / "missing.jsonl", 4)  # no log: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def test_truncate_log_and_config_dump_are_atomic(tmp_path, monkeypatch):
    import s2dm.util.fileio as fileio
    from s2dm.io.config import load_config

    log, cfg_path = tmp_path / "log.jsonl", tmp_path / "config.yaml"
    text = "".join(json.dumps(r) + "\n" for r in LINES)
    log.write_text(text)
    cfg_path.write_text("old: config\n")

    def killed(src, dst):  # the process dies between writing the temp file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        truncate_log(log, 2)
    with pytest.raises(KeyboardInterrupt):
        load_config("configs/digits.yaml").dump(cfg_path)
    assert log.read_text() == text and cfg_path.read_text() == "old: config\n"  # old files intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "log.jsonl"]  # no temp left
    monkeypatch.undo()
    load_config("configs/digits.yaml").dump(cfg_path)
    assert load_config(cfg_path) == load_config("configs/digits.yaml")
