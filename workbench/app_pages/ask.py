"""Ask (clinician): find a study, look through it, ask a question about what is on screen, rate the answer."""

from __future__ import annotations

import html
import uuid

import streamlit as st
from streamlit.errors import StreamlitAPIException

from compliance.policy import Action
from medvqa.errors import MedVQAError
from medvqa.imaging.series import Window
from medvqa.pacs.query import StudyQuery
from medvqa.services.ask import QUESTION_TEMPLATES, AskResult, ImageChoice, ask, fill_template, replay_model_input
from medvqa.services.feedback import FeedbackInput, give_feedback
from medvqa.services.heatmaps import answer_heatmap
from medvqa.services.model_status import live_model_status, model_card
from medvqa.services.pacs import find_studies, retrieve_study
from medvqa.services.queries import StudyFilter, search_studies, study_series, study_thread
from medvqa.services.viewer import instance_metadata, render_slice, thumbnails, window_choices
from workbench import resources
from workbench.auth import attempt, require, still_signed_in

VERDICTS = {"correct": "Correct", "partial": "Partly correct", "incorrect": "Incorrect"}
FREE_TEXT = "free text"
SCOPES = ("this slice", "chosen slices", "the study (key slice)")


def pacs_panel(actor):
    """Find in PACS: search the configured PACS, retrieve a study through the import path, open it. The PACS's
    identifiers stay in this session only; the audit trail keeps keyed filters and the pseudonymous study."""
    settings = resources.settings()
    vias = [
        via for via, configured in (("dicomweb", settings.dicomweb_url), ("dimse", settings.dimse_pacs)) if configured
    ]
    if not vias:
        return
    with st.expander("Find in PACS", expanded=not st.session_state.get("pacs_results")):
        with st.form("pacs_find"):
            left, middle, right, far = st.columns(4)
            patient_id = left.text_input("Patient ID (* and ? match any)", key="pacs_patient_id")
            accession = middle.text_input("Accession number", key="pacs_accession")
            modality = right.text_input("Modality", placeholder="CT", key="pacs_modality")
            dates = far.text_input("Study date", placeholder="20240101-20240131", key="pacs_dates")
            via = st.radio("Through", vias, horizontal=True, key="pacs_via") if len(vias) > 1 else vias[0]
            searched = st.form_submit_button("Search the PACS")
        if searched:
            query = attempt(lambda: StudyQuery.build(patient_id, accession, modality, dates))
            found = attempt(lambda: find_studies(resources.database(), actor, query, settings, via)) if query else None
            st.session_state["pacs_results"] = None if found is None else (via, [s.as_dict() for s in found])
        results = st.session_state.get("pacs_results")
        if not results:
            return
        via, rows = results
        if not rows:
            st.info("The PACS has no study that matches.")
            return
        st.dataframe(rows, hide_index=True, width="stretch")
        labels = {
            row["study_uid"]: f"{row['study_date'] or '-'} {'/'.join(row['modalities'])} {row['description']} "
            f"({row['instances'] if row['instances'] is not None else '?'} images)"
            for row in rows
        }
        chosen = st.selectbox(
            "Study to retrieve", list(labels), format_func=labels.__getitem__, index=None, key="pacs_choice"
        )
        if st.button("Retrieve", disabled=chosen is None, key="pacs_retrieve"):
            _retrieve(actor, settings, chosen, via)


def _retrieve(actor, settings, study_uid, via):
    bar = st.progress(0.0, text="Retrieving...")

    def progress(done, total):
        bar.progress(done / total if total else 1.0, text=f"{done} of {total} image(s) retrieved")

    db = resources.database()
    report = attempt(lambda: retrieve_study(db, actor, study_uid, settings, via=via, progress=progress))
    if report is None:
        return
    summary = report.as_dict()
    counts = (
        f"{summary['imported']} imported, {report.already_stored} already here, {summary['refused']} refused, "
        f"{summary['held']} held for a burned-in text check"
    )
    if not report.complete:
        st.warning(f"The transfer stopped ({report.stopped}); {counts}. Retrieve again to complete it.")
    elif summary["refused"]:
        st.warning(f"Retrieved with refusals: {counts}.")
    if report.study_ids:
        st.session_state["study_id"] = report.study_ids[0]
        st.session_state["pacs_notice"] = f"Retrieved: {counts}. The study is open below."
        st.rerun()


