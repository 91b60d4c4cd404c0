"""The bcc programs of `fastshadow trace` (hops.bpf.c), shipped as package data.

This is the repository's bpf/ folder, installed as fastshadow.trace.bpf
(pyproject.toml maps it); fastshadow.trace.environment.probe_program() finds
the program with importlib.resources in a source tree and in a wheel alike.
"""
