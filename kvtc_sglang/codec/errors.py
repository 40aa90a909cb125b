"""Typed errors of the codec. Every bad input raises one of these, never a bare assert."""


class KVTCError(Exception):
    """Base class of every error the codec raises on bad input."""


class BlobFormatError(KVTCError):
    """A compressed blob is truncated, corrupted (CRC-32 mismatch) or not a KVTC blob."""


class CalibrationMismatchError(KVTCError):
    """A calibration artifact does not fit the model, shapes or plan it is used with."""


class CalibrationCardError(CalibrationMismatchError, ValueError):
    """A calibration card is missing, unreadable or not a KVTC card."""


class ShapeError(KVTCError, ValueError):
    """A tensor handed to the codec has the wrong shape, dtype or device."""


class EntropyCodecUnavailable(KVTCError):
    """The requested entropy stage (e.g. nvCOMP) is not installed or has no device to run on."""
