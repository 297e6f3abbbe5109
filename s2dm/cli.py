"""The ``s2dm`` command: argument parsing only, one function per verb.

A user error (bad config, missing data, corrupt checkpoint, ...) prints one ``error:`` line
and exits 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .errors import UserError


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    ckpt = train(cfg, out, resume=args.resume, force=args.force)
    print(f"done: {ckpt}")
    print(f"samples: {out / 'samples'}")
    return 0


def cmd_sample(args) -> int:
    from .sample import parse_seeds, sample_to_folder

    seeds = parse_seeds(args.seeds, args.n)
    meta = sample_to_folder(
        args.ckpt, args.out, seeds=seeds, sampler=args.sampler, steps=args.steps, grid=args.grid,
        eta=args.eta, order=args.order, eps_scale=args.eps_scale, use_ema=args.ema,
        batch_size=args.batch_size, device=args.device, legacy_pndm_index=args.legacy_pndm_index,
    )
    print(f"{meta['n_images']} images in {args.out} (sampler {args.sampler}, {args.steps} steps, "
          f"NFE {meta['nfe']}); grid: {Path(args.out) / 'grid.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2dm", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="YAML config, e.g. configs/digits.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 (repeatable)")
    t.add_argument("--out", help="run folder (default: runs/<config name>)")
    t.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from the run folder's newest checkpoint (default)")
    t.add_argument("--force", action="store_true", help="with --resume never: overwrite an existing run")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="write per-seed PNG samples from a checkpoint")
    s.add_argument("--ckpt", required=True, help="checkpoint file or run folder")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--sampler", default="ddim")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--grid", default="uniform", help="uniform | quad | trailing")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM η (0: deterministic)")
    s.add_argument("--order", type=int, default=3, help="DEIS order (0-3)")
    s.add_argument("--eps-scale", default=None,
                   help="ε-scaling control: a constant s (divide ε by s) or skip:9,tau:0.99")
    s.add_argument("--n", type=int, default=None, help="number of images (seeds 0..n-1)")
    s.add_argument("--seeds", default=None, help="seed range, e.g. 0-49999")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default) or the raw ones")
    s.add_argument("--device", default="auto")
    s.add_argument("--legacy-pndm-index", action="store_true",
                   help="the official PNDM code's ᾱ[t+1] pairing, to reproduce published numbers")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
