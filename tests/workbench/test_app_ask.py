"""The Ask page through AppTest, with the tiny LLaVA and a real SQLite database."""

from __future__ import annotations

import html
import itertools

import numpy as np
from sqlalchemy import func, select

from medvqa.db import Adapter, Answer, Feedback
from tests.workbench.apptest import errors, signed_in


def answers(app):
    """The answers shown large (st.html with the escaped answer text)."""
    return [element for element in app.get("html") if "font-size:1.3rem" in element.proto.body]


def by_label(app, label):
    return next(button for button in app.button if button.label == label)


def ask_about_slice(app, question="Is there a fracture?"):
    app.run()
    app.text_input(key="question").input(question)
    app.button(key="ask").click()
    return app.run()


def test_ask_shows_the_answer_as_plain_text_with_confidence_image_and_provenance(db, app_env, ct_study, clinician):
    app = ask_about_slice(signed_in(clinician))
    assert not app.exception and not errors(app)
    result = app.session_state["answer"]
    with db.read_session() as session:
        stored = session.get(Answer, result.answer_id)
    assert stored.text == result.text and stored.preprocess_hash == result.preprocess_hash
    assert result.selection["slices"] == [1]  # the slider starts on the middle slice of three
    # the answer set large, escaped: the model's text is never read as markup
    assert html.escape(result.text) in [
        element.proto.body.split(">", 1)[1].rsplit("<", 1)[0] for element in answers(app)
    ]
    provenance = app.json[0].value
    assert all(key in provenance for key in ("model", "adapter", "prompt_version", "preprocess_hash", "latency_ms"))
    assert any("the exact image the model saw" in str(image.proto) for image in app.get("image"))
    [banner] = [element.value for element in app.warning if "Not validated for clinical use" in element.value]
    assert banner.endswith("its accuracy has not been measured by medvqa.")  # the tiny test model: never measured
    assert any(expander.label.startswith("Model card") for expander in app.expander)
    if result.confidence is not None:
        assert app.get("progress")[0].proto.value == round(result.confidence * 100)
        assert any("not how often it is right" in caption.value for caption in app.caption)


def test_moving_the_slice_and_window_changes_what_is_asked_about(db, app_env, ct_study, clinician):
    app = signed_in(clinician).run()
    app.slider(key=f"slice_{ct_study[1]}").set_value(2)
    app.selectbox(key="window_name").set_value("manual").run()
    app.number_input(key="window_width").set_value(123.0)
    app.text_input(key="question").input("Is it normal?")
    app.button(key="ask").click().run()
    selection = app.session_state["answer"].selection
    assert selection["slices"] == [2] and selection["window"]["width"] == 123.0


def test_templates_and_chosen_slices(db, app_env, ct_study, clinician):
    app = signed_in(clinician).run()
    app.radio(key="scope").set_value("chosen slices").run()
    app.multiselect(key="slices").set_value([0, 2])
    app.selectbox(key="template").set_value("PRES").run()
    app.button(key="ask").click().run()
    assert errors(app) == ["the presence question needs a finding, e.g. 'a fracture'"]
    app.text_input(key="finding").input("a fracture")
    app.button(key="ask").click().run()
    result = app.session_state["answer"]
    assert result.question == "Is there a fracture in this image?" and result.question_type == "PRES"
    assert result.selection["kind"] == "montage" and result.selection["slices"] == [0, 2]


def test_rating_is_one_record_even_when_submitted_twice(db, app_env, ct_study, clinician):
    app = ask_about_slice(signed_in(clinician))
    answer_id = app.session_state["answer"].answer_id
    app.radio(key=f"verdict_{answer_id}").set_value("partial")
    app.text_input(key=f"correction_{answer_id}").input("a hairline fracture")
    by_label(app, "Submit rating").click().run()
    assert app.session_state[f"feedback_done_{answer_id}"]
    assert any("Your rating is recorded" in element.value for element in app.success)
    app.run()  # a rerun stores nothing new
    # a double click: the same form submitted again before the page showed the first result
    del app.session_state[f"feedback_done_{answer_id}"]
    app.run()
    app.radio(key=f"verdict_{answer_id}").set_value("partial")
    app.text_input(key=f"correction_{answer_id}").input("a hairline fracture")
    by_label(app, "Submit rating").click().run()
    assert not errors(app)
    with db.read_session() as session:
        rows = session.scalars(select(Feedback)).all()
    assert [(row.answer_id, row.verdict.value, row.correction) for row in rows] == [
        (answer_id, "partial", "a hairline fracture")
    ]


