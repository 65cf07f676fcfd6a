"""Paired comparison of a candidate adapter with the live one on the same questions, and the promotion gate.

Both models answered the same questions, so the comparison is paired, question by question: McNemar's exact
test on the closed questions (only the questions where exactly one model is right carry information), and a
bootstrap over questions (fixed seed, so the same reports give the same intervals) for the difference in
accuracy overall, on closed and open questions, and per question type and organ. Accuracy is exact match after
normalisation, as `EvalReport.overall_accuracy` counts it. The gate (settings `round_gate_*`) reads the deltas.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvqa.config import Settings
from medvqa.errors import InvalidInput, InvalidSettings
from medvqa.training.metrics import EvalReport, ExampleScore

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
_EPSILON = 1e-9  # float slack when comparing a drop with its allowance


@dataclass(frozen=True)
class GateSettings:
    """What a candidate may not do on the locked test set, in fractions of accuracy (0.02 = 2 points)."""

    # The defaults are the settings' own (MEDVQA_ROUND_GATE_*), declared once in medvqa/config.py.
    max_overall_drop: float = Settings.model_fields["round_gate_max_overall_drop"].default
    max_subgroup_drop: float = Settings.model_fields["round_gate_max_subgroup_drop"].default
    min_subgroup_questions: int = Settings.model_fields["round_gate_min_subgroup_questions"].default

    def __post_init__(self) -> None:
        if not (0 <= self.max_overall_drop <= 1 and 0 <= self.max_subgroup_drop <= 1):
            raise InvalidSettings("gate drops are fractions of accuracy in [0, 1] (0.02 = 2 points)")
        if self.min_subgroup_questions < 1:
            raise InvalidSettings("min_subgroup_questions must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> GateSettings:
        return cls(
            max_overall_drop=settings.round_gate_max_overall_drop,
            max_subgroup_drop=settings.round_gate_max_subgroup_drop,
            min_subgroup_questions=settings.round_gate_min_subgroup_questions,
        )


@dataclass(frozen=True)
class Delta:
    """Accuracy of both models on one group of questions, their difference and its bootstrap interval."""

    group: str  # overall, answer_type, question_type or organ
    subgroup: str
    n: int
    live: float
    candidate: float
    delta: float  # candidate - live
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on the closed questions: discordant pairs and the two-sided p-value."""

    n_closed: int
    candidate_only: int  # closed questions only the candidate got right
    live_only: int  # closed questions only the live model got right
    p_value: float


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]  # one line per failed rule; empty when passed


@dataclass(frozen=True)
class Comparison:
    """Everything `rounds compare` shows: per-group deltas, McNemar, the gate's decision."""

    rows: tuple[Delta, ...]
    mcnemar: McNemar
    gate: GateDecision
    gate_settings: GateSettings
    resamples: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [asdict(row) for row in self.rows],
            "mcnemar": asdict(self.mcnemar),
            "gate": {"passed": self.gate.passed, "reasons": list(self.gate.reasons), **asdict(self.gate_settings)},
            "bootstrap": {"resamples": self.resamples, "seed": self.seed, "confidence": CONFIDENCE},
        }

    def to_markdown(self, title: str = "Candidate against live") -> str:
        return comparison_markdown(self.to_json(), title)


