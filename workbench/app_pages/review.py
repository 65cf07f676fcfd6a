"""Review (reviewer): the queue of answers to judge, signed adjudication, double reading, agreement between
readers, and held instances to confirm before anyone can ask about them."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from PIL import Image, ImageDraw

from compliance.policy import Action
from medvqa.services.ask import replay_model_input
from medvqa.services.images import clean_burned_in_text, confirm_no_burned_in_text
from medvqa.services.queries import answer_detail
from medvqa.services.review import (
    SIGNATURE_MEANINGS,
    QueueFilter,
    ReviewInput,
    Verdict,
    adjudicate,
    agreement,
    held_instances,
    review_queue,
)
from medvqa.services.viewer import render_slice
from workbench import resources
from workbench.auth import attempt, perform, require, show_notice

VERDICTS = {"correct": "Correct", "partial": "Partly correct", "incorrect": "Incorrect"}


def queue_filters(everything) -> QueueFilter:
    first, second, third = st.columns(3)
    modality = first.selectbox("Modality", ["", *sorted({r["modality"] for r in everything})], key="r_modality")
    kinds = sorted({r["question_type"] for r in everything if r["question_type"]})
    question_type = second.selectbox("Question type", ["", *kinds], key="r_type")
    adapter = third.selectbox("Adapter", ["", *sorted({r["adapter"] for r in everything})], key="r_adapter")
    return QueueFilter(modality, question_type, adapter)


def queue_tab(actor) -> None:
    db = resources.database()
    everything = attempt(lambda: review_queue(db, actor)) or []
    search = queue_filters(everything)
    rows = attempt(lambda: review_queue(db, actor, search)) or []
    st.caption(
        f"{len(rows)} answer(s) to judge: those the model abstained on first, then disagreements, "
        "then the lowest confidence"
    )
    st.dataframe(rows, hide_index=True, width="stretch", height=220)
    if not rows:
        return
    labels = {r["answer_id"]: f"#{r['answer_id']} {r['question'][:60]}" for r in rows}
    answer_id = st.selectbox("Answer to judge", list(labels), format_func=labels.__getitem__, key="r_answer")
    detail = attempt(lambda: answer_detail(db, actor, answer_id))
    if detail is not None:
        show_answer(actor, detail)
        adjudication_form(actor, answer_id)


def show_answer(actor, detail) -> None:
    left, right = st.columns([1, 2])
    replayed = attempt(lambda: replay_model_input(resources.database(), actor, resources.settings(), detail["id"]))
    if replayed is not None:
        image, same = replayed
        left.image(image, caption="the image the model saw" + ("" if same else " (REBUILT: hash differs)"))
    with right:
        st.text(f"Q: {detail['question']}")
        st.text(detail["answer"] or "(no answer)")  # plain text: never markdown or HTML from the model
        if detail["abstained"]:
            st.warning("The model abstained: this answer was below its confidence threshold, not shown as an answer.")
        if detail["confidence"] is not None:
            calibrated = "calibrated" if detail["calibration"] else "not calibrated"
            st.progress(float(detail["confidence"]), text=f"confidence {detail['confidence']:.2f} ({calibrated})")
        for item in detail["feedback"]:
            correction = f"; correction: {item['correction']}" if item["correction"] else ""
            st.text(f"rated {item['verdict']}{correction}")  # people's words are shown as text as well
        with st.expander("Provenance"):
            keys = (
                "model_ref",
                "adapter_ref",
                "prompt_version",
                "preprocess_hash",
                "latency_ms",
                "image_selection",
                "raw_confidence",
                "calibration",
            )
            st.json({k: detail[k] for k in keys})
        st.button(
            "Open the whole study in the viewer",
            key=f"open_study_{detail['id']}",
            on_click=_open_study,
            args=(detail["study_id"],),
        )
    if st.session_state.pop("open_study_requested", False):
        st.switch_page("app_pages/ask.py", query_params={"study": str(st.session_state["study_id"])})


STUDY_FILTERS = ("f_modality", "f_body", "f_text", "f_study_date", "f_imported")


def _open_study(study_id: int) -> None:
    """The Ask page opens on this study (every series and slice, its conversation), whatever was searched."""
    for key in STUDY_FILTERS:
        st.session_state.pop(key, None)
    st.session_state["study_id"] = study_id
    st.session_state["open_study_requested"] = True


def adjudication_form(actor, answer_id) -> None:
    """Signing re-asks the password and records the meaning of the signature (21 CFR 11.50)."""
    with st.form(f"adjudicate_{answer_id}"):
        verdict = st.radio(  # nothing preselected: an adjudication is a choice, never a default
            "Verdict", list(VERDICTS), format_func=VERDICTS.__getitem__, horizontal=True, index=None
        )
        reference = st.text_input("Reference answer (required unless correct)")
        comment = st.text_area("Comment (optional)")
        meaning = st.selectbox(
            "Meaning of your signature", list(SIGNATURE_MEANINGS), format_func=SIGNATURE_MEANINGS.__getitem__
        )
        password = st.text_input(f"Password of {actor.name}, to sign", type="password")
        submitted = st.form_submit_button("Sign and submit")
    if submitted and verdict is None:
        st.error("Choose a verdict first: nothing was signed or recorded.")
    elif submitted:
        item = ReviewInput(answer_id, verdict, meaning, password, reference or None, comment or None)
        perform(lambda: adjudicate(resources.database(), actor, item), f"Answer {answer_id} adjudicated and signed.")


def agreement_tab(actor) -> None:
    result = attempt(lambda: agreement(resources.database(), actor))
    if result is None:
        return
    left, right = st.columns(2)
    left.metric("Cohen's kappa", "-" if result.kappa is None else f"{result.kappa:.2f}")
    right.metric("Double-read answers", result.pairs)
    if not result.pairs:  # an empty chart would show a meaningless axis
        st.info("No answer has been read by two reviewers yet: agreement appears once one has.")
        return
    if result.observed is not None:
        st.caption(f"Observed agreement {result.observed:.0%}; rows: first reading, columns: second reading")
    table = pd.DataFrame(result.table).T.reindex(index=list(Verdict), columns=list(Verdict)).fillna(0).astype(int)
    st.dataframe(table)
    st.bar_chart(table)


def held_tab(actor) -> None:
    rows = attempt(lambda: held_instances(resources.database(), actor)) or []
    if not rows:
        st.info("No instance is waiting for a burned-in text check.")
        return
    st.caption(
        "Look for names, dates or numbers burned into the pixels. Confirm only images that carry none; "
        "where the detector outlined text (red boxes), you can have those regions blacked out instead."
    )
    for row in rows:
        volume = attempt(lambda row=row: resources.volume(actor, row["series_id"]))
        left, right = st.columns([1, 2])
        boxes = row["text_boxes"]
        if volume is not None:
            index = volume.instance_uids.index(row["sop_instance_uid"])
            shown = outlined(render_slice(volume, index), [b for b in boxes if b["frame"] == 0])
            left.image(shown, clamp=True, caption=f"instance {row['instance_id']}")
        found = f"{len(boxes)} text region(s) detected" if boxes else "no text detected by OCR"
        right.text(f"study {row['study_id']}, {row['modality']}, instance {row['instance_id']}: {found}")
        if right.button("Confirm: no burned-in text", key=f"confirm_{row['instance_id']}"):
            confirm = lambda row=row: confirm_no_burned_in_text(resources.database(), actor, [row["instance_id"]])  # noqa: E731
            perform(confirm, f"Instance {row['instance_id']} confirmed; questions about it are allowed now.")
        if boxes and right.button("Black out the detected text", key=f"clean_{row['instance_id']}"):
            clean = lambda row=row: clean_text(actor, row["instance_id"])  # noqa: E731
            perform(clean, f"Instance {row['instance_id']}: text regions blacked out; questions are allowed now.")


def clean_text(actor, instance_id):
    """Pixel cleaning, then forget cached volumes: they still hold the pixels with the text."""
    result = clean_burned_in_text(resources.database(), actor, resources.settings(), instance_id)
    resources.forget_volumes()
    return result


def outlined(pixels, boxes):
    """The slice as RGB with each detected word box drawn in red (boxes only: the text is never kept)."""
    image = Image.fromarray(pixels).convert("RGB")
    draw = ImageDraw.Draw(image)
    for box in boxes:
        draw.rectangle(
            (box["left"], box["top"], box["left"] + box["width"], box["top"] + box["height"]), outline=(255, 0, 0)
        )
    return image


def page() -> None:
    actor = require(Action.REVIEW_CREATE)
    st.title("Review")
    show_notice()
    queue, kappa, held = st.tabs(["Queue", "Agreement", "Held instances"])
    with queue:
        queue_tab(actor)
    with kappa:
        agreement_tab(actor)
    with held:
        held_tab(actor)


page()
