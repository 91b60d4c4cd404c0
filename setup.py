# The cffi extension is declared here because setuptools reads cffi_modules
# only through setup(); everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder", "bench/build_loadgen.py:ffibuilder"])