def test_no_rating_is_preselected_and_submitting_without_one_records_nothing(db, app_env, ct_study, clinician):
    app = ask_about_slice(signed_in(clinician))
    assert app.radio(key=f"verdict_{app.session_state['answer'].answer_id}").value is None
    by_label(app, "Submit rating").click().run()
    assert errors(app) == ["Choose Correct, Partly correct or Incorrect first: nothing was recorded."]
    with db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(Feedback)) == 0


def test_study_search_filters_the_list(db, app_env, ct_study, clinician):
    app = signed_in(clinician).run()
    app.text_input(key="f_text").input("no-such-study").run()
    assert "No study matches" in app.info[0].value
    app.text_input(key="f_text").input("").run()
    app.selectbox(key="f_modality").set_value("CT").run()
    assert app.selectbox(key="study_id").value == ct_study[0]


def test_held_series_blocks_asking_with_a_reason(db, app_env, settings, tmp_path, clinician):
    from tests.workbench.conftest import import_ct

    import_ct(db, settings, tmp_path / "us", count=1, modality="US")
    app = signed_in(clinician).run()
    app.selectbox(key="f_modality").set_value("US").run()
    assert "wait for a reviewer's burned-in text check" in app.warning[0].value
    app.text_input(key="question").input("Is there a fracture?")
    app.button(key="ask").click().run()
    assert any("reviewer must confirm them first" in message for message in errors(app))
    with db.read_session() as session:
        assert session.scalar(select(func.count(Answer.id))) == 0


def test_model_output_is_never_rendered_as_markdown(db, app_env, ct_study, clinician, monkeypatch):
    from medvqa.model import generation

    real = generation.answer

    def shouting(*args, **kwargs):
        import dataclasses

        return dataclasses.replace(real(*args, **kwargs), text="**bold** <script>alert(1)</script>")

    monkeypatch.setattr(generation, "answer", shouting)
    app = ask_about_slice(signed_in(clinician))
    [shown] = [element.proto.body for element in answers(app)]
    assert "**bold** &lt;script&gt;alert(1)&lt;/script&gt;" in shown and "<script>" not in shown
    assert not any("<script>" in element.value for element in app.markdown)
    assert np.asarray(app.session_state["answer"].image).shape == (384, 384, 3)


def test_a_thumbnail_click_moves_the_slice_and_a_new_study_hides_the_old_answer(db, app_env, ct_study, clinician):
    app = ask_about_slice(signed_in(clinician))
    assert app.session_state["answer"].study_id == ct_study[0]
    app.button(key=f"thumb_{ct_study[1]}_0").click().run()
    assert app.slider(key=f"slice_{ct_study[1]}").value == 0
    assert answers(app)
    app.text_input(key="f_text").input("no-such-study").run()
    assert not answers(app) and "Conversation" not in [element.value for element in app.subheader]


def test_after_a_promotion_the_app_answers_with_the_new_live_adapter(db, app_env, ct_study, clinician, tmp_path):
    from medvqa.model.adapters import LoraSettings, attach_lora, save_adapter
    from medvqa.model.loading import load_vlm
    from medvqa.services.promotion import approve_promotion, request_promotion
    from tests import factories
    from tests.workbench.test_review_models_audit_services import make_adapter

    app = ask_about_slice(signed_in(clinician))
    assert app.session_state["answer"].adapter_ref is None  # no adapter is live yet: the bare base answers
    folder = tmp_path / "adapter"
    sha = save_adapter(attach_lora(load_vlm(app_env["MEDVQA_BASE_MODEL"]).model, LoraSettings(r=4, alpha=8)), folder)
    adapter_id = make_adapter(db, "round1")
    with db.session() as session, session.begin():  # point the row at the real folder and weights
        row = session.get(Adapter, adapter_id)
        row.path, row.sha256 = str(folder), sha
    engineer, admin = factories.make_user(db, "ml_engineer"), factories.make_user(db, "admin")
    request_promotion(db, engineer, adapter_id, "test round")
    approve_promotion(db, admin, adapter_id)
    app.button(key="ask").click().run()
    result = app.session_state["answer"]
    assert result.adapter_ref == sha
    with db.read_session() as session:
        assert session.get(Answer, result.answer_id).adapter_id == adapter_id


