"""`medvqa rounds`: run a fine-tuning round, list rounds, compare a candidate with the live adapter, promote
(an ML engineer requests, an admin approves), roll back, and rerun a round from its record.

Registered on the main command in medvqa/cli/__init__.py. Running, promoting and rolling
back act as a named account (`--user` or MEDVQA_USER, password from a prompt or the first line of stdin), since
the audit trail and the two-person rule need to know who; listing and comparing act as the operator.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from medvqa.cli.support import OneLineErrorGroup, training_options, user_option
from medvqa.cli.support import emit as _emit
from medvqa.cli.support import json_option as _json_option
from medvqa.cli.support import open_database as _open_database
from medvqa.cli.support import operator as _operator
from medvqa.cli.support import signed_in as _signed_in

if TYPE_CHECKING:
    from medvqa.model.adapters import LoraSettings
    from medvqa.training.train import TrainSettings

_user_option = user_option("an ml_engineer or admin")


@click.group(cls=OneLineErrorGroup)
def rounds() -> None:
    """Fine-tuning rounds: reviewed feedback -> snapshot -> adapter -> compared with the live one -> promotion."""


@rounds.command("run")
@click.option("--since", "since_round", type=int, help="Only feedback decided after round ROUND froze its snapshot.")
@training_options
@_user_option
@_json_option
def run_command(
    since_round: int | None,
    training: tuple[TrainSettings, LoraSettings],
    username: str,
    as_json: bool,
) -> None:
    """Freeze reviewed feedback, train a candidate adapter, score it and the live adapter on the locked test set
    (MEDVQA_LOCKED_TEST_SET) and the round's validation split, and record the gate's decision."""
    from medvqa.config import load_settings
    from medvqa.services.rounds import RoundOptions, run_round

    train, lora = training
    options = RoundOptions(since_round=since_round, train=train, lora=lora)
    database = _open_database()
    actor = _signed_in(database, username)
    outcome = run_round(database, actor, load_settings(), options, progress=not as_json)
    overall = outcome.test["rows"][0]
    verdict = "passed" if outcome.gate_passed else "FAILED: " + "; ".join(outcome.gate_reasons)
    text = (
        f"round {outcome.round_id}: candidate adapter {outcome.adapter_id} ({outcome.adapter_sha256[:12]})\n"
        f"locked test set overall {100 * overall['candidate']:.1f}% vs live {100 * overall['live']:.1f}% "
        f"({100 * overall['delta']:+.1f} points); gate {verdict}"
    )
    closed = {side: kinds.get("closed") for side, kinds in outcome.calibration.items()}
    if closed.get("candidate") and closed.get("live"):
        text += (
            f"\nclosed-question calibration error (ECE) {closed['candidate']['ece']:.3f} "
            f"vs live {closed['live']['ece']:.3f}"
        )
    _emit(as_json, outcome.as_dict(), text)


@rounds.command("list")
@_json_option
def list_command(as_json: bool) -> None:
    """List rounds, newest first: snapshot size, candidate adapter and its status, gate, overall delta."""
    from medvqa.services.rounds import list_rounds

    rows = list_rounds(_open_database(), _operator())
    _emit(as_json, {"rounds": rows}, "\n".join(_round_line(row) for row in rows) or "no rounds")


def _round_line(row: dict[str, Any]) -> str:
    adapter = row["adapter"] or {}
    delta = row["test_overall"].get("delta")
    shown = "-" if delta is None else f"{100 * delta:+.1f} pts"
    return (
        f"{row['id']:>4}  {row['status']:<11} {row['dataset']['items']:>5} items  "
        f"adapter {adapter.get('id', '-')} ({adapter.get('status', '-')})  overall {shown}  {row['started_at'][:19]}"
    )


@rounds.command("compare")
@click.argument("round_id", type=int)
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), help="Folder for the PNG; default MEDVQA_HOME/reports."
)
@_json_option
def compare_command(round_id: int, out_dir: Path | None, as_json: bool) -> None:
    """The round's candidate against the adapter live when it ran: markdown tables (locked test set and validation:
    overall, closed, open, per question type and organ, bootstrap 95% intervals, McNemar) and a PNG chart."""
    from medvqa.config import load_settings
    from medvqa.services.rounds import compare_round

    folder = out_dir or load_settings().home / "reports"
    result = compare_round(_open_database(), _operator(), round_id, folder)
    payload = {"round": round_id, "chart": str(result.chart), "markdown": result.markdown, **result.data}
    _emit(as_json, payload, f"{result.markdown}\nchart: {result.chart}")


@rounds.command("promote")
@click.argument("adapter_id", type=int)
@click.option("--reason", default="", help="Why (required for a request, e.g. the comparison that supports it).")
@_user_option
@_json_option
def promote_command(adapter_id: int, reason: str, username: str, as_json: bool) -> None:
    """Promote a candidate in two steps by two people: an ML engineer requests it (only when its round passed the
    gate), then an admin other than the requester approves it and it goes live."""
    from medvqa.services import promotion
    from medvqa.services.rounds import request_round_promotion

    database = _open_database()
    actor = _signed_in(database, username)
    if actor.role == "admin":
        promotion.approve_promotion(database, actor, adapter_id)
        step, text = "approved", f"adapter {adapter_id} is live (approved by {actor.name})"
    else:
        request_round_promotion(database, actor, adapter_id, reason)
        step, text = "requested", f"promotion of adapter {adapter_id} requested; an admin must approve it"
    _emit(as_json, {"adapter_id": adapter_id, "step": step, "by": actor.name}, text)


@rounds.command("rollback")
@click.option("--reason", required=True, help="Why the live adapter is withdrawn.")
@_user_option
@_json_option
def rollback_command(reason: str, username: str, as_json: bool) -> None:
    """Retire the live adapter and bring back the one it replaced (or the bare base model), in one step."""
    from medvqa.services import promotion

    database = _open_database()
    restored = promotion.rollback(database, _signed_in(database, username), reason)
    now = f"adapter {restored}" if restored is not None else "the base model (no adapter)"
    _emit(as_json, {"restored": restored}, f"rolled back: answers now come from {now}")


@rounds.command("reproduce")
@click.argument("round_id", type=int)
@_user_option
@_json_option
def reproduce_command(round_id: int, username: str, as_json: bool) -> None:
    """Train the round again from its frozen data and recorded settings; exit 1 unless the adapter hash matches."""
    from medvqa.config import load_settings
    from medvqa.services.round_reproduce import reproduce_round

    database = _open_database()
    actor = _signed_in(database, username)
    report = reproduce_round(database, actor, load_settings(), round_id, progress=not as_json)
    same = "the same adapter" if report["same_adapter"] else "a DIFFERENT adapter"
    hashes = f"{report['rerun_sha256'][:12]}, recorded {str(report['recorded_sha256'])[:12]}"
    text = f"round {round_id}: rerun gives {same} ({hashes})"
    text += "".join(f"\n{key} differs: {value}" for key, value in report["environment_differences"].items())
    _emit(as_json, report, text)
    if not report["same_adapter"]:
        sys.exit(1)
