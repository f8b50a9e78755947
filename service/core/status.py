"""Explicit states and reason codes shared by the listener, the worker and the dashboard."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def is_final(self) -> bool:
        return self in FINAL_JOB_STATUSES


FINAL_JOB_STATUSES = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED})


class Mode(StrEnum):
    """Where a destination's results go: ``live`` sends them to the PACS; ``shadow`` keeps them on the
    gateway only (viewable in the dashboard, no delivery row), for a site trying the model silently."""

    LIVE = "live"
    SHADOW = "shadow"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    RETRYING = "retrying"
    DEAD_LETTER = "dead_letter"


# Not delivered yet and not given up: the row's next_attempt_at says when it is due.
OPEN_DELIVERY_STATUSES = frozenset({DeliveryStatus.PENDING, DeliveryStatus.RETRYING})


class ReasonCode(StrEnum):
    """Coded reasons for failed or skipped jobs and per-image gate decisions."""

    NO_IMAGES = "no_images"
    NOT_IMAGE_OBJECT = "not_image_object"
    UNSUPPORTED_MODALITY = "unsupported_modality"
    NOT_CHEST = "not_chest"
    NOT_FRONTAL = "not_frontal"
    NOT_2D_GREY = "not_2d_grey"
    TOO_SMALL = "too_small"
    PIXEL_DECODE_ERROR = "pixel_decode_error"
    PIXEL_DECODE_TIMEOUT = "pixel_decode_timeout"
    PIXEL_MODULE_INCONSISTENT = "pixel_module_inconsistent"
    # Resource limits, checked from the header before any decode (settings max_image_pixels,
    # max_instance_bytes), and the decoder subprocess's address-space limit.
    IMAGE_TOO_LARGE = "image_too_large"
    INSTANCE_TOO_LARGE = "instance_too_large"
    PIXEL_DECODE_MEMORY = "pixel_decode_memory"
    # Pixels that are not an image: rescale or window values that cannot be applied, a (near-)constant
    # rendered image, modality values spanning more than any detector produces.
    RESCALE_INVALID = "rescale_invalid"
    WINDOW_INVALID = "window_invalid"
    IMAGE_BLANK = "image_blank"
    DYNAMIC_RANGE_ABSURD = "dynamic_range_absurd"
    # A source attribute copied into an output was invalid for its VR: fixed (normalised) or left out.
    SOURCE_ATTRIBUTE_NORMALISED = "source_attribute_normalised"
    SOURCE_ATTRIBUTE_DROPPED = "source_attribute_dropped"
    SPOOL_FILE_MISSING = "spool_file_missing"
    INFERENCE_ERROR = "inference_error"
    OUTPUT_BUILD_ERROR = "output_build_error"
    # A present finding whose heatmap region could not be built: the reports carry it without a region.
    REGION_NOT_BUILT = "region_not_built"
    DELIVERY_REFUSED = "delivery_refused"
    DELIVERY_UNREACHABLE = "delivery_unreachable"
    INTERNAL_ERROR = "internal_error"
    # Listener refusals (C-STORE statuses and association rejections), logged with the calling AE title.
    PEER_NOT_ALLOWED = "peer_not_allowed"
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    DATASET_MALFORMED = "dataset_malformed"
    # Associations aborted by the listener's PDU guard (service.scp.pduguard).
    PDU_TOO_LARGE = "pdu_too_large"
    PROTOCOL_VIOLATION = "protocol_violation"
    RECEIVE_MEMORY_BUSY = "receive_memory_busy"
    MISSING_UIDS = "missing_uids"
    INVALID_UIDS = "invalid_uids"
    UID_MISMATCH = "uid_mismatch"
    DUPLICATE_CONFLICT = "duplicate_conflict"
    SPOOL_DISK_LOW = "spool_disk_low"
    SPOOL_WRITE_FAILED = "spool_write_failed"
    DATABASE_UNAVAILABLE = "database_unavailable"
    BROKER_UNAVAILABLE = "broker_unavailable"


class OutputKind(StrEnum):
    """The DICOM objects a study's results are sent as; each destination lists those it takes."""

    SR = "sr"  # the findings measurement report (Comprehensive 3D SR, TID 1500)
    REPORT = "report"  # a second SR with the full results table, shown as text by viewers
    SC = "sc"  # the heatmap Secondary Capture
    GSPS = "gsps"  # Grayscale Softcopy Presentation State with the outlines (optional)


DEFAULT_OUTPUTS = (OutputKind.SR, OutputKind.REPORT, OutputKind.SC)