def mcnemar_exact(candidate_only: int, live_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2 (1.0 when none)."""
    n = candidate_only + live_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(candidate_only, live_only) + 1)) / (1 << n)  # exact for any n
    return min(1.0, 2 * tail)


def bootstrap_interval(differences: np.ndarray, rng: np.random.Generator, resamples: int) -> tuple[float, float]:
    """Percentile interval of the mean per-question difference (candidate right - live right) over resamples."""
    n = len(differences)
    means = differences[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def _paired(candidate: EvalReport, live: EvalReport) -> list[tuple[ExampleScore, ExampleScore]]:
    """The two reports' scores matched by question id; both must cover exactly the same questions."""
    live_by_qid = {score.qid: score for score in live.examples}
    if set(live_by_qid) != {score.qid for score in candidate.examples}:
        raise InvalidInput("the candidate and the live model were evaluated on different questions; use one test set")
    return [(score, live_by_qid[score.qid]) for score in candidate.examples]


_GROUPINGS: tuple[tuple[str, Callable[[ExampleScore], str]], ...] = (
    ("answer_type", lambda s: s.answer_type.lower()),
    ("question_type", lambda s: s.question_type),
    ("organ", lambda s: s.organ),
)


def _groups(pairs: Sequence[tuple[ExampleScore, ExampleScore]]) -> list[tuple[str, str, list[int]]]:
    """(group, subgroup, question indexes): overall first, then each grouping, largest subgroups first."""
    groups = [("overall", "all", list(range(len(pairs))))]
    for group, key in _GROUPINGS:
        members: dict[str, list[int]] = {}
        for index, (score, _) in enumerate(pairs):
            members.setdefault(key(score), []).append(index)
        groups += [(group, label, idx) for label, idx in sorted(members.items(), key=lambda p: (-len(p[1]), p[0]))]
    return groups


def compare_reports(
    candidate: EvalReport,
    live: EvalReport,
    gate: GateSettings,
    *,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> Comparison:
    """Compare two evaluations of the same questions and decide the gate."""
    pairs = _paired(candidate, live)
    if not pairs:
        raise InvalidInput("no questions to compare")
    cand_right = np.array([float(cand.exact_match) for cand, _ in pairs])
    live_right = np.array([float(other.exact_match) for _, other in pairs])
    rows = []
    for group, subgroup, indexes in _groups(pairs):
        # One generator per group, seeded by its name: a group's interval does not depend on the others.
        rng = np.random.default_rng([seed, zlib.crc32(f"{group}/{subgroup}".encode())])
        ours, theirs = cand_right[indexes], live_right[indexes]
        low, high = bootstrap_interval(ours - theirs, rng, resamples)
        means = float(theirs.mean()), float(ours.mean()), float((ours - theirs).mean())
        rows.append(Delta(group, subgroup, len(indexes), *means, low, high))
    closed = [(cand.exact_match, other.exact_match) for cand, other in pairs if cand.answer_type == "CLOSED"]
    candidate_only = sum(1 for ours_ok, theirs_ok in closed if ours_ok and not theirs_ok)
    live_only = sum(1 for ours_ok, theirs_ok in closed if theirs_ok and not ours_ok)
    test = McNemar(len(closed), candidate_only, live_only, mcnemar_exact(candidate_only, live_only))
    return Comparison(tuple(rows), test, decide_gate(rows, gate), gate, resamples, seed)


def decide_gate(rows: Sequence[Delta], gate: GateSettings) -> GateDecision:
    """Overall may drop at most `max_overall_drop`; no subgroup with enough questions more than `max_subgroup_drop`."""
    reasons = []
    for row in rows:
        if row.group == "overall":
            allowed = gate.max_overall_drop
        elif row.n >= gate.min_subgroup_questions:
            allowed = gate.max_subgroup_drop
        else:
            continue
        if row.delta < -allowed - _EPSILON:
            reasons.append(
                f"{row.group} {row.subgroup}: accuracy drops {100 * -row.delta:.1f} points "
                f"(allowed {100 * allowed:.1f}; n={row.n})"
            )
    return GateDecision(not reasons, tuple(reasons))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def comparison_markdown(data: dict[str, Any], title: str) -> str:
    """A markdown table from `Comparison.to_json()` (also from a stored round's metrics)."""
    lines = [f"### {title}", "", "| group | subgroup | n | live | candidate | delta (points) | 95% CI (points) |"]
    lines.append("|---|---|---:|---:|---:|---:|---|")
    for row in data["rows"]:
        label = str(row["subgroup"]).replace("|", "\\|")
        ci = f"[{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}]"
        cells = [row["group"], label, str(row["n"]), _pct(row["live"]), _pct(row["candidate"])]
        lines.append("| " + " | ".join([*cells, f"{100 * row['delta']:+.1f}", ci]) + " |")
    test = data["mcnemar"]
    lines += [
        "",
        f"McNemar exact test, closed questions (n={test['n_closed']}): candidate alone right "
        f"{test['candidate_only']}, live alone right {test['live_only']}, p = {test['p_value']:.4g}.",
    ]
    gate = data["gate"]
    verdict = "PASSED" if gate["passed"] else "FAILED: " + "; ".join(gate["reasons"])
    lines += [f"Gate: {verdict}", ""]
    return "\n".join(lines)


_ROW_HEIGHT, _BAR_HEIGHT, _LABEL_WIDTH, _BAR_WIDTH, _MARGIN = 34, 12, 190, 420, 16
_LIVE_COLOUR, _CANDIDATE_COLOUR, _INK = (150, 150, 150), (31, 119, 180), (20, 20, 20)


def write_chart(data: dict[str, Any], path: Path, title: str = "Accuracy: live (grey) and candidate (blue)") -> Path:
    """A PNG bar chart from `Comparison.to_json()`: per group, live and candidate accuracy and the delta.

    Drawn with Pillow (already a dependency) so the chart needs no plotting library; rows in table order.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = data["rows"]
    width = _LABEL_WIDTH + _BAR_WIDTH + 130 + 2 * _MARGIN
    height = 2 * _MARGIN + 30 + _ROW_HEIGHT * len(rows)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((_MARGIN, _MARGIN), title, fill=_INK, font=font)
    left = _MARGIN + _LABEL_WIDTH
    for index, row in enumerate(rows):
        top = _MARGIN + 30 + index * _ROW_HEIGHT
        label = f"{row['group']}: {row['subgroup']}"[:30] + f" (n={row['n']})"
        draw.text((_MARGIN, top + 8), label, fill=_INK, font=font)
        for offset, value, colour in (
            (0, row["live"], _LIVE_COLOUR),
            (_BAR_HEIGHT + 2, row["candidate"], _CANDIDATE_COLOUR),
        ):
            draw.rectangle(
                (left, top + offset, left + round(_BAR_WIDTH * value), top + offset + _BAR_HEIGHT), fill=colour
            )
        draw.text((left + _BAR_WIDTH + 10, top + 8), f"{100 * row['delta']:+.1f} pts", fill=_INK, font=font)
    for fraction in (0.0, 0.5, 1.0):  # axis ticks at 0, 50 and 100 %
        x = left + round(_BAR_WIDTH * fraction)
        draw.line((x, _MARGIN + 26, x, height - _MARGIN), fill=(210, 210, 210))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
