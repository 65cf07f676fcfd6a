"""`medvqa users`: accounts, roles, lockouts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from medvqa.cli.support import emit as _emit
from medvqa.cli.support import json_option as _json_option
from medvqa.cli.support import open_database as _open_database
from medvqa.cli.support import operator as _operator
from medvqa.cli.support import read_password

if TYPE_CHECKING:
    pass


@click.group()
def users() -> None:
    """Manage user accounts (roles: clinician, reviewer, ml_engineer, auditor, admin)."""


@users.command("add")
@click.argument("name")
@click.option("--role", required=True, help="clinician, reviewer, ml_engineer, auditor or admin.")
@click.option("--display-name", default="", help="Name shown in the workbench and the audit trail.")
@_json_option
def users_add(name: str, role: str, display_name: str, as_json: bool) -> None:
    """Add the account NAME. The password is read from a prompt, or from the first line of standard
    input when it is not a terminal; never from the command line."""
    from medvqa.services.users import add_user

    database = _open_database()
    user = add_user(database, _operator(), name, read_password("Password", confirm=True), role, display_name)
    _emit(as_json, {"id": user.id, "username": user.username, "role": role}, f"added {user.username} ({role})")


@users.command("list")
@_json_option
def users_list(as_json: bool) -> None:
    """List accounts, their roles, and whether they are disabled or locked."""
    from medvqa.config import load_settings
    from medvqa.services.users import list_users

    rows = list_users(_open_database(), _operator(), load_settings())

    def line(row: dict[str, Any]) -> str:
        state = "active" if row["active"] else "disabled"
        if row["locked_until"]:
            state += f", locked until {row['locked_until']}"
        return f"{row['id']:>4}  {row['username']:<24} {row['role']:<12} {state}"

    _emit(as_json, {"users": rows}, "\n".join(line(r) for r in rows) or "no users")


@users.command("disable")
@click.argument("name")
def users_disable(name: str) -> None:
    """Disable the account NAME: it cannot sign in, and its open workbench sessions end at their next request."""
    from medvqa.services.users import set_active

    set_active(_open_database(), _operator(), name, active=False)
    click.echo(f"disabled {name}; its workbench sessions end at their next request")


@users.command("enable")
@click.argument("name")
def users_enable(name: str) -> None:
    """Enable the account NAME again."""
    from medvqa.services.users import set_active

    set_active(_open_database(), _operator(), name, active=True)
    click.echo(f"enabled {name}")


@users.command("role")
@click.argument("name")
@click.argument("role")
def users_role(name: str, role: str) -> None:
    """Give the account NAME the role ROLE; its open workbench sessions end at their next request."""
    from medvqa.services.users import change_role

    change_role(_open_database(), _operator(), name, role)
    click.echo(f"{name} is now {role}; its workbench sessions end at their next request")


@users.command("unlock")
@click.argument("name")
def users_unlock(name: str) -> None:
    """Lift the lockout of NAME after too many failed sign-ins."""
    from medvqa.services.users import unlock

    unlock(_open_database(), _operator(), name)
    click.echo(f"unlocked {name}")
