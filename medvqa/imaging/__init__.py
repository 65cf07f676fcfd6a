"""Imaging: DICOM reading, de-identified storage, series assembly, and the exact model input."""
