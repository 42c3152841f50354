"""Subcommands of the ``robustlens`` CLI that live in their own modules.

Each module exposes ``add_parser(subparsers)``, which registers the subcommand and sets ``handler`` to a
function ``(args) -> exit status``; :mod:`robustlens.cli` calls it from ``build_parser``.
"""
