"""QEMU's vhost-user backend program conventions (docs/interop/vhost-user.rst,
"Backend program conventions"; the schema is docs/interop/vhost-user.json).

A backend program takes `--socket-path=PATH` or `--fd=FDNUM` as its socket,
prints its capabilities as JSON on `--print-capabilities`, does not daemonize
and ends quickly on SIGTERM; `fastshadow proxy` does all of that (cli.py,
server.py). Management software (libvirt) finds backend programs through
JSON descriptors, one per program and device type, in
/usr/share/qemu/vhost-user (packages), /etc/qemu/vhost-user (the
administrator) or $XDG_CONFIG_HOME/qemu/vhost-user, sorted by file name.

A descriptor names a binary, and a binary run with only the convention's
options must know its device type and where its real backend is. So each
descriptor points at a small launcher script written next to it, which runs
`fastshadow proxy --device TYPE [the options given at install time] "$@"`:
what the installer passed (e.g. `--backend /run/qsd/disk0.sock`) applies to
the device that QEMU's `--socket-path`/`--fd` then starts.

virtio-fs is different: libvirt takes the first `fs` descriptor for every
`<filesystem>` without a `<binary>` and runs its binary with virtiofsd's own
options (`--fd=N -o source=DIR,...`, src/qemu/qemu_vhost_user.c and
qemu_virtiofs.c), so the fs launcher runs `fastshadow run --device fs
[options] -- VIRTIOFSD "$@"`: fastshadow in front of a virtiofsd it starts
itself (the options must then say --backend-user, not --backend).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from .. import devices

DESCRIPTOR_HELP = """\
Write one QEMU vhost-user backend descriptor (DIR/50-fastshadow-TYPE.json) and
one launcher script (fastshadow-vhost-user-TYPE, the descriptor's binary) per
device type. The launcher runs `fastshadow proxy --device TYPE ARGS "$@"`: QEMU
or libvirt adds --socket-path=PATH or --fd=N (or --print-capabilities), and ARGS
(--proxy-args) say where the real backend is. The fs launcher instead runs
`fastshadow run --device fs ARGS -- VIRTIOFSD "$@"`: libvirt starts it for every
<filesystem> without <binary>, with virtiofsd's options, and fastshadow starts
virtiofsd behind itself (ARGS: --backend-user USER, --backend-userns, ...).

examples:
  fastshadow install-descriptors /usr/share/qemu/vhost-user --launcher-dir /usr/libexec/fastshadow
  fastshadow install-descriptors /etc/qemu/vhost-user --device blk \\
      --proxy-args "--backend /run/qsd/disk0.sock"
  fastshadow install-descriptors /etc/qemu/vhost-user --device fs \\
      --proxy-args "--proxy-user fastshadow --backend-user fs-backend --backend-userns"
"""


class DescriptorError(ValueError):
    """A descriptor cannot be written; the message says which and why."""


def qemu_type(device: str) -> str:
    """QEMU's VHostUserBackendType of a fastshadow device type; ValueError if it has none."""
    try:
        kind = devices.kind(device)
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None
    if kind.qemu_type is None:
        raise ValueError(f"--device {kind.name}: QEMU's vhost-user conventions have no type for it")
    return kind.qemu_type


def capabilities(device: str, mode: str = "isolated") -> str:
    """`--print-capabilities`: {"type": ..., "features": [...]} (VHostUserBackendCapabilities).
    The features the schema defines (block: read-only, blk-file; gpu: render-node, virgl; input:
    evdev-path, no-grab) are options of the real backend, not of fastshadow: none is claimed.
    ValueError for a type fastshadow would refuse in `mode` (gpu, balloon when isolated): QEMU
    must not be told it can use it."""
    kind = devices.kind(device) if device in devices.names() else None
    if kind is not None and mode == "isolated" and kind.refused:
        raise ValueError(f"--device {kind.name} is refused in isolated mode ({kind.refused}); "
                         f"--mode direct forwards it without isolation")
    return json.dumps({"type": qemu_type(device), "features": []}, indent=2)


def descriptor(device: str, binary: str) -> dict:
    """A VhostUserBackend document for `device` served by `binary`."""
    kind = devices.kind(device)
    return {
        "description": f"fastshadow: {kind.title} with guest RAM kept away from the backend (isolated proxy)",
        "type": qemu_type(device),
        "binary": binary,
        "tags": ["fastshadow", "isolated"],
    }


def default_command() -> list[str]:
    """How the launchers start fastshadow: its console script next to this Python if there is
    one, else this Python with -m (an absolute path either way: launchers run from anywhere)."""
    script = Path(sys.executable).with_name("fastshadow")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "fastshadow.cli"]


