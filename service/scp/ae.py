"""The listener's AE: what it accepts (verification, every storage SOP class, the transfer syntaxes we
decode) and its limits. service.listener_main serves it."""

from __future__ import annotations

import logging

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts

from service.core.settings import Settings
from service.scp.peers import PeerPolicy

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")

# Every storage SOP class: a PACS routing a whole study (SR, presentation states, key objects …) must not
# see failures for the objects we do not analyse; the worker's gate marks those jobs skipped.
STORAGE_SOP_CLASSES = tuple(UID(str(cx.abstract_syntax)) for cx in AllStoragePresentationContexts)

TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


def build_ae(settings: Settings, policy: PeerPolicy | None = None) -> AE:
    ae = AE(ae_title=settings.listener_ae_title)
    ae.maximum_associations = settings.max_associations
    # Advertised in the A-ASSOCIATE-AC; the PDU guard (service.scp.pduguard) holds peers to it.
    ae.maximum_pdu_size = settings.listener_max_pdu_bytes
    ae.network_timeout = settings.listener_network_timeout
    ae.acse_timeout = settings.listener_acse_timeout
    ae.dimse_timeout = settings.listener_dimse_timeout
    ae.require_called_aet = True
    if policy is not None and policy.open:
        log.warning("CXR_SOURCES is empty: any peer that knows our AE title may send")
    elif policy is not None:
        # pynetdicom's own check of the calling AE title, beside ours (which adds the address).
        ae.require_calling_aet = policy.ae_titles
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae
