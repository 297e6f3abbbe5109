"""Starting from published DDPM weights: ``s2dm convert`` / ``s2dm export`` / ``train --init-from``.

Random diffusers ``UNet2DModel``s in the DDPM layout stand in for the published files
(google/ddpm-cifar10-32 has the CIFAR10 layout below); a DDIM-layout file is s2dm's own state
dict saved the way the DDIM repository saves its states. Everything runs from tmp_path.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import TINY, read_log, tiny_args
from s2dm import load_checkpoint
from s2dm.cli import main
from s2dm.core.schedule import NoiseSchedule
from s2dm.core.unet import UNet
from s2dm.errors import UserError
from s2dm.interop.layouts import diffusers_unet_kwargs, model_from_diffusers_config
from s2dm.samplers import sample
from s2dm.util.fileio import sha256_file

diffusers = pytest.importorskip("diffusers")

CIFAR10 = dict(in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), image_size=32)
SMALL = dict(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)
DIGITS = dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)
TINY_MODEL = [item for item in TINY if item.startswith("model.")]  # configs/digits.yaml + TINY = DIGITS


def random_diffusers(layout: dict, seed: int = 0) -> "diffusers.UNet2DModel":
    """A UNet2DModel in the DDPM layout with every tensor perturbed (the norms' 1 and 0 too, so
    that every tensor's place in the mapping matters), by 10% of its scale: activations keep
    the size they have in a trained network."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**diffusers_unet_kwargs(dropout=0.0, **layout))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p) * (p.std() if p.ndim > 1 else 1.0))
    return model.eval()


def probe(layout: dict, n: int = 2):
    torch.manual_seed(1)
    x = torch.randn(n, layout["in_channels"], layout["image_size"], layout["image_size"])
    return x, torch.tensor([3, 999, 500][:n])


def run(*args) -> int:
    return main([str(a) for a in args])


def convert(src, out, *extra, layout="diffusers") -> int:
    return run("convert", "--from", layout, src, "--out", out, *extra)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


# -------------------------------------------------------------------------------------
# diffusers → s2dm → diffusers
# -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [pytest.param(SMALL, id="small"),
                                    pytest.param(CIFAR10, id="ddpm-cifar10", marks=pytest.mark.slow)])  # 35.7 M
def test_diffusers_round_trip_gives_the_same_function(layout, tmp_path):
    theirs = random_diffusers(layout)
    theirs.save_pretrained(tmp_path / "hub")
    assert convert(tmp_path / "hub", tmp_path / "model.ckpt") == 0
    ck = load_checkpoint(tmp_path / "model.ckpt")
    assert convert(tmp_path / "hub" / "config.json", tmp_path / "via_json.ckpt") == 0  # the folder it is in
    via_json = torch.load(tmp_path / "via_json.ckpt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(v, via_json[k]) for k, v in ck.state["model"].items())
    m = ck.config.model
    assert (m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions) == (
        layout["ch"], list(layout["ch_mult"]), layout["num_res_blocks"], list(layout["attn_resolutions"]))
    assert (ck.config.data.image_size, ck.config.data.channels, ck.step) == (layout["image_size"], 3, 0)
    if layout is CIFAR10:
        assert sum(p.numel() for p in ck.ema.parameters()) == 35_746_307

    x, t = probe(layout)
    with torch.no_grad():
        want = theirs(x, t).sample
        got = ck.ema(x, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ck.model(x, t), want, rtol=1e-5, atol=1e-5)
    print(f"max |s2dm - diffusers| = {(got - want).abs().max():.2e}")

    assert run("export", "--to", "diffusers", "--ckpt", tmp_path / "model.ckpt", "--out", tmp_path / "exp") == 0
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "exp" / "unet").eval()
    mine = theirs.state_dict()
    assert set(back.state_dict()) == set(mine)
    assert all(torch.equal(v, mine[k]) for k, v in back.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(back(x, t).sample, want, rtol=1e-5, atol=1e-5)
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "exp")
    assert isinstance(pipe.scheduler, diffusers.DDPMScheduler) and pipe.scheduler.config.clip_sample is False
    betas = NoiseSchedule.from_config(ck.config.diffusion).betas
    torch.testing.assert_close(pipe.scheduler.betas.double(), betas, rtol=1e-6, atol=0)


