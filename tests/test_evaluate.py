"""The JSONL loader and the evaluation harness: real images in, recorded predictor calls, both baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from medvqa.errors import InvalidInput
from medvqa.training.data import VQAExample, load_vqa_jsonl, write_vqa_jsonl
from medvqa.training.evaluate import compare_with_baselines, evaluate, other_images
from medvqa.training.metrics import METRIC_KEYS

VQA_RAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two grey-level images of different sizes and three questions about them."""
    (tmp_path / "images").mkdir()
    Image.new("L", (8, 6), color=200).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (5, 7), color=(10, 120, 250)).save(tmp_path / "images" / "b.png")
    rows = [
        {"qid": 1, "image": "images/a.png", "question": "Is it bright?", "answer": "Yes", "organ": "HEAD"},
        {"qid": "2", "image": "images/b.png", "question": "Which colour?", "answer": "blue", "question_type": "COLOR"},
        {"qid": "3", "image": "images/a.png", "question": "Modality?", "answer": "no", "answer_type": "open"},
    ]
    return write_jsonl(tmp_path / "set.jsonl", rows)


def test_load_resolves_images_and_infers_answer_type(dataset: Path) -> None:
    examples = load_vqa_jsonl(dataset)
    assert [e.qid for e in examples] == ["1", "2", "3"]
    assert examples[0].image_path == (dataset.parent / "images" / "a.png").resolve()
    assert examples[0].image_path.is_absolute()
    assert [e.answer_type for e in examples] == ["CLOSED", "OPEN", "OPEN"]  # yes -> CLOSED; given "open" wins
    assert (examples[0].question_type, examples[0].organ) == ("UNKNOWN", "HEAD")
    assert (examples[1].question_type, examples[1].organ) == ("COLOR", "UNKNOWN")


GOOD = {"qid": "9", "image": "images/a.png", "question": "Q?", "answer": "yes"}
BAD_LINES = [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    ({**GOOD, "image": "images/missing.png"}, "line 2: image 'images/missing.png' not found"),
    ({**GOOD, "answer": "  "}, "line 2: field 'answer' is missing or empty"),
    ({k: v for k, v in GOOD.items() if k != "question"}, "line 2: field 'question' is missing"),
    ({**GOOD, "answer_type": "MAYBE"}, "line 2: answer_type 'MAYBE' is not one of"),
    ({**GOOD, "qid": "1"}, "line 2: qid '1' appears twice"),
    ({**GOOD, "organ": 3}, "line 2: field 'organ' must be text"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_load_names_the_bad_line(dataset: Path, bad: object, message: str) -> None:
    first = dataset.read_text(encoding="utf-8").splitlines()[0]
    path = write_jsonl(dataset.parent / "bad.jsonl", [first, bad])
    with pytest.raises(InvalidInput, match=message):
        load_vqa_jsonl(path)


def test_written_examples_read_back_unchanged_from_any_folder(dataset: Path, tmp_path: Path) -> None:
    examples = load_vqa_jsonl(dataset)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_vqa_jsonl(examples, elsewhere / "copy.jsonl")  # image paths stay valid away from the images folder
    assert load_vqa_jsonl(elsewhere / "copy.jsonl") == examples


def test_load_refuses_empty_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="holds no examples"):
        load_vqa_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(InvalidInput, match="cannot read"):
        load_vqa_jsonl(tmp_path / "absent.jsonl")


@pytest.mark.skipif(not VQA_RAD.is_dir(), reason="the shared VQA-RAD copy is not present")
def test_load_real_vqa_rad_test_split() -> None:
    examples = load_vqa_jsonl(VQA_RAD / "test.jsonl")
    assert len(examples) == 451
    assert sum(e.answer_type == "CLOSED" for e in examples) == 272
    assert sum(e.answer_type == "OPEN" for e in examples) == 179
    assert all(e.image_path.is_absolute() and e.image_path.is_file() for e in examples)
    assert {e.organ for e in examples} == {"HEAD", "CHEST", "ABD"}


class Recorder:
    """A predictor that records what it was given and answers from a fixed table of questions."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, tuple[int, int], str, set[tuple[int, ...]]]] = []

    def __call__(self, image: Image.Image, question: str) -> str:
        colours = {tuple(pixel) for _, pixel in image.getcolors() or []}  # type: ignore[arg-type]
        self.calls.append((image.mode, image.size, question, colours))
        return self.answers[question]


ANSWERS = {"Is it bright?": "yes", "Which colour?": "Blue.", "Modality?": "ct"}


def test_evaluate_passes_rgb_images_and_questions_in_order(dataset: Path) -> None:
    predict = Recorder(ANSWERS)
    report = evaluate(load_vqa_jsonl(dataset), predict)
    assert [(mode, size, q) for mode, size, q, _ in predict.calls] == [
        ("RGB", (8, 6), "Is it bright?"),
        ("RGB", (5, 7), "Which colour?"),
        ("RGB", (8, 6), "Modality?"),
    ]
    assert predict.calls[0][3] == {(200, 200, 200)}  # the grey PNG, converted to RGB
    assert predict.calls[1][3] == {(10, 120, 250)}
    assert report.closed_accuracy == 1.0  # "yes" for "Yes"
    assert report.open_exact_match == 0.5  # "Blue." right, "ct" for "no" wrong
    assert report.overall_accuracy == pytest.approx(2 / 3)


def test_blind_passes_a_black_image_of_the_same_size(dataset: Path) -> None:
    predict = Recorder(ANSWERS)
    evaluate(load_vqa_jsonl(dataset), predict, blind=True, progress=True)
    assert [(mode, size, colours) for mode, size, _, colours in predict.calls] == [
        ("RGB", (8, 6), {(0, 0, 0)}),
        ("RGB", (5, 7), {(0, 0, 0)}),
        ("RGB", (8, 6), {(0, 0, 0)}),
    ]


def looks(image: Image.Image, question: str) -> str:
    """Answers 'yes' only when the image has any non-black pixel: a model that uses the image."""
    return "yes" if image.getbbox() is not None else "no"


def reads(image: Image.Image, question: str) -> str:
    """Answers 'yes' only for the grey image a.png: a model that reads the image it is asked about."""
    return "yes" if image.getcolors() == [(48, (200, 200, 200))] else "no"


def test_compare_with_baselines_nests_the_baseline(dataset: Path) -> None:
    examples = load_vqa_jsonl(dataset)
    report = compare_with_baselines(examples, looks)
    assert report.blind is not None and report.shuffled is not None
    assert report.closed_accuracy == 1.0  # sees the grey image: "yes", reference "Yes"
    assert report.blind.closed_accuracy == 0.0  # blank image: "no"
    assert report.closed_accuracy_gain_over_blind == 1.0
    assert report.blind.open_exact_match == 0.5  # q3's reference is "no": the blind run gets it
    # Any real image makes `looks` say "yes": it beats the blind run without reading the image it was asked about.
    assert report.shuffled.closed_accuracy == 1.0 and report.closed_accuracy_gain_over_shuffled == 0.0
    data = report.to_json()
    top = {*METRIC_KEYS, "counts", "by_question_type", "by_organ"}
    gains = {"closed_accuracy_gain_over_blind", "closed_accuracy_gain_over_shuffled"}
    assert set(data) == top | {"blind", "shuffled"} | gains
    assert set(data["blind"]) == set(data["shuffled"]) == top
    assert (
        data["blind"]["counts"] == data["shuffled"]["counts"] == data["counts"] == {"n_closed": 1, "n_open": 2, "n": 3}
    )


def test_only_a_predictor_that_reads_its_image_gains_over_shuffled(dataset: Path) -> None:
    report = compare_with_baselines(load_vqa_jsonl(dataset), reads)
    assert report.closed_accuracy == 1.0  # q1 about the grey a.png: "yes"
    assert report.shuffled is not None and report.shuffled.closed_accuracy == 0.0  # shown the blue b.png: "no"
    assert report.closed_accuracy_gain_over_shuffled == 1.0
    assert "Closed accuracy gain over shuffled: +100.0 points" in report.to_markdown()


def test_shuffled_asks_each_question_about_another_image_of_the_set(dataset: Path) -> None:
    predict = Recorder(ANSWERS)
    evaluate(load_vqa_jsonl(dataset), predict, shuffled=True)
    assert [(size, question, colours) for _, size, question, colours in predict.calls] == [
        ((5, 7), "Is it bright?", {(10, 120, 250)}),  # asked about a.png, shown b.png
        ((8, 6), "Which colour?", {(200, 200, 200)}),  # asked about b.png, shown a.png
        ((5, 7), "Modality?", {(10, 120, 250)}),  # every question about a.png gets the same other image
    ]


@pytest.mark.parametrize("count", range(1, 8))
def test_other_images_never_keeps_an_image_and_uses_each_once(count: int, tmp_path: Path) -> None:
    examples = [VQAExample(str(i), tmp_path / f"{i}.png", "Q?", "yes", "CLOSED", "PRES", "HEAD") for i in range(count)]
    swap = other_images([*examples, *examples])  # repeated images count once
    if count == 1:
        assert swap == {}
        return
    assert set(swap) == set(swap.values()) == {e.image_path for e in examples}
    assert all(shown != asked for asked, shown in swap.items())
    assert swap == other_images(list(reversed(examples)))  # the order of the questions does not matter


def test_shuffled_needs_two_images_and_excludes_blind(dataset: Path) -> None:
    one_image = [e for e in load_vqa_jsonl(dataset) if e.image_path.name == "a.png"]
    with pytest.raises(InvalidInput, match="at least two different images"):
        evaluate(one_image, looks, shuffled=True)
    with pytest.raises(InvalidInput, match="not both"):
        evaluate(one_image, looks, blind=True, shuffled=True)
    report = compare_with_baselines(one_image, looks)
    assert report.blind is not None and report.shuffled is None
    assert report.closed_accuracy_gain_over_shuffled is None and "shuffled" not in report.to_json()


def test_predictor_must_return_text(dataset: Path) -> None:
    with pytest.raises(InvalidInput, match="question 1: the predictor returned NoneType"):
        evaluate(load_vqa_jsonl(dataset), lambda image, question: None)  # type: ignore[arg-type,return-value]


def test_unreadable_image_names_the_question(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    example = VQAExample("q7", tmp_path / "broken.jpg", "Q?", "yes", "CLOSED", "PRES", "HEAD")
    with pytest.raises(InvalidInput, match="question q7: cannot read image"):
        evaluate([example], looks)
