"""Domain errors. They carry a stable machine-readable `code` and no HTTP concerns.

The service maps each class to a status code in exactly one place (service/errors.py).
Messages are safe to show to a client: no paths, no tag values, no internal names.
"""


class BusiError(Exception):
    """Base of every error this project raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- input: the bytes a client sent ----------------------------------------------------------


class InputError(BusiError):
    """The input image cannot be used."""

    code = "invalid_input"


class EmptyInputError(InputError):
    """No bytes were sent."""

    code = "empty_input"


class UnsupportedFormatError(InputError):
    """The bytes are not a PNG, JPEG or DICOM file."""

    code = "unsupported_format"


class FormatMismatchError(InputError):
    """The declared media type disagrees with what the bytes are."""

    code = "format_mismatch"


class CorruptImageError(InputError):
    """The bytes start like a supported format but cannot be decoded."""

    code = "corrupt_image"


class ImageTooLargeError(InputError):
    """The image has more pixels (or frames) than the configured cap; it was not decoded."""

    code = "image_too_large"


class ImageTooSmallError(InputError):
    """The image is smaller than the models can meaningfully use."""

    code = "image_too_small"


class NoPixelDataError(InputError):
    """A DICOM object that holds no image (a structured report, an RT plan, ...)."""

    code = "no_pixel_data"


class UnsupportedDicomError(InputError):
    """A DICOM image this service cannot decode (transfer syntax, photometric interpretation)."""

    code = "unsupported_dicom"


class InvalidDicomValueError(InputError):
    """A DICOM display value (rescale, window) that is not finite or is far outside any range."""

    code = "invalid_dicom_value"


class FrameOutOfRangeError(InputError):
    """The requested frame does not exist in a multi-frame image."""

    code = "frame_out_of_range"


class NotUltrasoundError(InputError):
    """A DICOM image whose Modality says it is not ultrasound (CT, MR, MG, ...)."""

    code = "not_ultrasound"


class NonImageDicomError(InputError):
    """A DICOM object of a non-image SOP class (segmentation, structured report, RT object)."""

    code = "non_image_dicom"


# --- artifacts: model files on the registry volume ------------------------------------------


class ArtifactError(BusiError):
    """A model artifact cannot be published, found or trusted."""

    code = "artifact_error"


class InvalidVersionError(ArtifactError):
    """A version or task name that is not allowed (path separators, `..`, odd characters)."""

    code = "invalid_version"


class ArtifactNotFoundError(ArtifactError):
    """No complete, verified version exists for a task (or the pinned one is missing)."""

    code = "artifact_not_found"


class ArtifactIntegrityError(ArtifactError):
    """A version folder whose manifest is missing, malformed, or does not match its files."""

    code = "artifact_integrity"


class ModelUnavailableError(BusiError):
    """A model needed for the request is not loaded (yet)."""

    code = "model_unavailable"


# --- capacity: the service is too busy to take the request in time ---------------------------


class ServiceOverloadedError(BusiError):
    """The inference queue is full: the request was refused at once rather than queued."""

    code = "overloaded"


class DeadlineExceededError(BusiError):
    """The request waited longer than its deadline for a forward; it was not analysed."""

    code = "deadline_exceeded"
