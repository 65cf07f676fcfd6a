"""`medvqa eval` end to end with a real (tiny, random) LLaVA model and real VQA-RAD images."""

# ruff: noqa: F811 - fixtures imported from tests/model_factory.py are test parameters by design

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from medvqa.cli import main
from medvqa.model.adapters import LoraSettings, attach_lora, save_adapter
from medvqa.model.loading import load_vlm
from tests.model_factory import tiny_checkpoints, torch_single_thread  # noqa: F401 - pytest fixtures

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad" / "images"
ROWS = [
    ("Is there a fracture?", "no", "CLOSED", "PRES", "CHEST"),
    ("Is this an MRI?", "yes", "CLOSED", "MODALITY", "HEAD"),
    ("Where is the lesion?", "left lung", "OPEN", "POS", "CHEST"),
]


@pytest.fixture
def data_file(tmp_path):
    if not IMAGES.is_dir():
        pytest.skip(f"VQA-RAD images not found at {IMAGES}")
    images = sorted(IMAGES.glob("*.jpg"))[:2]  # two images: the shuffled baseline shows each the other
    lines = [
        {
            "qid": str(i),
            "image": str(images[i % 2]),
            "question": q,
            "answer": a,
            "answer_type": t,
            "question_type": qt,
            "organ": o,
        }
        for i, (q, a, t, qt, o) in enumerate(ROWS)
    ]
    path = tmp_path / "mini.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def test_eval_reports_every_metric_with_the_baselines(db, cli_env, data_file, tiny_checkpoints):
    model = tiny_checkpoints("llava")
    result = run("--data", data_file, "--model", model, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("closed_accuracy", "open_exact_match", "open_token_f1", "open_recall", "overall_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["counts"] == {"n_closed": 2, "n_open": 1, "n": 3}
    assert set(report["by_question_type"]) == {"PRES", "MODALITY", "POS"}
    assert report["blind"]["counts"] == report["shuffled"]["counts"] == report["counts"]
    gain = report["closed_accuracy"] - report["shuffled"]["closed_accuracy"]
    assert report["closed_accuracy_gain_over_shuffled"] == pytest.approx(gain)
    assert report["model_ref"] == load_vlm(model, device="cpu").model_ref
    markdown = run("--data", data_file, "--model", model, "--no-blind", "--limit", 2)
    assert markdown.exit_code == 0 and "closed acc" in markdown.stdout.lower()
    assert "baseline" not in markdown.stdout  # --no-blind skips both baselines


def test_eval_with_an_adapter_names_it(db, cli_env, data_file, tiny_checkpoints, tmp_path):
    model = tiny_checkpoints("llava")
    peft_model = attach_lora(load_vlm(model, device="cpu").model, LoraSettings(r=2, alpha=4))
    digest = save_adapter(peft_model, tmp_path / "adapter")
    result = run("--data", data_file, "--model", model, "--adapter", tmp_path / "adapter", "--no-blind", "--json")
    assert result.exit_code == 0, result.output
    assert digest[:12] in json.loads(result.stdout)["adapter_ref"]


def test_eval_refuses_bad_input_in_one_line(db, cli_env, tmp_path, data_file, tiny_checkpoints):
    model = tiny_checkpoints("llava")
    cases = [
        (["--data", tmp_path / "nope.jsonl", "--model", model], "nope.jsonl"),
        (["--data", data_file, "--model", tmp_path / "empty"], "empty"),
        (["--data", data_file, "--model", model, "--adapter", "999"], "adapter 999 does not exist"),
        (["--data", data_file, "--model", model, "--adapter", "no-such-folder"], "neither an adapter id nor a folder"),
    ]
    (tmp_path / "empty").mkdir()
    for args, fragment in cases:
        result = run(*args)
        assert result.exit_code == 1, args
        assert result.stderr.startswith("medvqa: error:") and fragment in result.stderr
        assert result.stderr.count("\n") == 1
