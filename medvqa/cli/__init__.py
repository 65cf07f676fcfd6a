"""The `medvqa` command: the same services as the workbench, for operators and scripts.

One module per command group (database, users, studies, model, answers, app, audit, rounds, pacs), all thin
shells over medvqa/services (tests/test_import_boundaries.py keeps them away from SQLAlchemy and medvqa.db);
what they share is in support.py. Heavy libraries are imported inside commands so that `medvqa --help` stays
fast. Expected failures print one line (`medvqa: error: ...`) and exit non-zero; `--json` prints
machine-readable output.
"""

from __future__ import annotations

import click

from compliance.policy import DEMO_PASSWORD
from medvqa.cli.support import OneLineErrorGroup

__all__ = ["DEMO_PASSWORD", "DEMO_USERS", "main"]


@click.group(name="medvqa", cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medvqa")
def main() -> None:
    """Medical visual question answering: DICOM studies, a LoRA-tuned vision-language model,
    reviewed feedback, and an audited database.

    Configuration comes from MEDVQA_* environment variables (MEDVQA_HOME, MEDVQA_DATABASE_URL, ...)
    and an optional TOML file named by MEDVQA_CONFIG.
    """


def _register() -> None:
    """Every command module imports click and the shared pieces only; torch and the PACS libraries load when a
    command that needs them runs."""
    from medvqa.cli import answers, app, audit, database, model, pacs, rounds, studies, users

    for command in (
        database.db,
        users.users,
        studies.import_command,
        studies.store,
        studies.studies,
        model.eval_command,
        model.calibrate_command,
        model.train_command,
        answers.ask_command,
        answers.feedback_command,
        app.workbench_command,
        app.demo,
        audit.audit,
        rounds.rounds,
        pacs.pacs,
        pacs.listen_command,
    ):
        main.add_command(command)


_register()

from medvqa.cli.app import DEMO_USERS  # noqa: E402 - after the commands: the demo's accounts, for tests and docs
