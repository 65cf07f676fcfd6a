"""Which SOP classes medvqa imports: image storage classes it can render, nothing else.

Encapsulated documents (PDF, CDA, STL...), structured reports, presentation states, waveforms, RT objects,
segmentations, raw data and every other non-image class are refused with one line, never stored, whatever else
the file holds (a PDF object with a PixelData element is still a PDF object).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

from medvqa.errors import ImportRefused

_STORAGE = "1.2.840.10008.5.1.4.1.1."
RENDERABLE_IMAGE_CLASSES = frozenset(
    _STORAGE + suffix
    for suffix in (
        "1",  # Computed Radiography
        "1.1",  # Digital X-Ray, for presentation
        "1.1.1",  # Digital X-Ray, for processing
        "1.2",  # Digital Mammography X-Ray, for presentation
        "1.2.1",  # Digital Mammography X-Ray, for processing
        "1.3",  # Digital Intra-Oral X-Ray, for presentation
        "1.3.1",  # Digital Intra-Oral X-Ray, for processing
        "2",  # CT
        "2.1",  # Enhanced CT
        "2.2",  # Legacy Converted Enhanced CT
        "3",  # Ultrasound Multi-frame (retired)
        "3.1",  # Ultrasound Multi-frame
        "4",  # MR
        "4.1",  # Enhanced MR
        "4.3",  # Enhanced MR Color
        "4.4",  # Legacy Converted Enhanced MR
        "5",  # Nuclear Medicine (retired)
        "6",  # Ultrasound (retired)
        "6.1",  # Ultrasound
        "7",  # Secondary Capture
        "7.1",  # Multi-frame Single Bit Secondary Capture
        "7.2",  # Multi-frame Grayscale Byte Secondary Capture
        "7.3",  # Multi-frame Grayscale Word Secondary Capture
        "7.4",  # Multi-frame True Color Secondary Capture
        "12.1",  # X-Ray Angiographic
        "12.1.1",  # Enhanced XA
        "12.2",  # X-Ray Radiofluoroscopic
        "12.2.1",  # Enhanced XRF
        "13.1.3",  # Breast Tomosynthesis
        "13.1.4",  # Breast Projection X-Ray, for presentation
        "13.1.5",  # Breast Projection X-Ray, for processing
        "20",  # Nuclear Medicine
        "77.1.1",  # VL Endoscopic
        "77.1.2",  # VL Microscopic
        "77.1.3",  # VL Slide-Coordinates Microscopic
        "77.1.4",  # VL Photographic
        "77.1.5.1",  # Ophthalmic Photography 8 Bit
        "77.1.5.2",  # Ophthalmic Photography 16 Bit
        "128",  # Positron Emission Tomography
        "128.1",  # Legacy Converted Enhanced PET
        "130",  # Enhanced PET
        "481.1",  # RT Image
    )
)


def check_renderable_sop_class(ds: Dataset) -> None:
    """Refuse (one line, naming the class) anything that is not an image storage class medvqa renders. Both the
    dataset's SOP Class UID and the file meta's Media Storage SOP Class UID must name one."""
    declared = [str(ds.get("SOPClassUID", "") or "").strip()]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPClassUID"):
        declared.append(str(meta.MediaStorageSOPClassUID).strip())
    if not declared[0]:
        raise ImportRefused("SOPClassUID is missing: cannot tell what kind of object this is")
    for uid in declared:
        if uid not in RENDERABLE_IMAGE_CLASSES:
            name = UID(uid).name if UID(uid).is_valid and UID(uid).name != uid else "an unknown SOP class"
            raise ImportRefused(f"{name} is not an image medvqa can show: only image storage classes are imported")
    if "PixelData" not in ds:
        raise ImportRefused("the image has no integer PixelData (float pixel data is not supported)")