def test_exported_ddim_pipeline_takes_s2dms_ddim_steps(tmp_path):
    """DDIMPipeline(eta=0) on the exported folder = s2dm's DDIM on the uniform grid from the
    same x_T: the scheduler config carries s2dm's conventions (grid, ᾱ_{-1} = 1, no clip)."""
    random_diffusers(SMALL).save_pretrained(tmp_path / "hub")
    assert convert(tmp_path / "hub", tmp_path / "m.ckpt") == 0
    assert run("export", "--to", "diffusers", "--ckpt", tmp_path / "m.ckpt", "--out", tmp_path / "exp") == 0
    pipe = diffusers.DDIMPipeline.from_pretrained(tmp_path / "exp")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, eta=0.0,
                  output_type="np").images
    ck = load_checkpoint(tmp_path / "m.ckpt")
    x_T = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    x0, info = sample(ck.ema, x_T, NoiseSchedule.from_config(ck.config.diffusion), sampler="ddim", steps=5)
    assert info["timesteps"][:5] == [800, 600, 400, 200, 0]
    ours = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - ours).max() < 1e-4


def test_pipeline_folder_legacy_names_bin_file_and_scheduler(tmp_path):
    """A pipeline folder (unet/ + scheduler/) is found; the pre-0.14 attention names the
    google/ddpm-* files use and a .bin weights file convert the same; the scheduler's betas
    become the checkpoint's diffusion section."""
    theirs = random_diffusers(SMALL)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.03)
    diffusers.DDPMPipeline(unet=theirs, scheduler=sched).save_pretrained(tmp_path / "pipe")
    assert convert(tmp_path / "pipe", tmp_path / "a.ckpt") == 0
    a = load_checkpoint(tmp_path / "a.ckpt")
    assert a.config.diffusion.beta_end == 0.03

    legacy = {}
    for key, value in theirs.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    (tmp_path / "old").mkdir()
    torch.save(legacy, tmp_path / "old" / "diffusion_pytorch_model.bin")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "pipe" / "unet" / "config.json").read_text())
    assert convert(tmp_path / "old" / "diffusion_pytorch_model.bin", tmp_path / "b.ckpt") == 0
    b = load_checkpoint(tmp_path / "b.ckpt")
    assert all(torch.equal(v, b.state["model"][k]) for k, v in a.state["model"].items())
    assert b.state["source"]["sha256"] == sha256_file(tmp_path / "old" / "diffusion_pytorch_model.bin")


