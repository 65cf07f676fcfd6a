"""medvqa: a medical visual-question-answering workbench.

Data path: DICOM -> de-identified study -> model input -> answer -> feedback -> dataset snapshot
-> adapter -> answer.
Every write goes through `medvqa.services` and lands with its audit event in one transaction.
"""

__version__ = "0.1.0"
