"""How far an answer's confidence can be believed, and what to do about it.

- Figures (`ConfidenceFigures`): expected calibration error over equal-mass bins, Brier score, the risk-coverage
  curve with its area (AURC) and the accuracy kept at fixed coverages, computed from per-question
  (confidence, correct) pairs.
- Post-hoc calibration (`Calibration`): one calibrator per kind of question (closed: the answer is one of the
  prompt's closed answers; open: anything else), chosen on held-out answers among identity, temperature scaling,
  Platt scaling and isotonic regression by cross-validated Brier score, and saved as `calibration.json` beside
  the model or adapter it was fitted for, with the hash of the data it was fitted on.
- Abstention: per kind, the lowest calibrated confidence at which the answers kept reach a precision target on
  the held-out answers (out-of-fold, so the threshold is not chosen on the very confidences it was fitted to).

A confidence of None (no generated token) counts as 0: such an answer is empty, hence wrong.
Calibration never reorders answers within a kind, so selective accuracy only changes through a better signal.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medvqa.errors import InvalidInput

CALIBRATION_FILE = "calibration.json"
FORMAT_VERSION = 1
BINS = 10
COVERAGES = (0.8, 0.5, 0.3)
KINDS = ("closed", "open")
MIN_FIT = 20  # fewer held-out answers of a kind than this: that kind keeps its raw confidence
MIN_KEPT = 10  # an abstention threshold must keep at least this many held-out answers
FOLDS = 5
_EPS = 1e-6

Kind = Literal["closed", "open"]
Method = Literal["identity", "temperature", "platt", "isotonic"]
METHODS: tuple[Method, ...] = ("identity", "temperature", "platt", "isotonic")


def _arrays(confidences: Sequence[float | None], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    if len(confidences) != len(correct):
        raise InvalidInput(f"{len(confidences)} confidences for {len(correct)} answers; give one per answer")
    conf = np.array([0.0 if c is None else float(c) for c in confidences], dtype=np.float64)
    if conf.size and (not np.isfinite(conf).all() or conf.min() < 0 or conf.max() > 1):
        raise InvalidInput("a confidence lies outside 0..1")
    return conf, np.array([bool(c) for c in correct], dtype=np.float64)


def _equal_mass_bins(conf: np.ndarray, bins: int) -> list[np.ndarray]:
    """Indices per bin: sorted by confidence and cut into `bins` parts of as equal size as possible, except that
    answers of equal confidence always share a bin (a tie split by input order would make the figure depend on
    the order of the file)."""
    order = np.argsort(conf, kind="stable")
    ranked = conf[order]
    ids = (np.arange(conf.size) * bins) // max(conf.size, 1)
    first = np.searchsorted(ranked, ranked, side="left")  # where each value's run of ties starts
    ids = ids[first]
    return [order[ids == b] for b in range(bins) if np.any(ids == b)]


def expected_calibration_error(confidences: Sequence[float | None], correct: Sequence[bool], bins: int = BINS) -> float:
    """ECE over `bins` equal-mass bins (see `_equal_mass_bins`): the size-weighted mean of
    |accuracy - mean confidence| per bin."""
    conf, hit = _arrays(confidences, correct)
    if not conf.size:
        raise InvalidInput("no answers to measure")
    total = 0.0
    for part in _equal_mass_bins(conf, bins):
        total += part.size * abs(float(hit[part].mean()) - float(conf[part].mean()))
    return total / conf.size


def reliability_bins(
    confidences: Sequence[float | None], correct: Sequence[bool], bins: int = BINS
) -> list[dict[str, float]]:
    """Per equal-mass bin: mean confidence, accuracy and size (the points of a reliability diagram)."""
    conf, hit = _arrays(confidences, correct)
    return [
        {"mean_confidence": float(conf[part].mean()), "accuracy": float(hit[part].mean()), "n": int(part.size)}
        for part in _equal_mass_bins(conf, bins)
    ]


def risk_coverage(confidences: Sequence[float | None], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/N and risk (error rate of the k most confident answers) for k = 1..N."""
    conf, hit = _arrays(confidences, correct)
    order = np.argsort(-conf, kind="stable")
    kept = np.arange(1, conf.size + 1)
    return kept / conf.size, 1.0 - np.cumsum(hit[order]) / kept


