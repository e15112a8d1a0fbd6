"""Options shared by several commands, defined once and stacked with decorators."""

from __future__ import annotations

import click

trust_pickle = click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow loading pickled code from the model file. Only for files you trust: a pickle runs code.",
)
json_out = click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                        help="Also write the result as JSON to this file ('-' for stdout).")
force = click.option("--force", is_flag=True, help="Overwrite existing output files.")
