"""YAML as s2dm reads and writes it (configs, study YAMLs, ``--set`` values): YAML 1.2's numbers
and no key given twice in one mapping. PyYAML alone reads YAML 1.1 and keeps the last of a
repeated key, so a seed, a step count or a study's run could change or vanish in silence."""
from __future__ import annotations

import re
from typing import Any

import yaml

_INT, _FLOAT, _MERGE = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:merge"
_DIGITS = "[0-9]+(?:_[0-9]+)*"  # Python's digit groups: 800_000 is a number, as in YAML 1.1


class RepeatedKey(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _Loader(yaml.SafeLoader):
    """The numbers of YAML 1.2's core schema (and Python's digit groups, 800_000): ``010`` is
    10 and ``2e3`` 2000.0, where PyYAML's YAML 1.1 reads 8 (octal), 90 for ``1:30`` (base 60),
    1024 for ``0x400`` and the text "2e3" (no dot)."""

    def construct_document(self, node: yaml.Node):
        _check_keys(self, node)
        return super().construct_document(node)


class _Dumper(yaml.SafeDumper):
    """Writes YAML that ``_Loader`` reads back: text that it would read as a number (a
    ``data.root`` named 2e3) is quoted."""


for _yaml in (_Loader, _Dumper):
    _yaml.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    _yaml.add_implicit_resolver(_INT, re.compile(rf"^[-+]?{_DIGITS}$"), list("-+0123456789"))
    _yaml.add_implicit_resolver(
        _FLOAT,
        re.compile(rf"^(?:[-+]?(?:\.{_DIGITS}|{_DIGITS}(?:\.(?:{_DIGITS})?)?)(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+.0123456789"))
_Loader.add_constructor(_INT, lambda loader, node: int(loader.construct_scalar(node)))


def _check_keys(loader: _Loader, root: yaml.Node) -> None:
    """Every mapping of the document, merge sources included, gives each key once. Checked on
    the composed nodes, before construction flattens merges (``<<: *anchor``), whose keys a
    mapping may give again to override them."""
    done, todo = set(), [root]
    while todo:
        node = todo.pop()
        if id(node) in done:
            continue
        done.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                todo += [key_node, value_node]
                if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = loader.construct_object(key_node)
                if key in seen:
                    raise RepeatedKey(None, None, f"the key {key!r} is given twice in one section",
                                      key_node.start_mark)
                seen.add(key)


def load_yaml(text: str) -> Any:
    """YAML text as s2dm reads it (``yaml.YAMLError`` on bad YAML, ``RepeatedKey`` among them)."""
    return yaml.load(text, Loader=_Loader)


def dump_yaml(data: Any) -> str:
    """``data`` as YAML text that ``load_yaml`` reads back as it is, keys in their order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
