"""The options of one sampling run, declared once: ``SampleOptions``.

Every user of a sampler's options builds one ``SampleOptions`` and passes it on: ``s2dm
sample`` and ``s2dm eval`` generate their flags from its fields (cli.py), the config's
``sample:`` section inherits them (io/config.py ``SampleConfig``), and the training loop's
preview mosaics, ``sample_to_folder``, ``evaluate`` and the study's cells sample with it.
``validate`` is the one check of the options (``check_options``); its errors name the option
(``sampler: unknown sampler 'dimm'; ...``), or the config key with a prefix
(``sample.sampler: ...``).
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..errors import S2dmError
from . import DEFAULTS, GRIDS, ORDERS, SAMPLERS, check_options, eps_scale_label, parse_eps_scale, takes_order


@dataclass
class SampleOptions:
    """What defines a sampling run's images besides the weights and the seeds. ``help`` and
    ``choices`` in each field's metadata are what ``s2dm sample --help`` shows."""

    sampler: str = field(default=DEFAULTS["sampler"], metadata={
        "help": "the sampler (pndm = F-PNDM, NFE S+9; spndm = S-PNDM, NFE S+1; deis = tAB-DEIS, deis-rho = "
                "ρAB-DEIS; ddpm = ancestral DDPM steps)",
        "choices": SAMPLERS})
    steps: int = field(default=DEFAULTS["steps"], metadata={"help": "sampling steps S"})
    grid: str = field(default=DEFAULTS["grid"], metadata={"help": "timestep grid", "choices": GRIDS})
    eta: float = field(default=DEFAULTS["eta"], metadata={"help": "DDIM η (0: deterministic; ddim only)"})
    order: int = field(default=DEFAULTS["order"], metadata={"help": "DEIS order (deis, deis-rho)", "choices": ORDERS})
    eps_scale: Optional[str] = field(default=None, metadata={
        "help": "ε-scaling control: const:B or B (ε/B); linear:K,B (ε/(K·t+B)); skip:9,tau:0.99 (ε × the "
                "independent skip-step loss's shrink factor); skip:9,tau:0.99,variant:shared (ε × the "
                "shared variant's factor)"})
    legacy_pndm_index: bool = field(default=False, metadata={
        "help": "the official PNDM code's ᾱ[t+1] pairing, to reproduce published numbers"})

    @classmethod
    def of(cls, source: Any) -> "SampleOptions":
        """The options of anything that has them as attributes (a ``SampleConfig``, argparse's
        namespace), without its other fields."""
        return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})

    def as_dict(self) -> Dict[str, Any]:
        """The options as given (``eps_scale`` as its text), in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SampleOptions)}

    def as_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``samplers.sample``, ``check_options`` and ``generate``."""
        kwargs = self.as_dict()
        if isinstance(self.eps_scale, str):
            kwargs["eps_scale"] = parse_eps_scale(self.eps_scale)
        return kwargs

    def validate(self, schedule, prefix: str = "", quiet: bool = False) -> Dict[str, Any]:
        """Every check of the options against ``schedule`` (a ``NoiseSchedule``: the step
        count's range is T, η's bound is ᾱ's); SamplerError naming ``prefix`` + the option.
        Returns ``check_options``' info. ``quiet``: no warnings (a quad grid's collapsed
        points), for a check made up front that sampling repeats."""
        try:
            with warnings.catch_warnings():
                if quiet:
                    warnings.simplefilter("ignore")
                return check_options(schedule, **self.as_kwargs())
        except S2dmError as exc:
            if not prefix:
                raise
            raise exc.retold(f"{prefix}{exc}", key=f"{prefix}{exc.key}" if exc.key else None) from None

    def folder_name(self, use_ema: bool = True) -> str:
        """``ddim-20``, plus every setting that differs from its default (``ddim-20-quad-eta0.5``),
        so that two runs with different settings never share a folder. The ε-scale enters as
        its canonical label (``eps_scale_label``), ``:`` and ``,`` as ``_``, ``-`` as ``m``:
        ``ddim-20-epsskip_9_tau_0.99``, ``ddim-20-epsconst_1.005``, ``ddim-20-epslinear_1em5_1``."""
        default = SampleOptions()
        parts = [self.sampler, str(self.steps)]
        if self.grid != default.grid:
            parts.append(self.grid)
        if self.eta != default.eta:
            parts.append(f"eta{_shortest(self.eta)}")
        if takes_order(self.sampler) and self.order != default.order:
            parts.append(f"order{self.order}")
        if self.eps_scale:
            try:  # the canonical label: 1.005 and const:1.005 share a folder
                label = eps_scale_label(self.eps_scale)
            except S2dmError:  # invalid: validate() says so; the name stays total
                label = str(self.eps_scale)
            if label:  # "-" (a negative K or exponent) → "m", so that linear:-1e-5,1 ≠ linear:1e-5,1
                parts.append("eps" + re.sub(r"[^A-Za-z0-9.]+", "_", label.replace("-", "m")))
        if self.legacy_pndm_index:
            parts.append("legacy")
        if not use_ema:
            parts.append("noema")
        return "-".join(parts)


def _shortest(x: float) -> str:
    """``%g`` of ``x`` (0.5, 1) where it reads back as ``x``; else the digits that do
    (0.1234561 and 0.1234562 are both 0.123456 in %g)."""
    short = f"{x:g}"
    return short if float(short) == float(x) else repr(float(x))
