"""Every failure medvqa raises on purpose is a MedVQAError, so the command line and the workbench show it as one
line; settings objects refuse bad values with the project's own type (still a ValueError for callers)."""

from __future__ import annotations

import pytest

from compliance.audit_chain import AnchorError
from compliance.deid import DeidError
from medvqa.errors import InvalidSettings, MedVQAError
from medvqa.model.adapters import LoraSettings
from medvqa.training.compare import GateSettings
from medvqa.training.train import TrainSettings


def test_compliance_errors_are_medvqa_errors():
    assert issubclass(AnchorError, MedVQAError) and issubclass(DeidError, MedVQAError)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LoraSettings(r=0), "r must be a positive integer"),
        (lambda: TrainSettings(epochs=0), "epochs must be positive"),
        (lambda: GateSettings(max_overall_drop=2.0), "gate drops are fractions"),
    ],
)
def test_settings_refuse_bad_values_with_the_projects_error(build, message):
    with pytest.raises(InvalidSettings, match=message) as caught:
        build()
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, MedVQAError)
