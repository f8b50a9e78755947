"""The worklist priority hint of a findings SR: when an urgency rule (service.notify.rules) fired on the
image, the TID 1500 "Qualitative Evaluations" container (UMLS C0034375, whose rows take CODE items of
any concept) gets one more item a RIS can map:

    CODE (260870009, SCT, "Priority") = a CID 3414 "Procedure Urgency" code:
        stat -> (25876001, SCT, "Emergent Procedure")
        asap -> (103391001, SCT, "Urgent Procedure")
        routine -> (103390000, SCT, "Elective Procedure")

The same rule priority goes into the HL7 v2 / FHIR / webhook notifications (docs/integration.md).
"""

from __future__ import annotations

from copy import deepcopy

from highdicom.sr import CodeContentItem, CodedConcept, ContainerContentItem, RelationshipTypeValues
from pydicom import Dataset
from pydicom.sequence import Sequence

PRIORITY = CodedConcept(value="260870009", scheme_designator="SCT", meaning="Priority")
URGENCY = {
    "stat": CodedConcept(value="25876001", scheme_designator="SCT", meaning="Emergent Procedure"),
    "asap": CodedConcept(value="103391001", scheme_designator="SCT", meaning="Urgent Procedure"),
    "routine": CodedConcept(value="103390000", scheme_designator="SCT", meaning="Elective Procedure"),
}
_QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")


def add_priority(sr: Dataset, priority: str) -> Dataset:
    """Put the priority item into the SR's Qualitative Evaluations container (made if absent)."""
    item = CodeContentItem(
        name=deepcopy(PRIORITY),
        value=deepcopy(URGENCY[priority]),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    for child in sr.get("ContentSequence", []):
        name = child.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in child else None
        if name is not None and (name.CodeValue, name.CodingSchemeDesignator) == _QUALITATIVE_EVALUATIONS:
            child.setdefault("ContentSequence", Sequence()).value.append(item)
            return sr
    container = ContainerContentItem(
        name=CodedConcept(*_QUALITATIVE_EVALUATIONS, meaning="Qualitative Evaluations"),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = Sequence([item])
    sr.ContentSequence.append(container)
    return sr


def read_priority(sr: Dataset) -> str | None:
    """The priority an SR carries (what a RIS reads back), or None."""
    codes = {concept.value: name for name, concept in URGENCY.items()}
    for child in sr.get("ContentSequence", []):
        for item in child.get("ContentSequence", []):
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if name is not None and name.CodeValue == PRIORITY.value and "ConceptCodeSequence" in item:
                return codes.get(str(item.ConceptCodeSequence[0].CodeValue))
    return None
