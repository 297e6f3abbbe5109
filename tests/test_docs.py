"""The README and docs/ say what the code does: their links resolve; every config key and flag
they name exists; the README's verb table is the CLI's verbs; configs.md names every shipped
config with its model's size; the sample synopsis lists the declared samplers and grids."""
import dataclasses
import functools
import re
from pathlib import Path

import pytest

from conftest import ROOT
from s2dm.cli import build_parser
from s2dm.core.unet import build_model, count_parameters
from s2dm.core.schedule import GRIDS
from s2dm.io.config import Config, load_config, shipped_configs
from s2dm.samplers import SAMPLERS
from s2dm.study.plan import run_config
from s2dm.study.spec import load_study

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks (a ``](x)`` in code is not a link)."""
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped (letters of any
    script, digits, ``-`` and ``_`` kept), spaces as ``-``."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return "".join(ch for ch in text if ch.isalnum() or ch in "-_ ").replace(" ", "-")


@functools.lru_cache(maxsize=None)  # a file's anchors, read once for all links to it
def anchors(path: Path) -> frozenset:
    found, seen = set(), {}
    for m in re.finditer(r"^#{1,6} (.+)$", prose(path), flags=re.M):
        s = slug(m.group(1))
        found.add(s if s not in seen else f"{s}-{seen[s]}")  # GitHub numbers repeated headings
        seen[s] = seen.get(s, 0) + 1
    return frozenset(found)


def test_slug_follows_githubs_rules():
    assert slug("GPU smoke test: `scripts/gpu_smoke.sh`") == "gpu-smoke-test-scriptsgpu_smokesh"
    assert slug("Sampling, FID and eval") == "sampling-fid-and-eval"
    assert slug("H1 — does each twin reproduce?") == "h1--does-each-twin-reproduce"


def test_every_relative_link_and_anchor_resolves():
    bad, count = [], 0
    for doc in DOCS:
        for target in LINK.findall(prose(doc)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            count += 1
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                bad.append(f"{doc.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{doc.relative_to(ROOT)}: {target}: no heading with that anchor")
    assert count > 50, count  # the docs link to each other: the pattern finds them
    assert not bad, "\n".join(bad)


FILE_SUFFIXES = (".py", ".yaml", ".ckpt", ".pt", ".npz", ".json", ".jsonl", ".png", ".md", ".safetensors")


def test_every_config_key_the_docs_name_exists():
    """`--set train.eval_every=200`, `optim.fused`, ... in prose and in code blocks: a key renamed
    in the code and not in the docs would send a user to an error."""
    sections = "|".join(f.name for f in dataclasses.fields(Config))
    key = re.compile(rf"(?<![\w./-])((?:{sections})\.[a-z_][a-z0-9_.]*)")  # not cfg.train.x, not a/data.py
    bad, count = [], 0
    for doc in DOCS:
        for name in key.findall(doc.read_text()):
            name = name.rstrip(".")
            if name.endswith(FILE_SUFFIXES):  # data.py, model.ckpt: files
                continue
            count += 1
            node = Config()
            for part in name.split("."):
                fields = {f.name for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else set()
                if part not in fields:
                    bad.append(f"{doc.relative_to(ROOT)}: {name}")
                    break
                node = getattr(node, part)
    assert count > 150, count  # 215 when written
    assert not bad, "keys the docs name that no config has:\n" + "\n".join(bad)


def test_the_readme_opens_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/study.sh --quick", "bash scripts/test.sh"]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("bash scripts/test.sh")  # CI runs the README's


def verbs() -> dict:
    """The CLI's verbs → their subparsers."""
    return next(a for a in build_parser()._actions if a.dest == "verb").choices


def test_the_readme_verb_table_is_the_clis_verbs():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Verbs", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `s2dm (\w+)` \|", table, flags=re.M)
    assert sorted(listed) == sorted(verbs())


def test_every_flag_the_docs_give_a_verb_exists():
    """`s2dm sample ... --n 1000`: each flag after ``s2dm VERB`` on a line (up to the end of its
    code span, a table cell or a shell comment) is one of that verb's flags."""
    parsers = verbs()
    known = {verb: {o for a in sp._actions for o in a.option_strings} for verb, sp in parsers.items()}
    bad, count = [], 0
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            for m in re.finditer(rf"\bs2dm ({'|'.join(parsers)})\b([^`|]*)", line):
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2).split(" #")[0]):
                    count += 1
                    if flag not in known[m.group(1)]:
                        bad.append(f"{doc.relative_to(ROOT)}: s2dm {m.group(1)} {flag}")
    assert count > 100, count  # 138 when written
    assert not bad, "flags the docs give that the verb does not have:\n" + "\n".join(bad)


def _size_column() -> dict:
    """configs.md's shipped-config table: file name → the model size its last column states."""
    rows = re.findall(r"^\| `(\w+\.yaml)` \|.*\| ([\d.]+) M params", (ROOT / "docs" / "configs.md").read_text(),
                      flags=re.M)
    return {name: float(size) for name, size in rows}


def test_configs_md_names_every_shipped_config():
    assert sorted(_size_column()) == sorted(p.name for p in shipped_configs())


@pytest.mark.parametrize("name", sorted(p.name for p in shipped_configs()))
def test_configs_md_states_each_models_size(name):
    stated = _size_column()[name]
    path = next(p for p in shipped_configs() if p.name == name)
    if name.startswith("study_"):
        study = load_study(path)
        cfg = run_config(study, study.runs[study.baseline], study.runs[study.baseline].seeds[0])
    else:
        cfg = load_config(path)
    millions = count_parameters(build_model(cfg)) / 1e6
    digits = len(str(stated).split(".")[1])  # "0.7" is to 0.1 M, "0.18" to 0.01 M
    assert round(millions, digits) == stated, f"{name}: {millions:.3f} M parameters, configs.md says {stated} M"


def test_the_sample_synopsis_lists_the_declared_samplers_and_grids():
    synopsis = (ROOT / "docs" / "sampling.md").read_text()
    assert re.search(r"\[--sampler ([\w|-]+)\]", synopsis).group(1).split("|") == list(SAMPLERS)
    assert re.search(r"\[--grid ([\w|-]+)\]", synopsis).group(1).split("|") == list(GRIDS)