def study_picker(actor):
    """Search and pick a study; returns its row or None."""
    db = resources.database()
    everything = attempt(lambda: search_studies(db, actor)) or []
    with st.expander("Search studies", expanded=True):
        left, middle, right = st.columns(3)
        modality = left.selectbox("Modality", ["", *sorted({r["modality"] for r in everything})], key="f_modality")
        body_part = middle.selectbox(
            "Body part", ["", *sorted({r["body_part"] for r in everything if r["body_part"]})], key="f_body"
        )
        text = right.text_input("UID or pseudonym contains", key="f_text")
        dates = left.date_input("Study date between", value=(), key="f_study_date")
        imported = middle.date_input("Imported between", value=(), key="f_imported")
        search = StudyFilter(modality, body_part, text, *_range(dates), *_range(imported))
        rows = [row for row in everything if search.matches(row)]
        st.caption(f"{len(rows)} of {len(everything)} studies")
        st.dataframe(rows, hide_index=True, height=180, width="stretch")
    if not rows:
        st.info("No study matches; change the search or import studies (`medvqa import`).")
        return None
    labels = {row["id"]: f"#{row['id']} {row['modality']} {row['body_part'] or ''} {row['patient']}" for row in rows}
    _open_linked_study(labels)
    chosen = st.selectbox("Study", list(labels), format_func=labels.__getitem__, key="study_id")
    if st.query_params.get("study") != str(chosen):
        st.query_params["study"] = str(chosen)  # the address names the open study: a refresh or a link keeps it
    return next(row for row in rows if row["id"] == chosen)


def _open_linked_study(labels):
    """The study named by the address (?study=ID), when the page opens on it (a refresh, a shared link)."""
    linked = st.query_params.get("study")
    if linked is None or "study_id" in st.session_state:
        return
    if linked.isdigit() and int(linked) in labels:
        st.session_state["study_id"] = int(linked)
    else:
        st.warning(f"The linked study {linked[:20]!r} is not among the studies listed here; choose one below.")


def _range(value):
    """A date_input range as (start, end); an empty or half-picked range filters nothing."""
    if isinstance(value, tuple) and len(value) == 2:
        return value
    return (None, None)


