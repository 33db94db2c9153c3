"""The prebuilt C-STORE-RSP command set equals what pynetdicom encodes."""

from __future__ import annotations

from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from node.scp import encode_store_success


def test_prebuilt_success_response_matches_pynetdicom() -> None:
    for sop_instance_uid in ("1.2.3.4", "1.2.3.45"):  # odd and even lengths (padding)
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = 513
        primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        primitive.AffectedSOPInstanceUID = sop_instance_uid
        primitive.Status = 0x0000
        message = C_STORE_RSP()
        message.primitive_to_message(primitive)
        expected = encode(message.command_set, True, True)
        assert encode_store_success("1.2.840.10008.5.1.4.1.1.2", sop_instance_uid, 513) == expected
