from medvqa.services.audit import verify


def test_fixture_database_is_fresh_and_verifies(db, answer_id):
    report = verify(db, strict=True)
    assert report.ok, report.reason
    assert report.events == 3  # the clinician's account, the study (as an import writes it) and the answer
    assert report.rows_checked == 4  # the user, the study, the question and the answer, each vouched for