def test_the_scheduler_config_is_checked_and_overrides_cannot_change_it(tmp_path, capsys):
    """A --set of diffusion.* without --config is refused as it is with one (the overrides
    edited the scheduler's own dict, so the check compared it with itself and the checkpoint
    recorded T = 500 for weights trained on 1000); a scheduler field that is not a number, or
    a step count that is not an integer, is one error line; trained_betas is named."""
    theirs = random_diffusers(SMALL)
    diffusers.DDPMPipeline(unet=theirs, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    assert convert(tmp_path / "pipe", tmp_path / "x.ckpt", "--set", "diffusion.num_timesteps=500") == 2
    assert error_line(capsys) == ("error: diffusion.num_timesteps is 1000 in the scheduler config beside the weights "
                                  "but 500 in the config")
    assert not (tmp_path / "x.ckpt").exists()
    sched_file = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    plain = json.loads(sched_file.read_text())
    for change, says in (({"num_train_timesteps": None}, "num_train_timesteps: None is not an integer"),
                         ({"num_train_timesteps": 1000.7}, "num_train_timesteps: 1000.7 is not an integer"),
                         ({"num_train_timesteps": "abc"}, "num_train_timesteps: 'abc' is not an integer"),
                         ({"beta_start": None}, "beta_start: None is not a number"),
                         ({"trained_betas": [1e-4] * 1000}, "trained_betas: a β list of its own")):
        sched_file.write_text(json.dumps({**plain, **change}))
        assert convert(tmp_path / "pipe", tmp_path / "x.ckpt") == 2
        assert says in error_line(capsys) and not (tmp_path / "x.ckpt").exists()


# -------------------------------------------------------------------------------------
# DDIM-repository layout
# -------------------------------------------------------------------------------------
def test_ddim_layout_states_list_and_plain_state_dict(tmp_path, capsys):
    torch.manual_seed(0)
    model, ema = UNet(dropout=0.1, **SMALL), UNet(dropout=0.1, **SMALL)
    module = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}  # noqa: E731  (DataParallel)
    opt = torch.optim.Adam(model.parameters()).state_dict()
    torch.save([module(model), opt, 7, 1234, module(ema)], tmp_path / "ckpt.pth")  # what ddim/main.py saves

    assert convert(tmp_path / "ckpt.pth", tmp_path / "x.ckpt", layout="ddim") == 2
    assert "--image-size" in error_line(capsys)
    # the size from the flag and from a config: they must agree; 0 is no size; a study YAML is named
    for extra, says in ((["--image-size", 0], "error: --image-size must be a positive integer, not 0"),
                        (["--image-size", 32, "--config", "digits.yaml"],
                         "error: --image-size 32 differs from data.image_size 8 of digits.yaml; drop one"),
                        (["--config", "study_digits.yaml"], "is a study config (it has train_config and runs)")):
        assert convert(tmp_path / "ckpt.pth", tmp_path / "x.ckpt", *extra, layout="ddim") == 2
        assert says in error_line(capsys)
    # a damaged copy: a NaN weight, an integer tensor
    for name, damaged in (("nan.pth", float("nan")), ("int.pth", None)):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["conv_out.bias"] = sd["conv_out.bias"].long() if damaged is None else sd["conv_out.bias"].fill_(damaged)
        torch.save(sd, tmp_path / name)
        assert convert(tmp_path / name, tmp_path / "x.ckpt", "--image-size", 16, layout="ddim") == 2
        assert error_line(capsys).endswith(f"{name}: conv_out.bias " + (
            "is int64, not a floating-point weight" if damaged is None else "holds NaN or infinite values"))
    assert not (tmp_path / "x.ckpt").exists()
    assert convert(tmp_path / "ckpt.pth", tmp_path / "x.ckpt", "--image-size", 16, layout="ddim") == 0
    ck = load_checkpoint(tmp_path / "x.ckpt")
    assert ck.config.model.attn_resolutions == [8] and ck.config.model.ch_mult == [1, 2]
    assert ck.state["source"]["step"] == 1234
    for mine, loaded in ((model, ck.model), (ema, ck.ema)):
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in mine.state_dict().items())

    # export --to ddim writes the plain state dict the DDIM repository's Model loads
    # (as the published model-790000.ckpt is); converting it back is the identity.
    assert run("export", "--to", "ddim", "--ckpt", tmp_path / "x.ckpt", "--out", tmp_path / "plain.ckpt") == 0
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    assert set(plain) == set(ema.state_dict())
    assert convert(tmp_path / "plain.ckpt", tmp_path / "y.ckpt", "--image-size", 16, layout="ddim") == 0
    y = load_checkpoint(tmp_path / "y.ckpt")
    assert all(torch.equal(v, y.ema.state_dict()[k]) for k, v in ema.state_dict().items())


# -------------------------------------------------------------------------------------
# Refusals: one error line, exit 2, the offending key named
# -------------------------------------------------------------------------------------
def test_architecture_mismatch_names_the_first_key(tmp_path, capsys):
    random_diffusers(DIGITS).save_pretrained(tmp_path / "hub")
    assert convert(tmp_path / "hub", tmp_path / "x.ckpt", "--image-size", 8) == 2
    assert error_line(capsys) == "error: --image-size is for --from ddim; diffusers' config.json has the sample_size"
    tiny = [arg for item in TINY_MODEL for arg in ("--set", item)]
    assert convert(tmp_path / "hub", tmp_path / "ok.ckpt", "--config", "configs/digits.yaml", *tiny) == 0
    assert load_checkpoint(tmp_path / "ok.ckpt").config.data.dataset == "digits"

    assert convert(tmp_path / "hub", tmp_path / "x.ckpt", "--config", "configs/digits.yaml", *tiny,
                   "--set", "model.ch=64") == 2
    err = error_line(capsys)
    assert "model.ch is 32 in the weights but 64" in err and "temb.dense.0.weight has shape" in err

    # a renamed key (no counterpart), a missing key, a tensor of the wrong shape
    from safetensors.torch import load_file, save_file
    path = tmp_path / "hub" / "diffusion_pytorch_model.safetensors"
    good = load_file(path)
    for edit, expect in (
        (lambda sd: sd.update({"down_blocks.0.resnets.0.convX.weight": sd.pop("down_blocks.0.resnets.0.conv1.weight")}),
         "down_blocks.0.resnets.0.convX.weight"),
        (lambda sd: sd.pop("conv_out.bias"), "conv_out.bias is missing"),
        (lambda sd: sd.update({"mid_block.attentions.0.to_q.weight": torch.zeros(64, 32)}),
         "mid.attn_1.q.weight has shape"),
    ):
        sd = dict(good)
        edit(sd)
        save_file(sd, path)
        assert convert(tmp_path / "hub", tmp_path / "x.ckpt") == 2
        assert expect in error_line(capsys)
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.parametrize("change, key", [
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"attention_head_dim": 8}, "attention_head_dim"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "down_block_types[1]"),
    ({"norm_num_groups": 16}, "norm_num_groups"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
])
def test_settings_s2dm_cannot_express_are_refused(change, key):
    conf = {"_class_name": "UNet2DModel", **diffusers_unet_kwargs(**SMALL)}
    model_from_diffusers_config(conf, "config.json")  # the DDPM layout itself is accepted
    with pytest.raises(UserError, match=rf"^config\.json: {re.escape(key)}:"):
        model_from_diffusers_config({**conf, **change}, "config.json")


