"""fastshadow: a vhost-user proxy that keeps guest RAM away from the device backend."""

__version__ = "0.1.0"
