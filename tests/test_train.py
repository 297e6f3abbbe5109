import hashlib
import io
import random

import numpy as np
import pytest
import torch

from conftest import TINY, read_log, tiny_args
from s2dm import load_checkpoint
from s2dm.cli import main
from s2dm.core.unet import UNet
from s2dm.errors import UserError
from s2dm.io.checkpoint import read_checkpoint
from s2dm.io.config import load_config
from s2dm.training.state import new_state, restore


def test_short_run_lowers_loss_writes_everything(tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(out, 40)) == 0
    log = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in log] == list(range(5, 41, 5))
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    for key in ("l0", "lskip", "loss_t_q1", "loss_t_q4", "grad_norm", "steps_per_s", "lr"):
        assert key in log[-1]
    assert (out / "config.yaml").is_file() and (out / "samples" / "mosaic_00000040.png").is_file()
    ck = load_checkpoint(out)
    assert ck.step == 40 and isinstance(ck.model, UNet) and isinstance(ck.ema, UNet)
    assert ck.config == load_config(out / "config.yaml")
    assert ck.config.loss.type == "s2" and ck.config.train.steps == 40
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    assert ck.ema(x, t).shape == x.shape
    assert not torch.equal(ck.ema.conv_out.weight, ck.model.conv_out.weight)
    # keep_last=2 older checkpoints besides the newest
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt_*.pt")) == [
        "ckpt_00000020.pt", "ckpt_00000030.pt", "ckpt_00000040.pt"]


def _digest(module):
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(tiny_args(straight, 20)) == 0
    assert main(tiny_args(split, 10)) == 0
    assert main(tiny_args(split, 20)) == 0  # resumes from step 10
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert _digest(a.model) == _digest(b.model) and _digest(a.ema) == _digest(b.ema)
    steps = [r["step"] for r in read_log(split) if "loss" in r]
    assert steps == [5, 10, 15, 20]
    assert [r["loss"] for r in read_log(split) if "loss" in r] == [r["loss"] for r in read_log(straight) if "loss" in r]
    # The RNG record too (Python's and numpy's states were unseeded): the same run twice writes
    # the same file byte for byte; the resumed one the same content (its pickle shares other
    # objects, so its bytes differ), each entry serialising to the same bytes.
    again = tmp_path / "again"
    random.seed(1), np.random.seed(2)  # as a new process finds them: seeded from the OS
    assert main(tiny_args(again, 20)) == 0
    ckpt = "checkpoints/ckpt_00000020.pt"
    assert (again / ckpt).read_bytes() == (straight / ckpt).read_bytes()
    a, b = read_checkpoint(straight / ckpt), read_checkpoint(split / ckpt)
    assert a.keys() == b.keys() and all(_saved(a[k]) == _saved(b[k]) for k in a), [k for k in a if _saved(a[k]) != _saved(b[k])]


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_resume_runs_the_optim_fused_it_is_asked_for(tmp_path):
    """optim.fused may change on resume: the restored Adam runs the asked implementation with the
    saved moments (Optimizer.load_state_dict alone brought back the saved flag)."""
    out = tmp_path / "run"
    assert main(tiny_args(out, 10, "optim.fused=true")) == 0
    saved = read_checkpoint(out / "checkpoints" / "ckpt_00000010.pt")["optimizer"]
    for fused in (False, True):
        cfg = load_config(out / "config.yaml", [f"optim.fused={str(fused).lower()}"])
        state = new_state(cfg, torch.device("cpu"))
        restore(state, cfg, out / "checkpoints", "cpu")
        assert state.step == 10 and [g["fused"] for g in state.opt.param_groups] == [fused]
        now = state.opt.state_dict()
        assert now["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"]
        for i, moments in saved["state"].items():
            for k, v in moments.items():
                assert torch.equal(now["state"][i][k], v), (i, k)


def test_resume_refuses_a_changed_loss(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, 10)) == 0
    capsys.readouterr()
    assert main(tiny_args(out, 20, "loss.tau=0.5")) == 2
    assert capsys.readouterr().err.startswith("error: loss.tau:")
    assert main(tiny_args(out, 10) + ["--resume", "never"]) == 2


def test_a_forced_fresh_start_leaves_nothing_of_the_old_run_but_sample_folders(tmp_path):
    """--resume never --force: the old run's checkpoints, preview mosaics, curves and
    TensorBoard events go (a mosaic of step 40 beside a 5-step run read as its own); a folder
    of `s2dm sample` stays, its metadata naming the checkpoint it was made from."""
    out = tmp_path / "run"
    assert main(tiny_args(out, 8, "train.sample_every=4", "train.log_every=4")) == 0
    (out / "tb").mkdir()
    (out / "tb" / "events.out.tfevents.old").write_text("old")
    (out / "samples" / "ddim-20").mkdir()
    (out / "samples" / "ddim-20" / "000000.png").write_bytes(b"kept")
    assert main(tiny_args(out, 2, "train.log_every=2", "train.checkpoint_every=2") + ["--resume", "never", "--force"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt_*.pt")) == ["ckpt_00000002.pt"]
    assert sorted(p.name for p in (out / "samples").glob("mosaic_*.png")) == ["mosaic_00000002.png"]
    assert not (out / "tb").exists() and (out / "samples" / "ddim-20" / "000000.png").read_bytes() == b"kept"
    assert [r["step"] for r in read_log(out) if "loss" in r] == [2]


@pytest.mark.parametrize("resume, force, key", [(True, False, "resume"), ("Auto", False, "resume"),
                                                 ("auto", True, "force"), ("never", "yes", "force")])
def test_train_refuses_a_misspelt_resume_or_force_before_touching_the_run(tmp_path, resume, force, key):
    """A resume mode other than 'auto'/'never' started the run over (its log deleted, its
    checkpoints overwritten), and force=True beside resume='auto' was ignored: both are now a
    RunError naming the option, and the run is as it was; on the command line, one line."""
    from s2dm.errors import RunError
    from s2dm.training.loop import train

    out = tmp_path / "run"
    assert main(tiny_args(out, 2, "train.checkpoint_every=2")) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg = load_config("configs/digits.yaml", ["train.steps=4", "loss.type=l0"] + TINY)
    with pytest.raises(RunError) as exc:
        train(cfg, out, resume=resume, force=force, progress=False)
    assert exc.value.key == key
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_force_without_resume_never_is_one_error_line_naming_the_flags(tmp_path, capsys):
    assert main(tiny_args(tmp_path / "run", 2) + ["--force"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --force starts the run over and goes with --resume never; --resume auto (the default) "
                   "continues the run, keeping its checkpoints\n")
    assert not (tmp_path / "run").exists()


def test_train_gives_the_caller_its_random_generators_and_tf32_flags_back(tmp_path, monkeypatch):
    """train() seeds torch's, Python's and numpy's global generators for its run (and turns
    TF32 off on a GPU for fp32): a caller's draws after it are what they would have been
    without it."""
    import s2dm.training.state as state_mod
    from s2dm.training.loop import train

    def flip(precision, device):  # as ieee_float32 does on a GPU
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setattr(state_mod, "ieee_float32", flip)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        cfg = load_config("configs/digits.yaml", ["train.steps=2"] + TINY)
        draws = []
        for trained in (False, True):
            torch.manual_seed(7), np.random.seed(7), random.seed(7)
            if trained:
                train(cfg, tmp_path / "run", progress=False)
            draws.append((torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]))
        assert draws[0] == draws[1]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_baseline_and_s2_see_identical_inputs(tmp_path, monkeypatch):
    """Same seed ⇒ same initial weights, data order, t and ε whatever loss.type is."""
    import s2dm.training.step as train_mod

    seen = {}
    original = train_mod.compute_loss

    def recording(cfg, model, x0, draws, schedule):
        def spy(x_t, t):
            seen.setdefault(cfg.loss.type, []).append((x_t.detach().clone(), t.clone()))
            return model(x_t, t)
        if cfg.loss.type not in seen:
            seen[cfg.loss.type + "_init"] = _digest(model)
        return original(cfg, spy, x0, draws, schedule)

    monkeypatch.setattr(train_mod, "compute_loss", recording)
    assert main(tiny_args(tmp_path / "base", 4, "loss.type=l0")) == 0
    assert main(tiny_args(tmp_path / "s2", 4, "loss.type=s2")) == 0
    assert seen["l0_init"] == seen["s2_init"]
    assert len(seen["l0"]) == len(seen["s2"]) == 4
    for (xa, ta), (xb, tb) in zip(seen["l0"], seen["s2"]):
        assert torch.equal(ta, tb) and torch.equal(xa, xb)


def test_antithetic_t_pairs():
    from s2dm.training.draws import draw_step

    cfg = load_config("configs/digits.yaml")
    d = draw_step(cfg, 7, (32, 1, 8, 8))
    assert torch.equal(d.t[:16] + d.t[16:], torch.full((16,), 999))
    assert d.skip_noise is not None and not torch.equal(d.skip_noise, d.noise)
    d2 = draw_step(load_config("configs/digits.yaml", ["loss.type=l0"]), 7, (32, 1, 8, 8))
    assert torch.equal(d.noise, d2.noise) and d2.skip_noise is None


def test_data_order_covers_each_epoch_once():
    from s2dm.training.draws import PlannedBatches

    plan = PlannedBatches(10, 4, seed=3, start_step=0, end_step=5)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert PlannedBatches(10, 4, 3, 2, 5).indices(2) == plan.indices(2)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(tiny_args(tmp_path / "a", 5, "loss.tauu=1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: loss.tauu: unknown key") and err.count("\n") == 1
    missing = tmp_path / "nowhere"
    args = tiny_args(tmp_path / "b", 5, "data.dataset=cifar10", f"data.root={missing}", "data.channels=3",
                     "data.image_size=32")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "CIFAR10" in err and str(missing) in err and err.count("\n") == 1


def test_nonfinite_loss_stops_and_keeps_checkpoints(tmp_path, monkeypatch, capsys):
    import s2dm.training.step as train_mod

    out = tmp_path / "run"
    assert main(tiny_args(out, 10)) == 0
    ckpt = out / "checkpoints" / "ckpt_00000010.pt"
    before = ckpt.read_bytes()
    original = train_mod.compute_loss

    def poisoned(cfg, model, x0, draws, schedule):
        loss, terms = original(cfg, model, x0, draws, schedule)
        return loss * float("nan"), terms

    monkeypatch.setattr(train_mod, "compute_loss", poisoned)
    capsys.readouterr()
    assert main(tiny_args(out, 30, "train.max_nonfinite=3")) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: loss was non-finite for 3 steps") and "ckpt_00000010.pt" in err
    assert ckpt.read_bytes() == before and sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [ckpt.name]
    assert sum(r.get("event") == "nonfinite_skipped" for r in read_log(out)) == 3


def _poison_steps(monkeypatch, steps, *extra):
    """Make the loss of the given 0-based steps NaN (found by their drawn t, so it holds across
    a resume in the same process)."""
    import s2dm.training.step as train_mod
    from conftest import TINY
    from s2dm.training.draws import draw_step

    cfg = load_config("configs/digits.yaml", TINY + list(extra))
    bad = {tuple(draw_step(cfg, i, (cfg.train.batch_size, 1, 8, 8)).t.tolist()) for i in steps}
    original = train_mod.compute_loss

    def poisoned(cfg, model, x0, draws, schedule):
        loss, terms = original(cfg, model, x0, draws, schedule)
        return (loss * float("nan") if tuple(draws.t.tolist()) in bad else loss), terms

    monkeypatch.setattr(train_mod, "compute_loss", poisoned)


def test_skipped_steps_count_on_after_a_resume(tmp_path, monkeypatch, capsys):
    """The log's nonfinite_skipped and train.max_nonfinite's streak are saved with the checkpoint:
    a run resumed at step 10 logs and stops as the run that went straight (they restarted at 0)."""
    _poison_steps(monkeypatch, [1, 8, 9, 10], "train.max_nonfinite=3")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(tiny_args(straight, 20, "train.max_nonfinite=3")) == 2
    assert main(tiny_args(split, 10, "train.max_nonfinite=3")) == 0
    assert main(tiny_args(split, 20, "train.max_nonfinite=3")) == 2  # steps 9, 10 and 11: 3 in a row
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(e.startswith("error: loss was non-finite for 3 steps in a row (step 11)")
                                    and e.endswith("ckpt_00000010.pt") for e in errors), errors
    counts = [[(r["step"], r["nonfinite_skipped"]) for r in read_log(run) if "lr" in r] for run in (straight, split)]
    assert counts[0] == counts[1] == [(5, 1), (10, 3)]


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    bad = tmp_path / "ckpt_00000001.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(bad)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("extra, init_from, message", [
    (("data.dataset=cifar10", "data.root={tmp}/nowhere", "data.channels=3", "data.image_size=32"), None, "CIFAR10"),
    ((), "{tmp}/missing.ckpt", "missing.ckpt"),
    (("train.device=cuda:99",), None, "cuda:99"),
], ids=["missing data", "missing init-from", "unavailable device"])
def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path, capsys, extra, init_from, message):
    out = tmp_path / "runs" / "new"
    args = tiny_args(out, 5, *(e.format(tmp=tmp_path) for e in extra))
    if init_from:
        args += ["--init-from", init_from.format(tmp=tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("error", [UserError, RuntimeError])
def test_a_failing_preview_grid_never_costs_the_checkpoint(tmp_path, monkeypatch, capsys, error):
    """The step's checkpoint is written before its preview grid: a grid that fails (any
    exception) stops the run with its error, and the checkpoint of that step is on disk."""
    import s2dm.training.loop as train_mod

    out, straight = tmp_path / "run", tmp_path / "straight"
    args = tiny_args(out, 20, "train.sample_every=10")  # TINY: a checkpoint every 10 steps
    tried = []

    def failing(ema, cfg, schedule, path, device):
        tried.append(path.name)
        raise error("the preview broke")

    monkeypatch.setattr(train_mod, "write_mosaic", failing)
    if error is UserError:
        assert main(args) == 2
        assert capsys.readouterr().err.splitlines()[-1] == "error: the preview broke"
    else:
        with pytest.raises(RuntimeError, match="the preview broke"):
            main(args)
    assert tried == ["mosaic_00000010.png"]
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt_*.pt")) == ["ckpt_00000010.pt"]
    assert load_checkpoint(out).step == 10
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 0  # resumes from step 10's checkpoint
    assert "from step 10" in capsys.readouterr().out
    assert (out / "samples" / "mosaic_00000020.png").is_file()
    if error is RuntimeError:  # the resumed run is the run that never failed
        assert main(tiny_args(straight, 20, "train.sample_every=10")) == 0
        assert _digest(load_checkpoint(out).ema) == _digest(load_checkpoint(straight).ema)
        assert (out / "samples" / "mosaic_00000020.png").read_bytes() == \
            (straight / "samples" / "mosaic_00000020.png").read_bytes()


def test_a_config_saved_before_the_sample_options_resumes(tmp_path):
    """Runs saved before sample.order / eps_scale / legacy_pndm_index existed load and resume."""
    from s2dm.io.config import config_from_saved
    from s2dm.training.state import check_resumable

    cfg = load_config("configs/digits.yaml")
    saved = cfg.to_dict()
    for key in ("order", "eps_scale", "legacy_pndm_index"):
        del saved["sample"][key]
    assert config_from_saved(saved) == cfg
    check_resumable(cfg, saved)  # no "sample.order: the run folder was trained with None"


def test_a_rerun_that_trains_nothing_leaves_config_yaml_as_trained(tmp_path, capsys):
    """Rerun with a smaller train.steps, the run is already trained: its config.yaml keeps the
    steps it trained to (it was rewritten with the rerun's, which would retrain a shorter run).
    A rerun that trains on writes the config it continues with."""
    out = tmp_path / "run"
    assert main(tiny_args(out, 4, "model.ch=16", "train.checkpoint_every=2")) == 0
    trained = (out / "config.yaml").read_text()
    assert main(tiny_args(out, 2, "model.ch=16", "train.checkpoint_every=2")) == 0
    assert "already trained to step 4" in capsys.readouterr().out
    assert (out / "config.yaml").read_text() == trained
    assert main(tiny_args(out, 6, "model.ch=16", "train.checkpoint_every=2")) == 0
    assert "steps: 6" in (out / "config.yaml").read_text() and load_checkpoint(out).step == 6