def test_the_conversation_comes_back_for_anyone_allowed_to_see_the_study(db, app_env, ct_study, clinician):
    from tests import factories

    first = ask_about_slice(signed_in(clinician), "Is there a fracture?")
    first_answer = first.session_state["answer"]
    second = ask_about_slice(first, "Where is the lesion?")  # the same session asks again: the thread grows
    assert len(answers(second)) == 2 and second.session_state["answer"].answer_id != first_answer.answer_id
    reviewer = factories.make_user(db, "reviewer")
    other = signed_in(reviewer).run()  # another person, another session: the stored thread, oldest first
    assert not other.exception and not errors(other)
    users = [element.value for element in other.text]
    assert users.index("Is there a fracture?") < users.index("Where is the lesion?")
    assert len(answers(other)) == 2
    captions = [element.value for element in other.caption]
    assert any(caption.startswith(f"{clinician.name}, ") for caption in captions)
    assert any("not calibrated" in caption and "confidence" in caption for caption in captions)


def test_asking_streams_the_answer_as_it_is_generated(db, settings, ct_study, clinician):
    from medvqa.services.ask import ImageChoice, ask, load_answering_model

    seen: list[str] = []
    result = ask(
        db,
        clinician,
        settings,
        load_answering_model(db, settings),
        ct_study[0],
        "Is there a fracture?",
        ImageChoice(slices=1),
        on_text=seen.append,
    )
    with db.read_session() as session:
        generated = session.get(Answer, result.answer_id).token_scores
    assert len(seen) == len(generated) > 1  # one update per generated token
    assert all(later.startswith(earlier.rstrip()) for earlier, later in itertools.pairwise(seen))
    assert seen[-1] == result.text


def test_the_demo_multi_frame_volume_scrolls_slice_by_slice(db, app_env, settings, clinician):
    from medvqa.imaging.demo import multi_frame_demo_file
    from medvqa.services.studies import import_paths
    from tests import factories

    volume = multi_frame_demo_file()
    assert volume is not None, "pydicom no longer ships the demo's multi-frame file"
    [study_id] = import_paths(db, factories.OPERATOR, [volume], settings).study_ids
    app = signed_in(clinician).run()
    assert app.selectbox(key="study_id").value == study_id
    series_id = app.selectbox(key="series_id").value
    slider = app.slider(key=f"slice_{series_id}")
    assert (slider.min, slider.max, slider.value) == (0, 29, 15)
    slider.set_value(3).run()
    assert not app.exception and any("slice 4 of 30" in str(image.proto) for image in app.get("image"))


def test_where_the_model_looked_is_one_toggle_away_with_an_opacity_control(db, app_env, ct_study, clinician):
    app = ask_about_slice(signed_in(clinician))
    answer_id = app.session_state["answer"].answer_id
    assert not overlays(app)
    app.toggle(key=f"heat_{answer_id}").set_value(True).run()
    assert not app.exception and not errors(app)
    (stored,) = stored_heatmaps(db)
    assert stored.answer_id == answer_id and stored.checks["passes_data_check"]  # the tiny LLaVA passes both
    assert len(overlays(app)) == 1 and any(stored.sha256[:12] in caption.value for caption in app.caption)
    app.slider(key=f"opacity_{answer_id}").set_value(0.9).run()
    assert not app.exception and len(overlays(app)) == 1 and len(stored_heatmaps(db)) == 1  # no new map


def test_a_model_whose_maps_fail_both_sanity_checks_shows_none(db, app_env, ct_study, clinician, monkeypatch):
    from medvqa.model.saliency import SanityCheck
    from medvqa.services import heatmaps

    monkeypatch.setattr(heatmaps, "model_checks", lambda model: SanityCheck(0.97, 0.99))
    app = ask_about_slice(signed_in(clinician))
    app.toggle(key=f"heat_{app.session_state['answer'].answer_id}").set_value(True).run()
    assert not overlays(app) and any("failed both sanity checks" in info.value for info in app.info)
    (stored,) = stored_heatmaps(db)  # the map is kept with its checks (the audit trail says it was not shown)
    assert not stored.checks["passes_model_randomisation"] and not stored.checks["passes_data_check"]


def overlays(app):
    return [image for image in app.get("image") if "where the model looked" in str(image.proto)]


def stored_heatmaps(db):
    from medvqa.db import AnswerHeatmap

    with db.read_session() as session:
        return session.scalars(select(AnswerHeatmap)).all()