def selective_accuracy(confidences: Sequence[float | None], correct: Sequence[bool], coverage: float) -> float | None:
    """Accuracy of the ceil(coverage x N) most confident answers (None when there are no answers)."""
    conf, hit = _arrays(confidences, correct)
    if not conf.size:
        return None
    keep = max(1, math.ceil(coverage * conf.size - 1e-9))
    order = np.argsort(-conf, kind="stable")
    return float(hit[order[:keep]].mean())


@dataclass(frozen=True)
class ConfidenceFigures:
    """How well one set of confidences (closed or open answers) tracks correctness."""

    n: int
    accuracy: float
    mean_confidence: float
    ece: float
    brier: float
    aurc: float
    selective_accuracy: dict[str, float | None]  # by coverage, "0.8" -> accuracy of the most confident 80%
    bins: list[dict[str, float]] = field(repr=False)
    curve: list[tuple[float, float]] = field(repr=False)  # (coverage, risk), thinned to at most 101 points

    @classmethod
    def measure(cls, confidences: Sequence[float | None], correct: Sequence[bool]) -> ConfidenceFigures | None:
        """The figures, or None when there is no answer to measure."""
        conf, hit = _arrays(confidences, correct)
        if not conf.size:
            return None
        coverage, risk = risk_coverage(confidences, correct)
        picks = np.unique(np.linspace(0, conf.size - 1, min(conf.size, 101)).round().astype(int))
        return cls(
            n=int(conf.size),
            accuracy=float(hit.mean()),
            mean_confidence=float(conf.mean()),
            ece=expected_calibration_error(confidences, correct),
            brier=float(np.mean((conf - hit) ** 2)),
            aurc=float(risk.mean()),
            selective_accuracy={f"{c:g}": selective_accuracy(confidences, correct, c) for c in COVERAGES},
            bins=reliability_bins(confidences, correct),
            curve=[(float(coverage[i]), float(risk[i])) for i in picks],
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"curve": [list(point) for point in self.curve]}


# --- calibrators -----------------------------------------------------------------------------------------------


