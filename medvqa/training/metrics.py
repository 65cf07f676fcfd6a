"""VQA metrics: answer normalisation, per-example scores, and an `EvalReport` with subgroup breakdowns.

Scoring follows what VQA-RAD papers report: closed accuracy and open exact match are exact matches after
`normalize_answer`; open questions also get SQuAD-style token F1 and token recall (the share of reference
tokens found in the prediction, the "open recall" of generative models such as LLaVA-Med). All figures are
fractions in 0..1; a figure whose denominator is empty (no open questions in a group) is None, not 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from medvqa.errors import InvalidInput

if TYPE_CHECKING:
    from medvqa.training.data import VQAExample

ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBER_WORDS: Mapping[str, str] = {word: str(value) for value, word in enumerate(_NUMBER_NAMES)}
METRIC_KEYS = ("closed_accuracy", "open_exact_match", "open_token_f1", "open_recall", "overall_accuracy")
_APOSTROPHES = re.compile(r"['\u2019\u2018`\u00b4]")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LEADING_POINT = re.compile(r"(?<![\w.])\.(?=\d)")
# A token is a run of letters/digits; a point between two digits stays inside it (decimal numbers).
_TOKEN = re.compile(r"(?:[^\W_]|(?<=\d)\.(?=\d))+")


def normalize_answer(text: str) -> str:
    """Canonical form of an answer, so that spelling variants of the same answer compare equal.

    Rules (the VQA v2 evaluation's, used on VQA-RAD since MEVF/BAN, plus SQuAD's article removal):
    - Unicode NFKC, lower-case; apostrophes deleted ("patient's" -> "patients");
    - a comma grouping thousands deleted ("1,000" -> "1000"); a point between digits kept ("3.4", ".5" -> "0.5");
    - every other punctuation mark, hyphens and slashes included, separates words ("x-ray" -> "x ray",
      "T2-weighted" -> "t2 weighted", "coronal plane?" -> "coronal plane"), so hyphenated and spaced spellings
      match and their parts count in token F1;
    - articles a/an/the dropped; number words zero..ten become digits ("one" -> "1": count answers mix both).
    Not done, on purpose: synonyms, stemming, splitting units ("2.5cm" stays one token), and "none" -> "0"
    (in radiology "none" usually means no finding, not a count).
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _THOUSANDS_COMMA.sub("", _APOSTROPHES.sub("", text))
    text = _LEADING_POINT.sub("0.", text)
    words = (NUMBER_WORDS.get(word, word) for word in _TOKEN.findall(text) if word not in ARTICLES)
    return " ".join(words)


