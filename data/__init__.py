"""The bundled data set (fsdd.h5), installed as package data of ``asyncsgd.bundled`` (see setup.py)."""
