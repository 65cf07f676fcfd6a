"""Talking to a PACS: DICOMweb (QIDO-RS, WADO-RS) and DIMSE (C-FIND, C-GET, a C-STORE listener).

Nothing here writes to the database: what arrives goes through the import path in medvqa.services.
"""
