"""Turning diagnostics into pictures (matplotlib, Agg) and terminal tables (Rich).

Import the submodules directly: ``lhtcli.render.figures`` imports matplotlib only inside its
functions, ``lhtcli.render.tables`` needs only Rich.
"""