@pytest.mark.parametrize("change, says", [
    ({"block_out_channels": 32}, "block_out_channels: 32 is not a list of positive integers"),
    ({"block_out_channels": [0, 0]}, "block_out_channels: [0, 0] is not a list of positive integers"),
    ({"down_block_types": "DownBlock2D"}, "down_block_types: 'DownBlock2D' is not a list of names"),
    ({"dropout": "x"}, "dropout: 'x' is not a rate in [0, 1)"),
    ({"layers_per_block": 1.5}, "layers_per_block: 1.5 is not a positive integer"),
    ({"sample_size": 0}, "sample_size: 0 is not one square image size"),
])
def test_a_malformed_config_json_is_one_error(change, says):
    """Hand-edited or damaged values: a typed error naming the key (they were a TypeError,
    ValueError or ZeroDivisionError)."""
    conf = {"_class_name": "UNet2DModel", **diffusers_unet_kwargs(**SMALL)}
    with pytest.raises(UserError) as err:
        model_from_diffusers_config({**conf, **change}, "config.json")
    assert str(err.value) == f"config.json: {says}"


def test_missing_and_corrupt_files_are_clear_errors(tmp_path, capsys):
    assert convert(tmp_path / "nowhere", tmp_path / "x.ckpt") == 2
    assert "no such file" in error_line(capsys)
    random_diffusers(SMALL).save_pretrained(tmp_path / "hub")
    weights = tmp_path / "hub" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert convert(tmp_path / "hub", tmp_path / "x.ckpt") == 2
    assert "corrupt or truncated" in error_line(capsys)
    (tmp_path / "hub" / "config.json").unlink()
    assert convert(weights, tmp_path / "x.ckpt") == 2
    assert "no config.json" in error_line(capsys)
    (tmp_path / "bad.ckpt").write_bytes(b"not a torch file")
    assert convert(tmp_path / "bad.ckpt", tmp_path / "x.ckpt", "--image-size", 32, layout="ddim") == 2
    assert "corrupt or truncated" in error_line(capsys)
    # the DDIM layout: a wrong path is named before the missing image size; a folder is diffusers'
    assert convert(tmp_path / "nowhere.ckpt", tmp_path / "x.ckpt", layout="ddim") == 2
    assert "nowhere.ckpt: no such file" in error_line(capsys)
    assert convert(tmp_path / "hub", tmp_path / "x.ckpt", "--image-size", 32, layout="ddim") == 2
    line = error_line(capsys)
    assert "is a folder, but the DDIM layout is one weights file" in line and line.endswith("is --from diffusers")


def test_export_refuses_what_diffusers_cannot_express(tmp_run_16, capsys):
    out = tmp_run_16.parent / "exp"
    assert run("export", "--to", "diffusers", "--ckpt", tmp_run_16, "--out", out) == 2
    assert "multiple of 32" in error_line(capsys)
    assert not (out / "unet").exists()
    assert run("export", "--to", "ddim", "--ckpt", tmp_run_16, "--out", out.with_suffix(".ckpt")) == 2
    assert "DDIM repository's Model normalises with 32 groups" in error_line(capsys)


@pytest.fixture
def tmp_run_16(tmp_path):
    """A 1-step digits run whose widths (16, 32) diffusers' 32-group norms cannot take."""
    out = tmp_path / "w16"
    assert main(tiny_args(out, 1, "model.ch=16", "train.sample_every=1000", "train.checkpoint_every=1")) == 0
    return out


