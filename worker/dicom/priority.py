"""The worklist priority hint of a findings SR: when an urgency rule (service.notify.rules) fired on the
image, build_findings_sr (worker.dicom.sr) puts one more item a RIS can map into the TID 1500
"Qualitative Evaluations" container (UMLS C0034375, whose rows take CODE items of any concept):

    CODE (260870009, SCT, "Priority") = a CID 3414 "Procedure Urgency" code:
        stat -> (25876001, SCT, "Emergent Procedure")
        asap -> (103391001, SCT, "Urgent Procedure")
        routine -> (103390000, SCT, "Elective Procedure")

The same rule priority goes into the HL7 v2 / FHIR / webhook notifications (docs/integration.md).
"""

from __future__ import annotations

from copy import deepcopy

from highdicom.sr import CodeContentItem, CodedConcept, RelationshipTypeValues
from pydicom import Dataset

PRIORITY = CodedConcept(value="260870009", scheme_designator="SCT", meaning="Priority")
URGENCY = {
    "stat": CodedConcept(value="25876001", scheme_designator="SCT", meaning="Emergent Procedure"),
    "asap": CodedConcept(value="103391001", scheme_designator="SCT", meaning="Urgent Procedure"),
    "routine": CodedConcept(value="103390000", scheme_designator="SCT", meaning="Elective Procedure"),
}


def priority_item(priority: str) -> CodeContentItem:
    """The Qualitative Evaluations row for ``priority`` (stat, asap or routine)."""
    return CodeContentItem(
        name=deepcopy(PRIORITY),
        value=deepcopy(URGENCY[priority]),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


def read_priority(sr: Dataset) -> str | None:
    """The priority an SR carries (what a RIS reads back), or None."""
    codes = {concept.value: name for name, concept in URGENCY.items()}
    for child in sr.get("ContentSequence", []):
        for item in child.get("ContentSequence", []):
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if name is not None and name.CodeValue == PRIORITY.value and "ConceptCodeSequence" in item:
                return codes.get(str(item.ConceptCodeSequence[0].CodeValue))
    return None