def _logit(p: np.ndarray) -> np.ndarray:
    clipped = np.clip(p, _EPS, 1 - _EPS)
    return np.asarray(np.log(clipped / (1 - clipped)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


@dataclass(frozen=True)
class Calibrator:
    """A monotone map from raw to calibrated confidence for one kind of question."""

    method: Method = "identity"
    temperature: float = 1.0  # temperature: sigmoid(logit(p) / T)
    slope: float = 1.0  # platt: sigmoid(slope * logit(p) + intercept)
    intercept: float = 0.0
    knots: tuple[tuple[float, float], ...] = ()  # isotonic: (raw, calibrated) points, linear in between

    def apply(self, confidences: np.ndarray) -> np.ndarray:
        p = np.asarray(confidences, dtype=np.float64)
        if self.method == "temperature":
            return _sigmoid(_logit(p) / self.temperature)
        if self.method == "platt":
            return _sigmoid(self.slope * _logit(p) + self.intercept)
        if self.method == "isotonic":
            xs, ys = zip(*self.knots, strict=True)
            return np.asarray(np.interp(p, xs, ys))
        return p

    def to_json(self) -> dict[str, Any]:
        if self.method == "temperature":
            return {"method": self.method, "temperature": self.temperature}
        if self.method == "platt":
            return {"method": self.method, "slope": self.slope, "intercept": self.intercept}
        if self.method == "isotonic":
            return {"method": self.method, "knots": [list(point) for point in self.knots]}
        return {"method": "identity"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibrator:
        method = data.get("method")
        try:
            if method == "temperature":
                temperature = float(data["temperature"])
                if not (math.isfinite(temperature) and temperature > 0):
                    raise ValueError("temperature must be positive")
                return cls("temperature", temperature=temperature)
            if method == "platt":
                slope, intercept = float(data["slope"]), float(data["intercept"])
                if not (math.isfinite(slope) and math.isfinite(intercept) and slope >= 0):
                    raise ValueError("slope must be finite and not negative (a calibrator keeps the order)")
                return cls("platt", slope=slope, intercept=intercept)
            if method == "isotonic":
                knots = tuple((float(x), float(y)) for x, y in data["knots"])
                xs, ys = [x for x, _ in knots], [y for _, y in knots]
                if not knots or xs != sorted(xs) or ys != sorted(ys) or min(ys) < 0 or max(ys) > 1:
                    raise ValueError("isotonic knots must rise, with values in 0..1")
                return cls("isotonic", knots=knots)
            if method == "identity":
                return cls()
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"calibration: the {method} calibrator is malformed ({exc})") from exc
        raise InvalidInput(f"calibration: unknown method {method!r}; use one of {', '.join(METHODS)}")


def _fit(method: Method, conf: np.ndarray, hit: np.ndarray) -> Calibrator:
    """Fit one method on (confidence, correct) pairs with scipy / scikit-learn."""
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        logits = _logit(conf)

        def nll(log_t: float) -> float:
            p = np.clip(_sigmoid(logits / math.exp(log_t)), _EPS, 1 - _EPS)
            return float(-np.mean(hit * np.log(p) + (1 - hit) * np.log(1 - p)))

        best = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded")
        return Calibrator("temperature", temperature=float(math.exp(best.x)))
    if method == "platt":
        if len(set(hit.tolist())) < 2:  # all right or all wrong: the constant the data shows
            return Calibrator("isotonic", knots=((0.0, float(hit[0])), (1.0, float(hit[0]))))
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=1e4).fit(_logit(conf).reshape(-1, 1), hit.astype(int))
        slope = max(0.0, float(model.coef_[0][0]))
        return Calibrator("platt", slope=slope, intercept=float(model.intercept_[0]))
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(conf, hit)
        knots = tuple((float(x), float(y)) for x, y in zip(iso.X_thresholds_, iso.y_thresholds_, strict=True))
        return Calibrator("isotonic", knots=knots)
    return Calibrator()


def _folds(n: int, folds: int) -> list[np.ndarray]:
    """Deterministic interleaved folds (answer i goes to fold i mod k)."""
    return [np.arange(start, n, folds) for start in range(folds)]


def _out_of_fold(method: Method, conf: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Each answer's calibrated confidence from a calibrator fitted without its fold."""
    result = np.empty_like(conf)
    for held in _folds(conf.size, min(FOLDS, conf.size)):
        train = np.setdiff1d(np.arange(conf.size), held)
        result[held] = _fit(method, conf[train], hit[train]).apply(conf[held])
    return result


@dataclass(frozen=True)
class KindCalibration:
    """The calibrator and abstention threshold of one kind of question, with what they were chosen on."""

    calibrator: Calibrator
    threshold: float | None  # answers below it abstain; None: no threshold reaches the target (always abstain)
    precision_target: float
    held_out: int  # answers it was fitted on
    cross_validated_brier: dict[str, float] = field(default_factory=dict)  # per method tried
    kept_share: float | None = None  # share of held-out answers the threshold keeps (out of fold)
    kept_precision: float | None = None  # their accuracy

    def to_json(self) -> dict[str, Any]:
        return {
            "calibrator": self.calibrator.to_json(),
            "threshold": self.threshold,
            "precision_target": self.precision_target,
            "held_out": self.held_out,
            "cross_validated_brier": self.cross_validated_brier,
            "kept_share": self.kept_share,
            "kept_precision": self.kept_precision,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KindCalibration:
        try:
            threshold = data["threshold"]
            if threshold is not None and not 0 <= float(threshold) <= 1:
                raise ValueError("threshold outside 0..1")
            return cls(
                calibrator=Calibrator.from_json(data["calibrator"]),
                threshold=None if threshold is None else float(threshold),
                precision_target=float(data["precision_target"]),
                held_out=int(data["held_out"]),
                cross_validated_brier={str(k): float(v) for k, v in data.get("cross_validated_brier", {}).items()},
                kept_share=data.get("kept_share"),
                kept_precision=data.get("kept_precision"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"calibration: malformed entry ({exc})") from exc


def choose_threshold(
    confidences: np.ndarray, correct: np.ndarray, target: float
) -> tuple[float | None, float | None, float | None]:
    """The lowest confidence t such that the answers at or above t are right at least `target` of the time and
    number at least MIN_KEPT; returns (t, share kept, their accuracy), or (None, None, None) when none does."""
    order = np.argsort(-confidences, kind="stable")
    conf, hit = confidences[order], correct[order]
    precision = np.cumsum(hit) / np.arange(1, conf.size + 1)
    best: tuple[float | None, float | None, float | None] = (None, None, None)
    for k in range(MIN_KEPT, conf.size + 1):
        if k < conf.size and conf[k] == conf[k - 1]:
            continue  # a threshold keeps every answer with the same confidence, so only cut between values
        if precision[k - 1] >= target:
            best = (float(conf[k - 1]), k / conf.size, float(precision[k - 1]))
    return best


def fit_kind(confidences: Sequence[float | None], correct: Sequence[bool], precision_target: float) -> KindCalibration:
    """Choose and fit the calibrator of one kind by 5-fold cross-validated Brier score, then its threshold on the
    out-of-fold calibrated confidences; too few answers (< MIN_FIT) keep identity and no threshold."""
    if not 0 < precision_target <= 1:
        raise InvalidInput(f"the precision target must be in (0, 1], not {precision_target}")
    conf, hit = _arrays(confidences, correct)
    if conf.size < MIN_FIT:
        return KindCalibration(Calibrator(), None, precision_target, int(conf.size))
    scores: dict[str, float] = {}
    out_of_fold: dict[str, np.ndarray] = {}
    for method in METHODS:
        out_of_fold[method] = _out_of_fold(method, conf, hit)
        scores[method] = float(np.mean((out_of_fold[method] - hit) ** 2))
    chosen: Method = min(METHODS, key=lambda m: (round(scores[m], 12), METHODS.index(m)))
    threshold, kept, precision = choose_threshold(out_of_fold[chosen], hit, precision_target)
    fitted = _fit(chosen, conf, hit)
    return KindCalibration(fitted, threshold, precision_target, int(conf.size), scores, kept, precision)


@dataclass(frozen=True)
class Calibration:
    """What `calibration.json` holds: per kind, a calibrator and an abstention threshold, and what they fit."""

    kinds: dict[str, KindCalibration]
    model_ref: str | None
    adapter_ref: str | None
    data: str  # the held-out file it was fitted on
    data_sha256: str
    created_at: str

    def apply(self, kind: str, confidence: float | None) -> float | None:
        """The calibrated confidence (None stays None)."""
        if confidence is None:
            return None
        return float(self.kinds[kind].calibrator.apply(np.array([confidence]))[0])

    def abstains(self, kind: str, calibrated: float | None) -> bool:
        """True when the answer should not be presented as an answer: below the kind's threshold, or no
        threshold of that kind reached its precision target on the held-out answers."""
        entry = self.kinds[kind]
        if entry.held_out < MIN_FIT:
            return False  # too few answers to choose a threshold: nothing is known either way
        if entry.threshold is None or calibrated is None:
            return True
        return calibrated < entry.threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "model_ref": self.model_ref,
            "adapter_ref": self.adapter_ref,
            "data": self.data,
            "data_sha256": self.data_sha256,
            "created_at": self.created_at,
            "kinds": {kind: entry.to_json() for kind, entry in self.kinds.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise InvalidInput(f"calibration: not a format-{FORMAT_VERSION} calibration file")
        kinds = data.get("kinds")
        if not isinstance(kinds, dict) or set(kinds) != set(KINDS):
            raise InvalidInput(f"calibration: needs exactly the kinds {', '.join(KINDS)}")
        return cls(
            kinds={kind: KindCalibration.from_json(kinds[kind]) for kind in KINDS},
            model_ref=data.get("model_ref"),
            adapter_ref=data.get("adapter_ref"),
            data=str(data.get("data", "")),
            data_sha256=str(data.get("data_sha256", "")),
            created_at=str(data.get("created_at", "")),
        )

    def save(self, folder: Path) -> tuple[Path, str]:
        """Write folder/calibration.json atomically; returns its path and SHA-256."""
        import os
        import tempfile

        body = (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()
        folder.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(prefix=".calibration-", dir=folder)
        with os.fdopen(handle, "wb") as stream:
            stream.write(body)
            stream.flush()
            os.fsync(stream.fileno())
        target = folder / CALIBRATION_FILE
        os.replace(scratch, target)
        return target, hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class LoadedCalibration:
    """A calibration file read from disk, with the hash answers name it by."""

    calibration: Calibration
    path: Path
    sha256: str

    def provenance(self) -> dict[str, Any]:
        methods = {kind: entry.calibrator.method for kind, entry in self.calibration.kinds.items()}
        return {"file": self.path.name, "sha256": self.sha256, "methods": methods}


def load_calibration(folder: Path, *, model_ref: str | None, adapter_ref: str | None) -> LoadedCalibration | None:
    """folder/calibration.json when present and fitted for this model and adapter; None when absent.

    A file fitted for other weights, or one that does not parse, raises InvalidInput: answering with a
    calibration that belongs to other weights would show confidences nobody measured.
    """
    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return None
    body = path.read_bytes()
    try:
        calibration = Calibration.from_json(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: not JSON ({exc})") from exc
    for label, stored, expected in (
        ("adapter", calibration.adapter_ref, adapter_ref),
        ("model", _weights_part(calibration.model_ref), _weights_part(model_ref)),
    ):
        if stored != expected:
            raise InvalidInput(f"{path} was fitted for {label} {stored!r}, not {expected!r}: refit it or remove it")
    return LoadedCalibration(calibration, path, hashlib.sha256(body).hexdigest())


def _weights_part(model_ref: str | None) -> str | None:
    """The weights hash of "<folder>@<sha12>": a renamed copy of the same weights keeps its calibration."""
    return None if model_ref is None else model_ref.rpartition("@")[2]


def fit_calibration(
    pairs: Iterable[tuple[str, float | None, bool]],
    *,
    precision_targets: dict[str, float],
    model_ref: str | None,
    adapter_ref: str | None,
    data: Path,
) -> Calibration:
    """Fit per kind from (kind, raw confidence, correct) triples of held-out answers."""
    from medvqa.db.base import utcnow
    from medvqa.hashing import file_sha256

    grouped: dict[str, tuple[list[float | None], list[bool]]] = {kind: ([], []) for kind in KINDS}
    for kind, confidence, correct in pairs:
        grouped[kind][0].append(confidence)
        grouped[kind][1].append(correct)
    kinds = {kind: fit_kind(*grouped[kind], precision_targets[kind]) for kind in KINDS}
    return Calibration(kinds, model_ref, adapter_ref, str(data), file_sha256(data), utcnow().isoformat())


# --- plots ---------------------------------------------------------------------------------------------------------

RELIABILITY_PNG, RISK_COVERAGE_PNG = "reliability.png", "risk_coverage.png"


def write_plots(figures: dict[str, Any], folder: Path, title: str = "") -> dict[str, Path]:
    """A reliability diagram and a risk-coverage curve (PNG, matplotlib) from `EvalReport.calibration()`.

    Reliability: per equal-mass bin, accuracy against mean confidence (closed and open side by side; the
    diagonal is perfect calibration). Risk-coverage: error rate of the most confident answers as coverage grows.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in a server process
    from matplotlib import pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    kinds = [kind for kind in KINDS if figures.get(kind)]
    paths = {"reliability": folder / RELIABILITY_PNG, "risk_coverage": folder / RISK_COVERAGE_PNG}
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.2 * max(1, len(kinds)), 4.2), squeeze=False)
    for axis, kind in zip(axes[0], kinds, strict=False):
        data = figures[kind]
        bins = data["bins"]
        axis.plot([0, 1], [0, 1], color="#999999", linewidth=1, linestyle="--", label="perfect calibration")
        axis.plot(
            [b["mean_confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            color="#1f77b4",
            label="answers (10 equal-mass bins)",
        )
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean confidence", ylabel="accuracy")
        axis.set_title(f"{kind} (n={data['n']}): ECE {data['ece']:.3f}")
        axis.legend(loc="upper left", fontsize="small")
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize="small")
    fig.tight_layout()
    fig.savefig(paths["reliability"], dpi=110)
    plt.close(fig)

    fig, axis = plt.subplots(figsize=(5.2, 4.2))
    for kind, colour in zip(KINDS, ("#1f77b4", "#ff7f0e"), strict=True):
        data = figures.get(kind)
        if not data:
            continue
        coverage, risk = zip(*data["curve"], strict=True)
        axis.plot(coverage, risk, color=colour, label=f"{kind} (AURC {data['aurc']:.3f})")
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="coverage (share of answers kept, most confident first)", ylabel="risk")
    axis.set_title("\n".join(textwrap.wrap(title or "Risk-coverage", 60)), fontsize="small")
    axis.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(paths["risk_coverage"], dpi=110)
    plt.close(fig)
    return paths
