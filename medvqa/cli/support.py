"""What every `medvqa` command group shares: one-line errors, output, the database, and who is acting.

Every command module of medvqa/cli/ uses these; none imports the main command (medvqa/cli/__init__.py), which
registers them all.
"""

from __future__ import annotations

import functools
import getpass
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from medvqa.errors import MedVQAError
from medvqa.model.adapters import LoraSettings  # light: torch and PEFT load inside their functions
from medvqa.training.train import TrainSettings

if TYPE_CHECKING:
    from medvqa.services.audit import Actor
    from medvqa.services.database import Database


def _default(settings: Any, name: str) -> Any:
    """A settings dataclass's own default: declared once, there, and shown by --help from it."""
    return settings.__dataclass_fields__[name].default


# How to train: the options `medvqa train` and `medvqa rounds run` share, in --help order.
_TRAINING_OPTIONS = (
    click.option(
        "--epochs",
        type=click.FloatRange(min=0, min_open=True),
        default=_default(TrainSettings, "epochs"),
        show_default=True,
    ),
    click.option(
        "--max-steps",
        type=int,
        default=_default(TrainSettings, "max_steps"),
        show_default=True,
        help="Optimizer steps; -1: use --epochs.",
    ),
    click.option(
        "--lr",
        type=click.FloatRange(min=0, min_open=True),
        default=_default(TrainSettings, "learning_rate"),
        show_default=True,
    ),
    click.option(
        "--batch-size", type=click.IntRange(min=1), default=_default(TrainSettings, "batch_size"), show_default=True
    ),
    click.option("--seed", type=click.IntRange(min=0), default=_default(TrainSettings, "seed"), show_default=True),
    click.option(
        "--rank",
        type=click.IntRange(min=1),
        default=_default(LoraSettings, "r"),
        show_default=True,
        help="LoRA rank (alpha = 2 x rank).",
    ),
    click.option(
        "--gradient-checkpointing", is_flag=True, help="Trade about 30% speed for activation memory (7B bases)."
    ),
    click.option(
        "--quantize-4bit",
        is_flag=True,
        help="QLoRA: hold the base's language model in 4-bit NF4 (needs bitsandbytes: pip install 'medvqa[qlora]').",
    ),
)


class OneLineErrorGroup(click.Group):
    """Turns expected failures into one line on stderr and exit status 1 (also for a group run on its own)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MedVQAError as exc:
            fail(str(exc))
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own ways out (usage errors, --help, Ctrl+C) stay click's
        except Exception as exc:
            from medvqa.services.database import database_error

            message = database_error(exc)
            if message is None:
                raise
            fail(message)


def fail(message: str) -> NoReturn:
    click.echo(f"medvqa: error: {message}", err=True)
    sys.exit(1)


def emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(payload, indent=2, default=str) if as_json else text)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(func)


def training_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the shared training options; the command receives them as one `training` argument, a
    (TrainSettings, LoraSettings) pair, with invalid values refused in one line. A `train_vision` flag, where the
    command declares one, goes into the TrainSettings too."""

    @functools.wraps(func)
    def command(
        *args: Any,
        epochs: float,
        max_steps: int,
        lr: float,
        batch_size: int,
        seed: int,
        rank: int,
        gradient_checkpointing: bool,
        quantize_4bit: bool,
        train_vision: bool = False,
        **kwargs: Any,
    ) -> Any:
        try:
            settings = TrainSettings(
                epochs=epochs,
                learning_rate=lr,
                batch_size=batch_size,
                seed=seed,
                max_steps=max_steps,
                train_vision=train_vision,
                gradient_checkpointing=gradient_checkpointing,
                quantize_4bit=quantize_4bit,
            )
            lora = LoraSettings(r=rank, alpha=2 * rank)
        except ValueError as exc:
            raise MedVQAError(str(exc)) from None
        return func(*args, training=(settings, lora), **kwargs)

    for option in reversed(_TRAINING_OPTIONS):
        command = option(command)
    return command


def open_database(*, migrated: bool = True) -> Database:
    """The configured database; with `migrated`, checked to be at the schema this code expects."""
    from medvqa.services.database import open_database as open_configured

    return open_configured(migrated=migrated)


def operator() -> Actor:
    """The person at the command line. Shell access plus database credentials is administrative power,
    so the CLI acts as admin; the audit trail records the operating-system account."""
    from medvqa.services.audit import Actor

    return Actor(name=f"cli:{getpass.getuser()}", role="admin")


def read_password(prompt: str, *, confirm: bool = False) -> str:
    """A password from a hidden prompt (typed twice when `confirm`), or the first line of standard input when
    that is not a terminal; never from the command line."""
    if sys.stdin.isatty():
        return str(click.prompt(prompt, hide_input=True, confirmation_prompt=confirm))
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise MedVQAError("no password on standard input (give it on the first line)")
    return password


def user_option(who: str, *, required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The `--user` option of commands that act as a named account (`username` argument, MEDVQA_USER)."""
    default = "" if required else " Default: the operator."
    return click.option(
        "--user",
        "username",
        required=required,
        envvar="MEDVQA_USER",
        help=f"Account that acts ({who}); password from a prompt or stdin. Env: MEDVQA_USER.{default}",
    )


def signed_in(database: Database, username: str) -> Actor:
    """The named account, after its password (prompt, or the first line of standard input) matches."""
    from medvqa.config import load_settings
    from medvqa.services.users import LOCAL_SOURCE, ThrottleSettings, authenticate

    password = read_password(f"Password for {username}")
    return authenticate(database, username, password, LOCAL_SOURCE, ThrottleSettings.from_settings(load_settings()))


def study_line(row: dict[str, Any]) -> str:
    """One study as `medvqa studies list` prints it."""
    held = f" ({row['held']} held)" if row["held"] else ""
    counts = f"{row['series']} series, {row['instances']} instances{held}"
    return f"{row['id']:>5}  {row['modality']:<4} {row['body_part'] or '-':<10} {counts}  {row['study_uid']}"