def viewer(actor, study):
    """Series picker, slice slider, window presets or manual centre/width, thumbnails, metadata.
    Returns (series id, volume, slice index, window) or None."""
    db = resources.database()
    series_rows = attempt(lambda: study_series(db, actor, study["id"])) or []
    if not series_rows:
        return None
    labels = {s["id"]: f"series {s['number'] or '-'} {s['modality']} ({s['instances']} images)" for s in series_rows}
    series_id = st.selectbox("Series", list(labels), format_func=labels.__getitem__, key="series_id")
    held = next(s["held"] for s in series_rows if s["id"] == series_id)
    if held:
        st.warning(f"{held} image(s) of this series wait for a reviewer's burned-in text check; asking is blocked.")
    volume = attempt(lambda: resources.volume(actor, series_id))
    if volume is None:
        return None
    index, slider = 0, f"slice_{series_id}"
    if volume.slice_count > 1:
        index = st.slider("Slice", 0, volume.slice_count - 1, volume.slice_count // 2, key=slider)
    window = window_picker(volume)
    pixels = attempt(lambda: render_slice(volume, index, window))
    if pixels is not None:
        st.image(pixels, caption=f"slice {index + 1} of {volume.slice_count}", clamp=True, width="stretch")
    cells = st.columns(8)  # the viewer sits in a column itself: one more level of columns is Streamlit's limit
    for position, (number, thumb) in enumerate(thumbnails(volume, count=8)):
        cell = cells[position % 8]
        cell.image(thumb, clamp=True, width="stretch")
        if volume.slice_count > 1:
            cell.button(str(number), key=f"thumb_{series_id}_{number}", on_click=_jump, args=(slider, number))
    with st.expander("Metadata (de-identified)"):
        tags = attempt(lambda: instance_metadata(db, actor, resources.settings(), volume, index)) or {}
        st.table([{"tag": key, "value": value} for key, value in tags.items()])
    return series_id, volume, index, window


def _jump(slider, number):
    """A thumbnail click moves the slice slider (runs before the rerun, so the slider shows the new value)."""
    st.session_state[slider] = number


def window_picker(volume):
    names = [*window_choices(volume), "manual"]
    left, middle, right = st.columns(3)
    name = left.selectbox("Window", names, key="window_name")
    if name != "manual":
        return name
    default = volume.window(None)
    centre = middle.number_input("Centre", value=float(default.center), step=10.0, key="window_centre")
    width = right.number_input("Width", value=float(default.width), min_value=1.0, step=10.0, key="window_width")
    return Window(centre, width, "custom")


def question_form(actor, study, view):
    """Scope, template and question; asks on click and keeps the result in the session."""
    series_id, volume, index, window = view
    scope = st.radio("Ask about", SCOPES, horizontal=True, key="scope")
    slices = index if scope == SCOPES[0] else None
    if scope == SCOPES[1]:
        chosen = st.multiselect("Slices (up to 16)", list(range(volume.slice_count)), default=[index], key="slices")
        slices = tuple(chosen)
    labels = {FREE_TEXT: FREE_TEXT, **{code: name for code, (name, _) in QUESTION_TEMPLATES.items()}}
    template = st.selectbox("Question template", list(labels), format_func=labels.__getitem__, key="template")
    finding = ""
    if template != FREE_TEXT and "{finding}" in QUESTION_TEMPLATES[template][1]:
        finding = st.text_input("Finding", placeholder="e.g. a fracture", key="finding")
    free = st.text_input("Question", key="question") if template == FREE_TEXT else ""
    if not st.button("Ask", type="primary", key="ask"):
        return
    question = free if template == FREE_TEXT else attempt(lambda: fill_template(template, finding))
    if question is None:
        return
    if slices == ():
        st.error("choose at least one slice")
        return
    choice = ImageChoice(series_id=series_id, slices=slices, window=window)
    settings, db = resources.settings(), resources.database()
    with st.chat_message("user"):
        st.text(question)
    with st.chat_message("assistant"):
        slot = st.empty()
        slot.caption("Asking the model...")

        def show(partial: str) -> None:  # the answer so far, as each token arrives (plain text, never markup)
            slot.text(partial)

        model = resources.model()
        # With a calibration the answer may be withheld (abstention is known only at the end): no streaming then.
        stream = show if model.calibration is None else None
        result = attempt(
            lambda: ask(db, actor, settings, model, study["id"], question, choice, _type(template), on_text=stream)
        )
    if result is not None:
        st.session_state["answer"] = result
        st.session_state[f"feedback_key_{result.answer_id}"] = uuid.uuid4().hex
        rerun_conversation()  # the thread now holds the answer, with its image, confidence and rating form


def _type(template):
    return "" if template == FREE_TEXT else template


# A confident yes/no can come from the question's wording alone (the model card's blind and shuffled baselines).
CONFIDENCE_NOTE = (
    "Not calibrated: this confidence is the model's certainty in its own words, not how often it is right. "
    "Check the image."
)
CALIBRATED_NOTE = (
    "Calibrated on held-out questions: of past answers at this confidence, about this share were right. "
    "It does not replace reading the image."
)


def answer_panel(actor, result: AskResult):
    """The newest answer of this session: the question, the answer set large, its confidence, the exact image
    the model saw, a one-line provenance with the full record one click away, and the banner."""
    with st.chat_message("user"):
        st.text(result.question)  # typed by a person: shown as text too
    with st.chat_message("assistant"):
        if result.abstained:
            abstention_notice(result)
        else:
            emphasised(result.text or "(the model gave no answer)")  # escaped: never markdown or HTML from the model
        if result.confidence is not None:
            calibrated = "calibrated" if result.calibration else "not calibrated"
            st.progress(float(result.confidence), text=f"confidence {result.confidence:.2f} ({calibrated})")
            st.caption(CALIBRATED_NOTE if result.calibration else CONFIDENCE_NOTE)
        else:
            st.caption("no confidence available")
        left, right = st.columns([1, 2])
        left.image(encoded(result.answer_id, result.image), caption="the exact image the model saw", width="stretch")
        with left.popover("Enlarge"):
            st.image(encoded(result.answer_id, result.image), width=384)
        right.caption(provenance_line(result.model_ref, result.adapter_ref, result.calibration is not None))
        with right.expander("Full provenance (hashes, image selection, decoding)"):
            st.json(result.provenance())
        heatmap_view(actor, result.answer_id, result.image)
        status = attempt(
            lambda: live_model_status(resources.database(), resources.settings(), result.model_ref, result.adapter_ref)
        )
        if status is not None:  # with every answer: a warning until an admin's signed validation covers the model
            (st.info if status.validated else st.warning)(status.banner())
            with st.expander("Model card: what the model is, how it was measured, what it must not be used for"):
                st.markdown(model_card())


def emphasised(text: str) -> None:
    """The answer set as the answer (larger, bold); escaped, so the model's text is never read as markup."""
    st.html(f'<p style="font-size:1.3rem;font-weight:600;margin:0 0 0.3rem 0">{html.escape(text)}</p>')


def provenance_line(model_ref: str, adapter_ref: str | None, calibrated: bool) -> str:
    """Model, adapter and calibration in one readable line; the full record is one click away."""
    adapter = f"adapter {adapter_ref[:12]}" if adapter_ref else "no adapter"
    return " · ".join([f"model {model_ref}", adapter, "calibrated" if calibrated else "not calibrated"])


def thread_item(actor, item):
    """One earlier question and answer about this study, as anyone allowed to view the study sees it."""
    selection = item["image_selection"] or {}
    scope = {"slice": "one slice", "montage": "chosen slices", "key_slice": "the study (key slice)"}
    with st.chat_message("user"):
        st.text(item["question"])
        asked = item["asked_at"].strftime("%Y-%m-%d %H:%M") if item["asked_at"] else ""
        st.caption(f"{item['asked_by']}, {asked}, about {scope.get(selection.get('kind'), 'an image')}")
    with st.chat_message("assistant"):
        if item["abstained"]:
            st.caption("The model abstained (not confident enough); its raw answer was:")
        emphasised(item["answer"] or "(no answer)")
        details = provenance_line(item["model_ref"], item["adapter_ref"], item["calibrated"])
        confidence = "-" if item["confidence"] is None else f"{item['confidence']:.2f}"
        rating = f" · rated {VERDICTS.get(item['rating'], item['rating'])}" if item["rating"] else ""
        st.caption(f"confidence {confidence} · {details}{rating}")
        image = _replayed(actor, item["answer_id"])
        if image is not None:
            with st.popover("The image the model saw"):
                st.image(encoded(item["answer_id"], image), width=384)
            heatmap_view(actor, item["answer_id"], image)


def encoded(answer_id, image):
    """The image as PNG bytes, encoded once per session: the thread is drawn again at every question, and
    encoding twenty images each time would be most of what a clinician waits for after the model."""
    import io

    cache = st.session_state.setdefault("encoded_images", {})
    if answer_id not in cache:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        cache[answer_id] = buffer.getvalue()
    return cache[answer_id]


def heatmap_view(actor, answer_id, image):
    """Where the model looked, on request: the map of the model that answered (made once, stored with its
    hash), laid over the exact image with an opacity control; no map when the model fails both sanity checks."""
    if not st.toggle("Where the model looked", key=f"heat_{answer_id}"):
        return
    with st.spinner("Tracing the answer back to the image..."):
        heat = attempt(
            lambda: answer_heatmap(resources.database(), actor, resources.settings(), resources.model(), answer_id)
        )
    if heat is None:
        return
    checks = heat.checks
    tested = (
        f"sanity checks, rank correlation with randomised weights {checks['weights_randomised_rank_correlation']:.2f}"
        f" and with another image {checks['other_image_rank_correlation']:.2f} (below {checks['changed_below']}: "
        "the map changed, as it must)"
    )
    if not heat.trusted:
        st.info(
            f"No heatmap: this model's maps failed both sanity checks, so they cannot say where it looked; {tested}."
        )
        return
    opacity = st.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key=f"opacity_{answer_id}")
    st.image(heat.overlay(image, opacity), caption="where the model looked (brighter: the answer depends more on it)")
    st.caption(f"heatmap {heat.sha256[:12]} · gradient of the answer at the image tokens · {tested}")


