"""Layering of the C data plane (csrc/README.md, "Layers").

Every `#include "x.h"` line of a csrc/*.c or csrc/*.h file is an arrow from
the file's module to module x (loop.c and loop.h are both module loop).  The
arrows must form no cycle and must never point to a module above the file's
own in LAYERS, which mirrors the README's table (lowest first)."""

import pathlib
import re

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"

#: Lowest first, as in the table of csrc/README.md.
LAYERS = ["fsdp", "version", "probes", "base", "hist", "vring", "copy", "events", "guard", "iotlb", "mem", "log",
          "chain", "fail", "bounce", "shadow", "queue", "loop", "device"]

INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)


def module_of(name: str) -> str:
    return pathlib.PurePath(name).stem


def includes(root: pathlib.Path) -> list[tuple[str, str]]:
    """(file, included header) for every quoted include of root/*.c and root/*.h."""
    files = sorted([*root.glob("*.c"), *root.glob("*.h")])
    return [(f.name, inc) for f in files for inc in INCLUDE.findall(f.read_text())]


def graph_of(edges: list[tuple[str, str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for f, inc in edges:
        src, dst = module_of(f), module_of(inc)
        graph.setdefault(src, set())
        graph.setdefault(dst, set())
        if src != dst:
            graph[src].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}      # absent: unseen, 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def violations(root: pathlib.Path, layers: list[str]) -> list[str]:
    """Everything wrong with root's includes against layers, one line each."""
    edges = includes(root)
    rank = {m: i for i, m in enumerate(layers)}
    out = []
    for f in sorted({f for f, _ in edges} | {p.name for p in root.glob("*.[ch]")}):
        if module_of(f) not in rank:
            out.append(f"{f}: module {module_of(f)!r} has no layer in the list")
    for f, inc in edges:
        src, dst = module_of(f), module_of(inc)
        if not (root / inc).is_file():
            out.append(f"{f}: includes {inc}, which is not in {root.name}/")
        elif dst in rank and src in rank and rank[dst] > rank[src]:
            out.append(f"{f}: includes {inc}, but {dst} is above {src}")
    cycle = find_cycle(graph_of(edges))
    if cycle:
        out.append("cycle: " + " -> ".join(cycle))
    return out


def readme_layers() -> list[tuple[str, set[str]]]:
    """(module, modules it may include) for each row of the README's layer table."""
    text = (CSRC / "README.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            allowed = {m.strip() for m in cells[3].split(",")} - {"-", ""}
            rows.append((cells[1], allowed))
    return rows


def test_csrc_follows_the_layers():
    found = violations(CSRC, LAYERS)
    assert not found, "\n".join(found)


def test_the_list_mirrors_the_readme():
    assert [m for m, _ in readme_layers()] == LAYERS


def test_the_readme_names_every_arrow():
    allowed = dict(readme_layers())
    missing = [f"{f}: {inc}" for f, inc in includes(CSRC)
               if module_of(inc) != module_of(f) and module_of(inc) not in allowed.get(module_of(f), set())]
    assert not missing, "arrows missing from the README's 'may include' column:\n" + "\n".join(missing)


def _tree(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, includes_ in files.items():
        (tmp_path / name).write_text("".join(f'#include "{i}"\n' for i in includes_.split()))
    return tmp_path


def test_the_check_sees_an_upward_include(tmp_path):
    root = _tree(tmp_path, {"low.h": "", "low.c": "low.h high.h", "high.h": "low.h"})
    assert violations(root, ["low", "high"]) == ["low.c: includes high.h, but high is above low",
                                                 "cycle: high -> low -> high"]


def test_the_check_sees_a_cycle_and_unknowns(tmp_path):
    root = _tree(tmp_path, {"a.h": "b.h", "b.h": "c.h", "c.h": "a.h", "d.c": "gone.h"})
    found = violations(root, ["a", "b", "c"])
    assert "d.c: module 'd' has no layer in the list" in found
    assert "d.c: includes gone.h, which is not in " + root.name + "/" in found
    assert "cycle: a -> b -> c -> a" in found
