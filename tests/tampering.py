"""Ways an insider with database access might alter an audit chain, applied to a list of events.

Each function returns the altered list and the sequence number verification must name first.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from compliance.audit_chain import GENESIS_HASH, ChainEvent, compute_hash

Events = list[ChainEvent]
Tamper = Callable[[Events, random.Random], tuple[Events, int]]


def build_chain(n: int, rng: random.Random) -> Events:
    events: Events = []
    prev = GENESIS_HASH
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for seq in range(1, n + 1):
        event = ChainEvent(
            seq=seq,
            ts=start + timedelta(seconds=seq, microseconds=rng.randrange(10**6)),
            actor_user_id=rng.choice([None, 1, 2, 3]),
            actor_name=rng.choice(["dr.a", "rev.b", "cli:root"]),
            actor_role=rng.choice(["clinician", "reviewer", "admin"]),
            action=rng.choice(["answer:feedback:create", "user:account:create", "answer:question:ask"]),
            object_type="feedback",
            object_id=str(rng.randrange(1000)),
            outcome=rng.choice(["success", "denied", "failed"]),
            details={"n": rng.randrange(100), "text": rng.choice(["ok", "Ünïcode ✓", ""])},
            prev_hash=prev,
        )
        event = dataclasses.replace(event, hash=compute_hash(event))
        events.append(event)
        prev = event.hash
    return events


def rehash_from(events: Events, start_index: int) -> Events:
    """Recompute every hash from `start_index` on, as an insider rewriting the chain would."""
    out = list(events[:start_index])
    prev = out[-1].hash if out else GENESIS_HASH
    for event in events[start_index:]:
        fixed = dataclasses.replace(event, prev_hash=prev, hash="")
        fixed = dataclasses.replace(fixed, hash=compute_hash(fixed))
        out.append(fixed)
        prev = fixed.hash
    return out


def _altered(event: ChainEvent, rng: random.Random) -> ChainEvent:
    field = rng.choice(["actor_name", "outcome", "details", "ts", "object_id", "action"])
    new = {
        "actor_name": event.actor_name + "x",
        "outcome": "success" if event.outcome != "success" else "denied",
        "details": {**event.details, "forged": True},
        "ts": event.ts + timedelta(microseconds=1),
        "object_id": (event.object_id or "") + "9",
        "action": "audit:event:export",
    }[field]
    if new == getattr(event, field):  # e.g. the action already was export
        new = "user:account:disable"
    return dataclasses.replace(event, **{field: new})


def edit(events: Events, rng: random.Random) -> tuple[Events, int]:
    k = rng.randrange(len(events))
    return [*events[:k], _altered(events[k], rng), *events[k + 1 :]], k + 1


def edit_and_rehash_row(events: Events, rng: random.Random) -> tuple[Events, int]:
    k = rng.randrange(len(events))
    changed = _altered(events[k], rng)
    changed = dataclasses.replace(changed, hash=compute_hash(changed))
    return [*events[:k], changed, *events[k + 1 :]], k + 1


def delete(events: Events, rng: random.Random) -> tuple[Events, int]:
    k = rng.randrange(len(events))
    return events[:k] + events[k + 1 :], k + 1


def delete_and_renumber(events: Events, rng: random.Random) -> tuple[Events, int]:
    k = rng.randrange(len(events))
    rest = [dataclasses.replace(e, seq=e.seq - 1) for e in events[k + 1 :]]
    return events[:k] + rest, k + 1


def insert(events: Events, rng: random.Random) -> tuple[Events, int]:
    """A forged event with a valid hash, slipped in before the last event, later ones renumbered."""
    k = rng.randrange(len(events))  # index the forged event takes
    prev = events[k - 1].hash if k else GENESIS_HASH
    forged = dataclasses.replace(events[k], seq=k + 1, prev_hash=prev, actor_name="mallory", hash="")
    forged = dataclasses.replace(forged, hash=compute_hash(forged))
    shifted = [dataclasses.replace(e, seq=e.seq + 1) for e in events[k:]]
    return [*events[:k], forged, *shifted], k + 1


def reorder(events: Events, rng: random.Random) -> tuple[Events, int]:
    """Two events swap places (each keeps its content and hash, takes the other's seq)."""
    i, j = sorted(rng.sample(range(len(events)), 2))
    out = list(events)
    out[i] = dataclasses.replace(events[j], seq=events[i].seq)
    out[j] = dataclasses.replace(events[i], seq=events[j].seq)
    return out, i + 1


def truncate(events: Events, rng: random.Random) -> tuple[Events, int]:
    keep = rng.randrange(len(events))
    return events[:keep], keep + 1


def rewrite_chain(events: Events, rng: random.Random) -> tuple[Events, int]:
    """Edit one event, then recompute every hash after it: internally consistent, only the anchor knows."""
    k = rng.randrange(len(events))
    edited = [*events[:k], _altered(events[k], rng), *events[k + 1 :]]
    return rehash_from(edited, k), k + 1


TAMPERINGS: dict[str, Tamper] = {
    "edit": edit,
    "edit_and_rehash_row": edit_and_rehash_row,
    "delete": delete,
    "delete_and_renumber": delete_and_renumber,
    "insert": insert,
    "reorder": reorder,
    "truncate": truncate,
    "rewrite_chain": rewrite_chain,
}
