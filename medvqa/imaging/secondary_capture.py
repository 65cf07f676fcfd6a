"""PNG and JPEG teaching files become DICOM secondary-capture instances, each its own study."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from medvqa.errors import ImportRefused

IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def is_plain_image(data: bytes) -> bool:
    return data.startswith(IMAGE_SIGNATURES)


def _uid(digest: bytes, part: str) -> str:
    return f"2.25.{int.from_bytes(hashlib.sha256(digest + part.encode()).digest()[:16], 'big')}"


def dataset_from_image(
    data: bytes,
    max_pixels: int,
    *,
    modality: str = "OT",
    body_part: str = "",
    description: str = "",
    burned_in_annotation: str | None = None,
) -> Dataset:
    """A Secondary Capture Image Storage dataset holding the image (grey or RGB, 8 bit).

    UIDs derive from the image bytes, so importing the same picture twice finds the same study.
    BurnedInAnnotation stays absent unless the caller knows, so the instance is held for a person to check.
    """
    try:
        opened = Image.open(io.BytesIO(data))
        width, height = opened.size  # from the header: nothing decoded yet
        if width * height * 3 > max_pixels:
            raise ImportRefused(f"{width} x {height} image exceeds the limit of {max_pixels} samples")
        image = opened.convert("L" if opened.mode in ("1", "L", "I", "I;16", "F") else "RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImportRefused(f"unreadable image: {exc}") from None
    pixels = np.asarray(image)
    digest = hashlib.sha256(data).digest()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (_uid(digest, p) for p in ("st", "se", "in"))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality, ds.ConversionType, ds.BodyPartExamined = modality, "WSD", body_part
    ds.SeriesDescription = description
    ds.ContentDate = datetime.now(UTC).strftime("%Y%m%d")
    ds.PatientID, ds.PatientName, ds.SeriesNumber, ds.InstanceNumber = "", "", 1, 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    if burned_in_annotation is not None:
        ds.BurnedInAnnotation = burned_in_annotation
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else 3
    ds.PhotometricInterpretation = "MONOCHROME2" if pixels.ndim == 2 else "RGB"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    return ds