def _replayed(actor, answer_id):
    """The exact image an earlier answer was given for, rebuilt once per session from its recorded selection."""
    cache = st.session_state.setdefault("replayed_images", {})
    if answer_id not in cache:
        try:
            cache[answer_id] = replay_model_input(resources.database(), actor, resources.settings(), answer_id)[0]
        except MedVQAError:  # e.g. the image is held again after a cleaning: the thread shows no image, no error
            cache[answer_id] = None
    return cache[answer_id]


def rerun_conversation():
    """Run the conversation again, alone when it runs as its own fragment (the viewer and the search stay as
    they are, so the answer shows without redrawing the page), else the whole page."""
    try:
        st.rerun(scope="fragment")
    except StreamlitAPIException:  # the conversation ran as part of a whole-page run
        st.rerun()


@st.fragment
def conversation(actor, study, view):
    """The questions and answers about this study (stored, so they come back for anyone allowed to see it), the
    newest answer with its rating form, and the question form at the bottom. A fragment: asking, rating and
    reading rerun this column only, so a clinician waits for the model, not for the page."""
    if not still_signed_in():  # a fragment rerun skips the app's session checks: make them here
        st.rerun()
    st.subheader("Conversation")
    current = st.session_state.get("answer")
    current = current if isinstance(current, AskResult) and current.study_id == study["id"] else None
    thread = attempt(lambda: study_thread(resources.database(), actor, study["id"])) or []
    earlier = [item for item in thread if current is None or item["answer_id"] != current.answer_id]
    if not thread and current is None:
        st.caption("No question has been asked about this study yet.")
    for item in earlier:
        thread_item(actor, item)
    if current is not None:
        answer_panel(actor, current)
        feedback_form(actor, current)
    question_form(actor, study, view)