#: Where virtiofsd lives: QEMU 7.2's C one (Debian 12), the Rust one (Debian 13, Fedora).
VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "virtiofsd")


def fs_launcher_text(command: list[str], proxy_args: list[str], virtiofsd: str) -> str:
    argv = " ".join(shlex.quote(a) for a in [*command, "run", "--device", "fs", *proxy_args, "--", virtiofsd])
    return ("#!/bin/sh\n"
            "# virtio-fs through fastshadow: libvirt runs this with virtiofsd's options (--fd=N -o source=DIR,...)\n"
            "# or --print-capabilities; fastshadow takes --fd=N and starts virtiofsd with the rest.\n"
            "# Written by `fastshadow install-descriptors`.\n"
            f"exec {argv} \"$@\"\n")


def launcher_text(device: str, command: list[str], proxy_args: list[str]) -> str:
    kind = devices.kind(device)
    argv = " ".join(shlex.quote(a) for a in [*command, "proxy", "--device", kind.name, *proxy_args])
    return (f"#!/bin/sh\n"
            f"# {kind.title} through fastshadow: a vhost-user backend program (QEMU's conventions).\n"
            f"# QEMU or libvirt adds --socket-path=PATH or --fd=N, or --print-capabilities.\n"
            f"# Written by `fastshadow install-descriptors`; the options before \"$@\" apply to that socket.\n"
            f"exec {argv} \"$@\"\n")


def install(dir: str | os.PathLike, *, launcher_dir: str | os.PathLike | None = None,
            types: list[str] | None = None, proxy_args: str = "", fastshadow: str | None = None,
            force: bool = False, virtiofsd: str | None = None) -> list[Path]:
    """Write the descriptors and launchers; returns the paths written."""
    out = Path(dir)
    ldir = Path(launcher_dir) if launcher_dir is not None else out
    names = types or [d.name for d in devices.DEVICES if d.qemu_type is not None and d.refused is None]
    kinds = []
    for name in names:
        try:
            kind = devices.kind(name)
            qemu_type(name)
        except (KeyError, ValueError) as e:
            raise DescriptorError(str(e.args[0]) if isinstance(e, KeyError) else str(e)) from None
        if kind.refused:
            raise DescriptorError(f"{name}: isolated mode cannot serve it ({kind.refused})")
        kinds.append(kind)
    try:
        extra = shlex.split(proxy_args)
    except ValueError as e:
        raise DescriptorError(f"--proxy-args {proxy_args!r}: {e}") from None
    command = shlex.split(fastshadow) if fastshadow else default_command()
    if not Path(command[0]).is_absolute():
        found = shutil.which(command[0])
        if found is None:
            raise DescriptorError(f"--fastshadow {command[0]!r}: not found on PATH (give an absolute path)")
        command[0] = found
    if any(k.name == "fs" for k in kinds):
        if {"--backend", "--backend-listen"} & {a.split("=", 1)[0] for a in extra}:
            raise DescriptorError("fs: libvirt runs the fs descriptor's binary with virtiofsd's options, so it starts "
                                  "virtiofsd itself through `fastshadow run`: give --proxy-args '--backend-user USER "
                                  "...' for it, not --backend (install fs apart with --device fs, or leave it out)")
        found = next(filter(None, (shutil.which(c) for c in ([virtiofsd] if virtiofsd else VIRTIOFSD_CANDIDATES))),
                     None)
        if found is None:
            raise DescriptorError(f"fs: virtiofsd {'%r ' % virtiofsd if virtiofsd else ''}not found (--virtiofsd PATH; "
                                  f"Debian: qemu-system-common or virtiofsd)")
        virtiofsd = os.path.abspath(found)
    plan = []
    for kind in kinds:
        launcher = (ldir / f"fastshadow-vhost-user-{kind.name}").absolute()
        desc = out / f"50-fastshadow-{kind.name}.json"
        text = (fs_launcher_text(command, extra, virtiofsd) if kind.name == "fs"
                else launcher_text(kind.name, command, extra))
        plan += [(launcher, text, 0o755),
                 (desc, json.dumps(descriptor(kind.name, str(launcher)), indent=2) + "\n", 0o644)]
    if not force:
        existing = [str(p) for p, _, _ in plan if p.exists()]
        if existing:
            raise DescriptorError(f"{', '.join(existing)} already exist(s); --force replaces")
    written = []
    try:
        for path, text, mode in plan:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
            written.append(path)
    except OSError as e:
        raise DescriptorError(f"cannot write {e.filename or out}: {e.strerror}") from None
    return written
