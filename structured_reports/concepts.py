"""Coded concepts used in our reports that pydicom's code dictionary lacks.

Everything available in :data:`pydicom.sr.codedict.codes` is taken from there;
only the concepts below are spelled out, once, with their published codes.

Choice of codes
---------------
``AD``
    SNOMED CT 26929004 |Alzheimer's disease (disorder)|.
``MCI``
    SNOMED CT 386805003 |Mild cognitive disorder (disorder)|; "Mild cognitive
    impairment" is an accepted synonym of that concept and the term
    radiologists use, so it is the code meaning here.
``CN``
    SNOMED CT 17621005 |Normal (qualifier value)|, taken from pydicom's
    dictionary (``codes.SCT.Normal``).  It is the concept DICOM itself uses for
    a normal result (CIDs 222, 242, 3119, 7151 ...).  SNOMED CT has no
    unambiguous, widely published "cognitively normal" finding that we could
    verify offline; the DICOM "No abnormality" code (DCM 111286) belongs to the
    mammography context groups.  In the report the class is always shown next
    to the class label "CN (cognitively normal)" and the concept name
    "Finding", so a reader does not mistake it for "normal MRI".
``Qualitative Evaluations``
    UMLS C0034375, the container of TID 1500 row 10 that holds CODE and TEXT
    evaluations of the whole report (DICOM PS3.16 TID 1500).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

#: SNOMED CT 26929004 |Alzheimer's disease (disorder)|.
ALZHEIMERS_DISEASE = hd.sr.CodedConcept(
    value="26929004",
    scheme_designator="SCT",
    meaning="Alzheimer's disease",
)

#: SNOMED CT 386805003 |Mild cognitive disorder (disorder)|, synonym
#: "Mild cognitive impairment".
MILD_COGNITIVE_IMPAIRMENT = hd.sr.CodedConcept(
    value="386805003",
    scheme_designator="SCT",
    meaning="Mild cognitive impairment",
)

#: SNOMED CT 17621005 |Normal (qualifier value)|, from pydicom's dictionary.
COGNITIVELY_NORMAL = hd.sr.CodedConcept.from_code(codes.SCT.Normal)

#: UMLS C0034375 "Qualitative Evaluations" (TID 1500 row 10 container).
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(
    value="C0034375",
    scheme_designator="UMLS",
    meaning="Qualitative Evaluations",
)

#: Coded value of each model class, keyed like :data:`model.types.CLASSES`.
CLASS_CONCEPTS: dict[str, hd.sr.CodedConcept] = {
    "AD": ALZHEIMERS_DISEASE,
    "MCI": MILD_COGNITIVE_IMPAIRMENT,
    "CN": COGNITIVELY_NORMAL,
}

#: Plain-language label of each class for text items and the PDF.
CLASS_LABELS: dict[str, str] = {
    "AD": "AD (Alzheimer's disease)",
    "MCI": "MCI (mild cognitive impairment)",
    "CN": "CN (cognitively normal)",
}

def class_for_concept(concept: hd.sr.CodedConcept) -> str:
    """Return the class label (``"AD"``, ``"MCI"``, ``"CN"``) of a coded value.

    Parameters
    ----------
    concept : highdicom.sr.CodedConcept
        A coded value read back from a report.

    Returns
    -------
    str
        The matching key of :data:`CLASS_CONCEPTS`.

    Raises
    ------
    KeyError
        If the concept is none of the class concepts.
    """
    for label, known in CLASS_CONCEPTS.items():
        if known == concept:
            return label
    raise KeyError(f"{concept.scheme_designator} {concept.value} is no class concept")
