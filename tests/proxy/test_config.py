"""Proxy configuration: command line and TOML give the same ProxyConfig; bad values
are refused with a message that names them."""

import argparse

import pytest

from fastshadow.cli import _add_proxy_parser, build_proxy_config
from fastshadow.proxy.config import ConfigError, load_toml


def parse(*argv):
    parser = argparse.ArgumentParser()
    _add_proxy_parser(parser.add_subparsers(dest="command"))
    return build_proxy_config(parser.parse_args(["proxy", *argv]))


def test_data_plane_options_from_the_command_line():
    cfg = parse("--listen", "/tmp/a.sock", "--backend", "/tmp/b.sock", "--mode", "isolated")
    assert (cfg.busy_poll_us, cfg.stream_copy_min) == (200, 64 * 1024)   # the README's defaults
    cfg = parse("--listen", "/tmp/a.sock", "--backend", "/tmp/b.sock", "--mode", "isolated",
                "--busy-poll-us", "0", "--stream-copy-min", "0")
    assert (cfg.busy_poll_us, cfg.stream_copy_min) == (0, 0)


def test_data_plane_options_from_toml(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('stream_copy_min = 4096\n[[device]]\nname = "d0"\nlisten = "/tmp/a.sock"\n'
                 'backend = "/tmp/b.sock"\nmode = "isolated"\n')
    assert load_toml(f).stream_copy_min == 4096


def test_negative_stream_copy_min_is_refused(capsys):
    with pytest.raises(SystemExit) as e:  # not a size: argparse refuses it
        parse("--listen", "/tmp/a.sock", "--backend", "/tmp/b.sock", "--stream-copy-min", "-1")
    assert e.value.code == 2 and "--stream-copy-min: '-1' is not a size" in capsys.readouterr().err