def abstention_notice(result: AskResult):
    """Below the threshold the answer is not presented as one; the raw answer stays one click away."""
    detail = result.calibration or {}
    threshold = detail.get("threshold")
    below = "no confidence reaches" if threshold is None else f"below the threshold {threshold:.2f} that reaches"
    st.warning(
        f"The model is not confident enough to answer (confidence {result.confidence or 0:.2f}, {below} its "
        f"precision target on held-out {detail.get('kind', '')} questions). This question is now at the top of "
        "the review queue."
    )
    if st.toggle("Show the model's raw answer anyway", key=f"raw_{result.answer_id}"):
        st.text(f"Raw answer (not confident): {result.text or '(none)'}")


def feedback_form(actor, result: AskResult):
    """One click is one record: the idempotency key lives in the session, made when the answer arrived."""
    done = st.session_state.get(f"feedback_done_{result.answer_id}")
    if done:
        st.success(f"Your rating is recorded (feedback #{done}).")
        return
    with st.form(f"feedback_{result.answer_id}"):
        verdict = st.radio(  # nothing preselected: a rating is a choice, never a default that feeds training
            "Rate the answer",
            list(VERDICTS),
            format_func=VERDICTS.__getitem__,
            horizontal=True,
            index=None,
            key=f"verdict_{result.answer_id}",
        )
        correction = st.text_input("Corrected answer (optional)", key=f"correction_{result.answer_id}")
        comment = st.text_area("Comment (optional)")
        submitted = st.form_submit_button("Submit rating")
    if not submitted:
        return
    if verdict is None:
        st.error("Choose Correct, Partly correct or Incorrect first: nothing was recorded.")
        return
    key = st.session_state.setdefault(f"feedback_key_{result.answer_id}", uuid.uuid4().hex)
    item = FeedbackInput(result.answer_id, verdict, key, correction=correction or None, comment=comment or None)
    stored = attempt(lambda: give_feedback(resources.database(), actor, item))
    if stored is not None:
        st.session_state[f"feedback_done_{result.answer_id}"] = stored.feedback.id
        rerun_conversation()


def page():
    actor = require(Action.QUESTION_ASK)
    st.title("Ask")
    notice = st.session_state.pop("pacs_notice", None)
    if notice:
        st.success(notice)
    pacs_panel(actor)
    study = study_picker(actor)
    if study is None:
        return
    view_column, talk_column = st.columns([3, 2], gap="large")
    with view_column:
        view = viewer(actor, study)
    if view is None:
        return
    with talk_column:
        conversation(actor, study, view)


page()
