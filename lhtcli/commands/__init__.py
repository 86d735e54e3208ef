"""One module per ``lht`` subcommand; :mod:`lhtcli.cli` registers them.

Keep module-level imports light (typer, pathlib, ``lhtcli.errors``, ``_common``): the CLI is imported
on every shell-completion Tab press. Import torch, the config models, matplotlib, wandb, ... inside
the command functions.
"""
