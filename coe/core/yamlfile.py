"""The one yaml loader of the project: every yaml ``coe`` reads (an experts yaml, an eval's
``recommended.yaml``, a pool's ``experts.yaml``, the skill vocabulary) goes through
``load_yaml``, which bounds what a file may cost before anything is built from it.

PyYAML's ``safe_load`` builds an alias as a second reference to the object it names, so a
"billion laughs" file (each anchor a list of ten aliases of the one before) loads quickly
into a small graph that *means* billions of values; whatever walks it as a tree (pydantic
validating a free mapping such as ``router.options``, a report dumping the pool) then spends
minutes and gigabytes in C code that no signal interrupts. So the document is composed first
(a graph of nodes, aliases shared), the number of values it stands for once every alias is
expanded is counted on that graph (each node once), and a file over ``MAX_VALUES`` (or one
whose alias refers to itself, which no tree can hold) is refused in one line, as is a file over
``MAX_BYTES``. Only then are Python objects constructed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from coe.core.errors import ConfigError

MAX_BYTES = 16 << 20  # a pool yaml is kilobytes; a generated one (recommended.yaml) too
MAX_VALUES = 250_000  # scalars, lists and mappings once every alias is expanded


class _Bounded(yaml.SafeLoader):
    """``SafeLoader`` that checks each composed document before constructing it."""

    source = "<yaml>"

    def construct_document(self, node):
        _check_expansion(node, self.source)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node, source: str) -> None:
    size: dict[int, int] = {}  # node id -> values it stands for (done)
    open_: set[int] = set()  # nodes whose children are being counted
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_.discard(key)
            if isinstance(node, yaml.MappingNode):
                kids = [n for pair in node.value for n in pair]
            else:
                kids = node.value
            total = 1 + sum(size[id(k)] for k in kids)
            if total > MAX_VALUES:
                raise ConfigError(f"{source}: the yaml stands for more than {MAX_VALUES:,} "
                                  f"values once its aliases are expanded (an alias bomb?)")
            size[key] = total
            continue
        if key in size:
            continue
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            size[key] = 1
            continue
        if key in open_:
            mark = node.start_mark
            raise ConfigError(f"{source}:{mark.line + 1}: an alias refers to the value that "
                              f"contains it (a yaml that never ends)")
        open_.add(key)
        stack.append((node, True))
        kids = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value)
        for kid in kids:
            if id(kid) in open_:
                mark = kid.start_mark
                raise ConfigError(f"{source}:{mark.line + 1}: an alias refers to the value "
                                  f"that contains it (a yaml that never ends)")
            if id(kid) not in size:
                stack.append((kid, False))


def load_yaml(text: str | bytes, source: str = "<yaml>"):
    """The one document of ``text`` (``source`` names it in errors), every problem one
    ``ConfigError`` line: invalid yaml (with its line), nested too deeply, too big."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source}: over {MAX_BYTES >> 20} MiB: a yaml that big is not a "
                          f"configuration")
    loader = _Bounded(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise ConfigError(f"{source}:{line}: invalid YAML: {e.problem}") from None
    except RecursionError:  # PyYAML composes and constructs nodes recursively
        raise ConfigError(f"{source}: yaml nested too deeply") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: undecodable bytes, a bad date
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path):
    """``load_yaml`` of a file, read only if it is a regular file of at most ``MAX_BYTES``."""
    p = Path(path)
    with open(p, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{p}: over {MAX_BYTES >> 20} MiB: a yaml that big is not a "
                          f"configuration")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid UTF-8 (byte {e.start + 1})") from None
    return load_yaml(text, str(p))
