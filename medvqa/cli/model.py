"""`medvqa eval`, `medvqa calibrate`, `medvqa train`: measure, calibrate and fine-tune a model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from medvqa.cli.support import emit as _emit
from medvqa.cli.support import json_option as _json_option
from medvqa.cli.support import open_database as _open_database
from medvqa.cli.support import signed_in as _signed_in
from medvqa.cli.support import training_options, user_option

if TYPE_CHECKING:
    from medvqa.model.adapters import LoraSettings
    from medvqa.training.train import TrainSettings


@click.command("eval")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="VQA jsonl (image, question, answer...).")
@click.option("--model", "model", type=click.Path(path_type=Path), help="Local checkpoint; default: the workbench's.")
@click.option("--adapter", help="Adapter id or folder; default with no --model: the live adapter, if any.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N questions (a quick check).")
@click.option(
    "--no-blind", is_flag=True, help="Skip the baselines (the same model with black images, and with other images)."
)
@click.option(
    "--predictions",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write one JSON line per question and condition (own, blind, shuffled) with answer and confidence.",
)
@click.option(
    "--plots",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write the reliability diagram and risk-coverage curve (PNG) to this folder; the report links them.",
)
@click.option("--raw-confidence", is_flag=True, help="Ignore the weights' calibration.json: raw confidences.")
@_json_option
def eval_command(
    data: Path,
    model: Path | None,
    adapter: str | None,
    limit: int | None,
    no_blind: bool,
    predictions: Path | None,
    plots: Path | None,
    raw_confidence: bool,
    as_json: bool,
) -> None:
    """Evaluate a model on a VQA file: closed accuracy, open exact match, token F1 and recall, overall
    accuracy, per question type and organ, two baselines that show whether the image is used (blind: black
    images; shuffled: each question asked about another image of the file), and how far the confidences hold
    (ECE, Brier, risk-coverage, selective accuracy; calibrated when the weights carry a calibration.json)."""
    from medvqa.config import load_settings
    from medvqa.services.evaluation import run_evaluation
    from medvqa.training.calibration import write_plots
    from medvqa.training.evaluate import write_predictions

    report = run_evaluation(
        _open_database(),
        load_settings(),
        data,
        model=model,
        adapter=adapter,
        limit=limit,
        baselines=not no_blind,
        progress=not as_json,
        calibrated=not raw_confidence,
    )
    result, markdown = report.to_json(), report.to_markdown()
    if predictions is not None:
        result["predictions"] = {"file": str(predictions), "lines": write_predictions(report, predictions)}
    if plots is not None:
        paths = write_plots(report.calibration(), plots, title=f"{report.model_ref} on {data.name}")
        result["plots"] = {name: str(path) for name, path in paths.items()}
        markdown += "".join(f"\n![{name}]({path})\n" for name, path in paths.items())
    _emit(as_json, result, markdown)


@click.command("calibrate")
@click.option(
    "--data", required=True, type=click.Path(path_type=Path), help="Held-out VQA jsonl (never the locked test set)."
)
@click.option("--model", "model", type=click.Path(path_type=Path), help="Local checkpoint; default: the workbench's.")
@click.option("--adapter", help="Adapter id or folder; default with no --model: the live adapter, if any.")
@user_option("the ML engineer who fits it")
@_json_option
def calibrate_command(data: Path, model: Path | None, adapter: str | None, username: str, as_json: bool) -> None:
    """Fit the confidence calibration and abstention thresholds of the weights on held-out questions and write
    calibration.json beside them (the adapter's folder, or the model's); answers then carry it."""
    from medvqa.config import load_settings
    from medvqa.services.calibration import fit_model_calibration
    from medvqa.training.calibration import MIN_FIT

    database = _open_database()
    actor = _signed_in(database, username)
    outcome = fit_model_calibration(
        database, actor, load_settings(), data, model=model, adapter=adapter, progress=not as_json
    )
    lines = [f"{outcome.path} ({outcome.sha256[:12]})"]
    for kind, entry in outcome.calibration.kinds.items():
        threshold = "always abstain" if entry.threshold is None else f"abstain below {entry.threshold:.3f}"
        if entry.held_out < MIN_FIT:
            threshold = "too few to set a threshold"
        lines.append(
            f"{kind}: {entry.calibrator.method} on {entry.held_out} held-out answers; {threshold} "
            f"(precision target {entry.precision_target:.0%})"
        )
    _emit(as_json, outcome.as_dict(), "\n".join(lines))


@click.command("train")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="VQA jsonl to train on.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Folder for the adapter and record.")
@click.option("--model", "model", type=click.Path(path_type=Path), help="Local checkpoint; default: the workbench's.")
@training_options
@click.option(
    "--train-vision",
    is_flag=True,
    help="Also train the vision tower and projector (saved in the adapter; vLLM cannot serve such an adapter).",
)
@_json_option
def train_command(
    data: Path,
    output: Path,
    model: Path | None,
    training: tuple[TrainSettings, LoraSettings],
    as_json: bool,
) -> None:
    """Train a LoRA adapter (LoRA-only unless --train-vision) on a VQA file and save it to --output.
    On GPUs run it through accelerate: `accelerate launch -m medvqa.cli train --data ... --output ...`
    (or `accelerate launch --no_python medvqa train ...`); not exercised here, where CI has no GPU."""
    from medvqa.config import load_settings
    from medvqa.services.evaluation import base_model_path
    from medvqa.training.train import train_adapter

    settings, lora = training
    base = model if model is not None else base_model_path(load_settings())
    result = train_adapter(base, data, output, lora, settings, progress=not as_json)
    text = (
        f"adapter {result.adapter_sha256[:12]} in {result.adapter_dir}: {result.steps} steps, "
        f"loss {result.train_loss:.4f}, {result.seconds:.1f} s"
    )
    _emit(as_json, result.as_dict(), text)
