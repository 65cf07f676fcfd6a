"""bench/loop_bench.py --quick: the learning loop played through the services (ask, adjudicate, rounds, the
two-person promotion, eval) with the tiny LLaVA as the starting model, on real VQA-RAD images."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.model_factory import tiny_checkpoints, torch_single_thread  # noqa: F401 - pytest fixtures

BENCH = Path(__file__).resolve().parents[1] / "bench" / "loop_bench.py"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"


@pytest.mark.slow
def test_the_quick_loop_runs_two_rounds_through_the_services(tiny_checkpoints, tmp_path, monkeypatch):  # noqa: F811
    if not (DATA / "train.jsonl").is_file():
        pytest.skip(f"the loop bench plays VQA-RAD's training images; not found at {DATA}")
    spec = importlib.util.spec_from_file_location("loop_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "loop_bench", bench)  # its dataclasses look their module up by name
    spec.loader.exec_module(bench)
    split = bench.split_data(DATA, 0.2, 0)
    lines = (DATA / "test.jsonl").read_text().splitlines()
    test_images = {Path(json.loads(line)["image"]).name for line in lines if line.strip()}
    new = {Path(row["image"]).name for row in split.feedback_rows + split.holdout_rows}
    assert new and not new & test_images  # new cases are images the locked test set never shows
    assert not {Path(r["image"]).name for r in split.feedback_rows} & {
        Path(r["image"]).name for r in split.holdout_rows
    }
    assert not {Path(r["image"]).name for r in split.start_rows} & new

    output = tmp_path / "out"
    args = [
        "loop_bench.py",
        "--quick",
        "--start",
        str(tiny_checkpoints("llava")),
        "--home",
        str(tmp_path / "home"),
        "--output",
        str(output),
        "--test-limit",
        "6",
    ]
    monkeypatch.setattr(sys, "argv", args)
    bench.main()
    result = json.loads((output / "loop.json").read_text())
    rounds = result["rounds"]
    assert [row["round"] for row in rounds] == [0, 1, 2] and rounds[2]["reviewed"] == 24
    for row in rounds:
        assert 0 <= row["test_overall"] <= 1 and 0 <= row["holdout_overall"] <= 1
    assert all(row["gate"] == "passed" or row["gate"].startswith("failed") for row in rounds[1:])
    assert "| round | reviewed answers |" in (output / "loop.md").read_text()
    assert (output / "loop.png").read_bytes()[:4] == b"\x89PNG"

    from sqlalchemy import select

    from medvqa.config import load_settings
    from medvqa.db import AuditEvent
    from medvqa.db.engine import Database

    db = Database.from_settings(load_settings(home=tmp_path / "home"))
    with db.read_session() as session:
        actions = [event.action for event in session.scalars(select(AuditEvent))]
    db.dispose()
    assert actions.count("training:round:run") == 2 and actions.count("answer:review:create") >= 20
    promoted = sum(row["promoted"] for row in rounds[1:])
    assert actions.count("model:adapter:approve_promotion") == promoted  # every promotion took two people
