"""The parts of fastshadow and the imports allowed between them, as ARCHITECTURE.md states them.

The `arrows` block of ARCHITECTURE.md is the rule; this test reads it, finds
every installed module from pyproject.toml (packages and package-dir, so
bench/ is fastshadow.bench and bpf/ is fastshadow.trace.bpf), walks each
module's imports with `ast` (imports inside functions too, relative imports
resolved) and names file:line of every import the page does not allow. The
standard library is always allowed; any other package must be listed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOT_PACKAGE = "fastshadow"


def read_arrows(text: str) -> dict[str, set[str]]:
    """The ```arrows block: `part -> target, target` lines (`#` starts a comment)."""
    lines = text.splitlines()
    try:
        start = lines.index("```arrows") + 1
        end = lines.index("```", start)
    except ValueError:
        raise AssertionError("ARCHITECTURE.md has no ```arrows block") from None
    arrows: dict[str, set[str]] = {}
    for n, line in enumerate(lines[start:end], start + 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        part, sep, targets = line.partition("->")
        part = part.strip()
        assert sep and part, f"ARCHITECTURE.md:{n}: want `part -> target, ...`, got {line!r}"
        assert part not in arrows, f"ARCHITECTURE.md:{n}: {part} listed twice"
        arrows[part] = {t.strip() for t in targets.split(",") if t.strip()}
    for part, targets in arrows.items():
        unknown = {t for t in targets if t.split(".")[0] == ROOT_PACKAGE and t not in arrows}
        assert not unknown, f"ARCHITECTURE.md: {part} -> {', '.join(sorted(unknown))}: not a part of the page"
    return arrows


def part_of(module: str, parts) -> str | None:
    """The part a fastshadow module belongs to: the longest part naming it or a package above it.
    The root package's part is its __init__ alone (fastshadow.__version__)."""
    if module == ROOT_PACKAGE:
        return ROOT_PACKAGE if ROOT_PACKAGE in parts else None
    best = None
    for part in parts:
        if part != ROOT_PACKAGE and (module == part or module.startswith(part + ".")):
            if best is None or len(part) > len(best):
                best = part
    return best


def package_dirs() -> dict[str, Path]:
    """Each package pyproject.toml installs, and the folder it comes from (setuptools' package-dir rule)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg.get("package-dir", {})
    out = {}
    for pkg in cfg["packages"]:
        # The longest mapped package at or above pkg decides; the rest of the name is folders below it.
        names = pkg.split(".")
        for i in range(len(names), -1, -1):
            head = ".".join(names[:i])
            if head in mapping or i == 0:
                base = ROOT / mapping.get(head, "")
                out[pkg] = base.joinpath(*names[i:])
                break
    return out


@dataclass
class Import:
    path: Path
    line: int
    source: str   # the importing module
    target: str   # the module imported (resolved)


def module_imports(module: str, path: Path, is_package: bool, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    here = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(path, node.lineno, module, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for a in node.names:
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
                sub = f"{origin}.{a.name}"
                out.append(Import(path, node.lineno, module, sub if sub in known else origin))
    return out


def all_modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for pkg, folder in package_dirs().items():
        for f in sorted(folder.glob("*.py")):
            is_package = f.name == "__init__.py"
            modules[pkg if is_package else f"{pkg}.{f.stem}"] = (f, is_package)
    return modules


def violations(arrows: dict[str, set[str]], modules: dict[str, tuple[Path, bool]]) -> list[str]:
    known = set(all_modules()) | set(modules) | set(arrows)
    stdlib = sys.stdlib_module_names
    errors = []
    for module, (path, is_package) in sorted(modules.items()):
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        source = part_of(module, arrows)
        if source is None:
            errors.append(f"{rel}:1: module {module} is in no part of ARCHITECTURE.md's arrows block")
            continue
        for imp in module_imports(module, path, is_package, known):
            top = imp.target.split(".")[0]
            if top == ROOT_PACKAGE:
                target = part_of(imp.target, arrows)
                if target is None:
                    errors.append(f"{rel}:{imp.line}: imports {imp.target}, which is in no part of ARCHITECTURE.md")
                    continue
            elif top in stdlib:
                continue
            else:
                target = top  # a third-party package: listed by its top-level name
            if target != source and target not in arrows[source]:
                errors.append(f"{rel}:{imp.line}: {source} imports {imp.target} ({target}); ARCHITECTURE.md "
                              f"allows {source} -> {', '.join(sorted(arrows[source])) or 'the standard library only'}")
    return errors


def test_every_import_follows_the_arrows():
    arrows = read_arrows((ROOT / "ARCHITECTURE.md").read_text())
    errors = violations(arrows, all_modules())
    assert not errors, "imports ARCHITECTURE.md forbids:\n" + "\n".join(errors)


def test_every_package_on_disk_is_installed():
    """A package folder missing from pyproject.toml's list would be left out of the wheel
    (and out of the walk above)."""
    listed = {d.resolve() for d in package_dirs().values()}
    missing = []
    for folder in listed:
        for init in folder.rglob("__init__.py"):
            if init.parent.resolve() not in listed:
                missing.append(str(init.parent.relative_to(ROOT)))
    assert not missing, f"package folders not in pyproject.toml [tool.setuptools] packages: {sorted(missing)}"


def test_a_forbidden_import_is_named(tmp_path):
    """The check itself: a planted `import fastshadow.guest` in the proxy is reported with file:line."""
    arrows = read_arrows((ROOT / "ARCHITECTURE.md").read_text())
    planted = tmp_path / "server.py"
    planted.write_text("import os\n\n\ndef f():\n    from ..guest import qsd\n    import fastshadow.bench\n")
    modules = {"fastshadow.proxy.server": (planted, False)}
    errors = violations(arrows, modules)
    assert len(errors) == 2, errors
    assert ":5: fastshadow.proxy imports fastshadow.guest.qsd (fastshadow.guest)" in errors[0]
    assert ":6: fastshadow.proxy imports fastshadow.bench (fastshadow.bench)" in errors[1]
    errors = violations(arrows, {"fastshadow.newpart": (planted, False)})
    assert errors and "module fastshadow.newpart is in no part" in errors[0]


def test_the_proxy_command_loads_no_test_bed(tmp_path):
    """The CLI imports the tracer, the benchmark, the demo and the test guest only for their own
    subcommand: `fastshadow proxy` (here its --help) loads none of them."""
    code = ("import sys\nfrom fastshadow.cli import main\ntry:\n    main(['proxy', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(' '.join(m for m in sys.modules if m.startswith('fastshadow')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, check=True)
    loaded = set(r.stdout.split("\n")[-2].split())
    assert "fastshadow.proxy.config" in loaded
    for part in ("fastshadow.trace", "fastshadow.bench", "fastshadow.demo", "fastshadow.guest"):
        assert not {m for m in loaded if m == part or m.startswith(part + ".")}, f"{part} loaded: {sorted(loaded)}"