def tokens(text: str) -> list[str]:
    """The normalised words of an answer, the unit of token F1 and token recall."""
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> bool:
    """True when both answers are equal after normalisation."""
    return normalize_answer(prediction) == normalize_answer(reference)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 over normalised words (repeated words count as often as they occur in both).

    If either side has no words, F1 is 1.0 when both are empty and 0.0 otherwise.
    """
    predicted, expected = tokens(prediction), tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def token_recall(prediction: str, reference: str) -> float:
    """Share of reference words present in the prediction (with multiplicity); same empty rule as `token_f1`."""
    predicted, expected = tokens(prediction), tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    return sum((Counter(predicted) & Counter(expected)).values()) / len(expected)


@dataclass(frozen=True)
class Prediction:
    """An answer with its confidence, as a predictor that knows them returns it (a bare str has neither)."""

    text: str
    confidence: float | None = None  # what the product shows: calibrated when the model carries a calibration
    raw_confidence: float | None = None  # the model's own, before calibration
    abstained: bool = False  # below the model's abstention threshold: not presented as an answer


@dataclass(frozen=True)
class ExampleScore:
    """How one prediction scored against its reference answer; kept for error analysis."""

    qid: str
    answer_type: str
    question_type: str
    organ: str
    prediction: str
    reference: str
    exact_match: bool
    token_f1: float
    token_recall: float
    question: str = ""
    confidence: float | None = None
    raw_confidence: float | None = None
    abstained: bool = False


def score_example(example: VQAExample, prediction: str | Prediction) -> ExampleScore:
    """Score one prediction; an empty prediction is a wrong answer, never a skipped question."""
    answer = prediction if isinstance(prediction, Prediction) else Prediction(prediction)
    return ExampleScore(
        qid=example.qid,
        answer_type=example.answer_type,
        question_type=example.question_type,
        organ=example.organ,
        prediction=answer.text,
        reference=example.answer,
        exact_match=exact_match(answer.text, example.answer),
        token_f1=token_f1(answer.text, example.answer),
        token_recall=token_recall(answer.text, example.answer),
        question=example.question,
        confidence=answer.confidence,
        raw_confidence=answer.raw_confidence,
        abstained=answer.abstained,
    )


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class GroupScores:
    """The five figures and the counts behind them for one set of questions (all, or one subgroup)."""

    n_closed: int
    n_open: int
    closed_accuracy: float | None
    open_exact_match: float | None
    open_token_f1: float | None
    open_recall: float | None
    overall_accuracy: float | None

    @property
    def n(self) -> int:
        return self.n_closed + self.n_open

    @classmethod
    def from_scores(cls, scores: Sequence[ExampleScore]) -> GroupScores:
        """Aggregate per-example scores; every question counts in its denominator, answered or not."""
        closed = [s for s in scores if s.answer_type == "CLOSED"]
        opened = [s for s in scores if s.answer_type != "CLOSED"]
        return cls(
            n_closed=len(closed),
            n_open=len(opened),
            closed_accuracy=_mean([float(s.exact_match) for s in closed]),
            open_exact_match=_mean([float(s.exact_match) for s in opened]),
            open_token_f1=_mean([s.token_f1 for s in opened]),
            open_recall=_mean([s.token_recall for s in opened]),
            overall_accuracy=_mean([float(s.exact_match) for s in scores]),
        )

    def to_json(self) -> dict[str, Any]:
        """The five metric keys plus counts {n_closed, n_open, n}."""
        figures: dict[str, Any] = {key: getattr(self, key) for key in METRIC_KEYS}
        return figures | {"counts": {"n_closed": self.n_closed, "n_open": self.n_open, "n": self.n}}


def _group_by(scores: Sequence[ExampleScore], key: Callable[[ExampleScore], str]) -> dict[str, GroupScores]:
    """Scores per label, largest groups first (ties by name) so tables read from the most to the least data."""
    groups: dict[str, list[ExampleScore]] = {}
    for item in scores:
        groups.setdefault(key(item), []).append(item)
    ordered = sorted(groups.items(), key=lambda pair: (-len(pair[1]), pair[0]))
    return {label: GroupScores.from_scores(members) for label, members in ordered}


@dataclass(frozen=True)
class EvalReport:
    """Results of one evaluation run: overall figures, breakdowns, per-example scores, optional baselines."""

    overall: GroupScores
    by_question_type: Mapping[str, GroupScores]
    by_organ: Mapping[str, GroupScores]
    examples: tuple[ExampleScore, ...]
    blind: EvalReport | None = None  # the same predictor with black images
    shuffled: EvalReport | None = None  # the same predictor with other images of the set
    model_ref: str | None = None
    adapter_ref: str | None = None
    data: str | None = None

    @property
    def closed_accuracy(self) -> float | None:
        return self.overall.closed_accuracy

    @property
    def open_exact_match(self) -> float | None:
        return self.overall.open_exact_match

    @property
    def open_token_f1(self) -> float | None:
        return self.overall.open_token_f1

    @property
    def open_recall(self) -> float | None:
        return self.overall.open_recall

    @property
    def overall_accuracy(self) -> float | None:
        return self.overall.overall_accuracy

    @property
    def closed_accuracy_gain_over_blind(self) -> float | None:
        """Closed accuracy with the images minus with blank images: how much the answers depend on the image."""
        if self.blind is None or self.closed_accuracy is None or self.blind.closed_accuracy is None:
            return None
        return self.closed_accuracy - self.blind.closed_accuracy

    @property
    def closed_accuracy_gain_over_shuffled(self) -> float | None:
        """Closed accuracy with each question's own image minus with another image: how much the answers read
        the image asked about, not merely any real image."""
        if self.shuffled is None or self.closed_accuracy is None or self.shuffled.closed_accuracy is None:
            return None
        return self.closed_accuracy - self.shuffled.closed_accuracy

    @property
    def has_confidences(self) -> bool:
        """True when the predictor gave confidences (a bare-text predictor gives none)."""
        return any(item.confidence is not None for item in self.examples)

    def calibration(self) -> dict[str, Any]:
        """Confidence figures for closed and open questions separately (by the data's answer type), and, when
        some answers abstained, the coverage and accuracy of those presented; {} without confidences."""
        from medvqa.training.calibration import ConfidenceFigures

        if not self.has_confidences:
            return {}
        result: dict[str, Any] = {}
        for kind, members in (("closed", self._closed()), ("open", self._open())):
            figures = ConfidenceFigures.measure([m.confidence for m in members], [m.exact_match for m in members])
            result[kind] = figures.to_json() if figures else None
            shown = [m for m in members if not m.abstained]
            result[kind + "_abstention"] = {
                "coverage": len(shown) / len(members) if members else None,
                "accuracy": _mean([float(m.exact_match) for m in shown]),
                "abstained": len(members) - len(shown),
            }
        return result

    def _closed(self) -> list[ExampleScore]:
        return [e for e in self.examples if e.answer_type == "CLOSED"]

    def _open(self) -> list[ExampleScore]:
        return [e for e in self.examples if e.answer_type != "CLOSED"]

    def with_provenance(
        self, *, model_ref: str | None = None, adapter_ref: str | None = None, data: str | None = None
    ) -> EvalReport:
        """A copy naming the model, adapter and data file that produced it (shown in JSON and markdown)."""
        return replace(self, model_ref=model_ref, adapter_ref=adapter_ref, data=data)

    def to_json(self) -> dict[str, Any]:
        """Fractions in 0..1 (None where no question fed a figure), counts and breakdowns; JSON-serialisable."""
        result = self.overall.to_json()
        result["by_question_type"] = {label: group.to_json() for label, group in self.by_question_type.items()}
        result["by_organ"] = {label: group.to_json() for label, group in self.by_organ.items()}
        if self.blind is not None:
            result["blind"] = self.blind.to_json()
            result["closed_accuracy_gain_over_blind"] = self.closed_accuracy_gain_over_blind
        if self.shuffled is not None:
            result["shuffled"] = self.shuffled.to_json()
            result["closed_accuracy_gain_over_shuffled"] = self.closed_accuracy_gain_over_shuffled
        if self.has_confidences:
            result["calibration"] = self.calibration()
        for key in ("model_ref", "adapter_ref", "data"):
            if getattr(self, key) is not None:
                result[key] = getattr(self, key)
        return result

    def to_markdown(self) -> str:
        """Readable tables: overall, per question type, per organ (percentages with one decimal)."""
        lines = [f"## Evaluation{f' of {self.data}' if self.data else ''}", ""]
        provenance = [f"{key}: `{getattr(self, key)}`" for key in ("model_ref", "adapter_ref") if getattr(self, key)]
        lines += [", ".join(provenance), ""] if provenance else []
        lines += _table("all questions", {"overall": self.overall})
        if self.blind is not None:
            lines += _table("blind baseline (blank images)", {"overall": self.blind.overall})
            gain = self.closed_accuracy_gain_over_blind
            lines += [f"Closed accuracy gain over blind: {_points(gain)}", ""]
        if self.shuffled is not None:
            lines += _table("shuffled baseline (other images of the set)", {"overall": self.shuffled.overall})
            gain = self.closed_accuracy_gain_over_shuffled
            lines += [f"Closed accuracy gain over shuffled: {_points(gain)}", ""]
        lines += _table("question type", self.by_question_type)
        lines += _table("organ", self.by_organ)
        if self.has_confidences:
            lines += calibration_table(self)
        return "\n".join(lines).rstrip() + "\n"


_COLUMNS = ("n", "closed n", "open n", "closed acc", "open EM", "open F1", "open recall", "overall")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} points"


def _table(title: str, groups: Mapping[str, GroupScores]) -> list[str]:
    """A markdown table, one row per group, with a heading naming what the rows are."""
    header = f"| {title} | " + " | ".join(_COLUMNS) + " |"
    lines = [header, "|---" * (len(_COLUMNS) + 1) + "|"]
    for label, group in groups.items():
        figures = [_percent(getattr(group, key)) for key in METRIC_KEYS]
        # Column order: closed acc, open EM, open F1, open recall, overall = METRIC_KEYS order.
        cells = [label.replace("|", "\\|"), str(group.n), str(group.n_closed), str(group.n_open), *figures]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def calibration_table(report: EvalReport) -> list[str]:
    """Markdown: per condition (own image, blind, shuffled) and answer type, how far the confidences hold."""
    header = (
        "| confidence | n | accuracy | mean confidence | ECE | Brier | AURC | acc @80% | acc @50% | acc @30% "
        "| presented | presented acc |"
    )
    lines = [header, "|---" * 13 + "|"]
    conditions = [("own image", report), ("blind", report.blind), ("shuffled", report.shuffled)]
    for condition, member in conditions:
        if member is None or not member.has_confidences:
            continue
        figures = member.calibration()
        for kind in ("closed", "open"):
            data, shown = figures[kind], figures[kind + "_abstention"]
            if data is None:
                continue
            selective = [_percent(data["selective_accuracy"][key]) for key in ("0.8", "0.5", "0.3")]
            cells = [
                f"{condition}, {kind}",
                str(data["n"]),
                _percent(data["accuracy"]),
                f"{data['mean_confidence']:.3f}",
                f"{data['ece']:.3f}",
                f"{data['brier']:.3f}",
                f"{data['aurc']:.3f}",
                *selective,
                _percent(shown["coverage"]),
                _percent(shown["accuracy"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    note = "ECE over 10 equal-mass bins; acc @c%: accuracy of the c% most confident answers; presented: not abstained."
    return [*lines, "", note, ""]


def score(examples: Sequence[VQAExample], predictions: Sequence[str | Prediction]) -> EvalReport:
    """Score predictions against examples, position by position; the lengths must match."""
    if len(examples) != len(predictions):
        raise InvalidInput(f"{len(predictions)} predictions for {len(examples)} examples; give one per example")
    if not examples:
        raise InvalidInput("no examples to score; the evaluation set is empty")
    _check_texts(predictions)
    scores = tuple(
        score_example(example, prediction) for example, prediction in zip(examples, predictions, strict=True)
    )
    return EvalReport(
        overall=GroupScores.from_scores(scores),
        by_question_type=_group_by(scores, lambda s: s.question_type),
        by_organ=_group_by(scores, lambda s: s.organ),
        examples=scores,
    )


def _check_texts(predictions: Iterable[object]) -> None:
    for index, prediction in enumerate(predictions):
        if not isinstance(prediction, str | Prediction):
            raise InvalidInput(f"prediction {index} is {type(prediction).__name__}, not text; use '' for no answer")
