"""The subcommands of the ``robustlens`` CLI, one module each: :mod:`~robustlens.commands.init`,
:mod:`~robustlens.commands.info`, :mod:`~robustlens.commands.analyze`, :mod:`~robustlens.commands.robustness`,
:mod:`~robustlens.commands.export`, :mod:`~robustlens.commands.serve`; what they share (exit statuses, the
``--device`` / ``--workers`` / ``--quiet`` options, the device resolver, errors → exit status) is in
:mod:`~robustlens.commands.common`.

Each command module exposes ``add_parser(subparsers)``, which registers the subcommand and sets ``handler`` to a
function ``(args) -> exit status`` that raises errors for :func:`~robustlens.commands.common.run_handler` to map;
:func:`robustlens.cli.build_parser` calls every ``add_parser``. Importing a command module is cheap (no torch,
pandas or streamlit): handlers import the engine when they run.
"""