# -------------------------------------------------------------------------------------
# Fine-tuning: train --init-from
# -------------------------------------------------------------------------------------
def _digits_ckpt(tmp_path) -> str:
    random_diffusers(DIGITS).save_pretrained(tmp_path / "hub")
    ckpt = tmp_path / "digits.ckpt"
    assert convert(tmp_path / "hub", ckpt, "--config", "configs/digits.yaml",
                   *[arg for item in TINY_MODEL for arg in ("--set", item)]) == 0
    return str(ckpt)


def losses(run_dir):
    return [r["loss"] for r in read_log(run_dir) if "loss" in r and "event" not in r]


def test_init_from_starts_at_the_converted_weights_and_the_loss_falls(tmp_path, capsys):
    ckpt = _digits_ckpt(tmp_path)
    weights = torch.load(ckpt, weights_only=False)["ema"]
    # One step at lr 1e-30 moves no weight: the run's model and EMA are the converted ones.
    still = tmp_path / "still"
    assert main(tiny_args(still, 1, "optim.lr=1e-30") + ["--init-from", ckpt]) == 0
    ck = load_checkpoint(still)
    for module in (ck.model, ck.ema):
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, weights[key], rtol=1e-6, atol=0, msg=key)
    start = read_log(still)[0]
    assert start["event"] == "start" and start["init_from"]["sha256"] == sha256_file(ckpt)
    assert start["init_from"]["source"]["format"] == "diffusers"
    # A resumed run keeps its own weights (and says init_from is ignored).
    assert main(tiny_args(still, 2, "optim.lr=1e-30") + ["--init-from", ckpt]) == 0
    assert f"init_from {ckpt} is ignored" in capsys.readouterr().err

    tuned = tmp_path / "tuned"  # the plain loss, as a fine-tune of DDPM weights might use
    assert main(tiny_args(tuned, 30, "loss.type=l0") + ["--init-from", ckpt]) == 0
    curve = losses(tuned)
    assert len(curve) == 6 and curve[-1] < 0.7 * curve[0], curve


def test_trained_exported_converted_model_fine_tunes_from_where_it_was(tiny_run, tmp_path):
    """train → export to diffusers → convert back → fine-tune: the first steps' loss is that of
    the trained model, well below a fresh run's on the very same batches and noise."""
    assert run("export", "--to", "diffusers", "--ckpt", tiny_run, "--out", tmp_path / "exp") == 0
    cfg = json.loads((tmp_path / "exp" / "unet" / "config.json").read_text())
    assert cfg["block_out_channels"] == [32, 64] and cfg["in_channels"] == 1
    assert convert(tmp_path / "exp", tmp_path / "back.ckpt", "--config", "configs/digits.yaml",
                   *[arg for item in TINY_MODEL for arg in ("--set", item)]) == 0
    tuned = tmp_path / "tuned"
    assert main(tiny_args(tuned, 5) + ["--init-from", str(tmp_path / "back.ckpt")]) == 0
    fresh = losses(tiny_run)[0]  # tiny_run's first window: the same seed, so the same draws
    assert losses(tuned)[0] < 0.8 * fresh, (losses(tuned), fresh)


def test_init_from_refuses_a_mismatched_architecture(tmp_path, capsys):
    ckpt = _digits_ckpt(tmp_path)
    assert main(tiny_args(tmp_path / "r", 1, "model.num_res_blocks=2") + ["--init-from", ckpt]) == 2
    err = error_line(capsys)
    assert "down.0.block.1.norm1.weight is missing" in err and "model.num_res_blocks is 1 there but 2" in err
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    assert main(tiny_args(tmp_path / "r2", 1) + ["--init-from", str(tmp_path / "junk.ckpt")]) == 2
    assert "s2dm convert" in error_line(capsys)


def test_an_unknown_layout_is_refused_before_any_file_is_read(tmp_path):
    """One list of layouts (the CLI's choices too); a Python caller's typo is named first, not
    after reading a checkpoint that can be half a GiB (here: none exists at all)."""
    from s2dm.interop.convert import convert
    from s2dm.interop.export import export
    from s2dm.interop.layouts import LAYOUTS

    assert LAYOUTS == ("diffusers", "ddim")
    with pytest.raises(UserError, match=r"^to 'onnx': expected diffusers or ddim$"):
        export(tmp_path / "no-such-run", tmp_path / "out", to="onnx")
    with pytest.raises(UserError, match=r"^layout 'keras': expected diffusers or ddim$"):
        convert("keras", tmp_path / "nothing", tmp_path / "x.ckpt")
    assert not any(tmp_path.iterdir())
