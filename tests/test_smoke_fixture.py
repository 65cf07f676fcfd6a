from medvqa.services.audit import verify


def test_fixture_database_is_fresh_and_verifies(db, answer_id):
    report = verify(db)
    assert report.ok, report.reason
    assert report.events == 2  # the clinician's account and the answer
