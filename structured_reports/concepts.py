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
    ``(CN, 99ADNODE, "Cognitively normal")``: a code of the node's own coding
    scheme, declared in every SR's Coding Scheme Identification Sequence
    (0008,0110) of the SOP Common module (:func:`coding_scheme_identification`;
    a private or local designator begins with "99", PS3.3 section 8.2).  The class means "cognitively
    normal" (neither MCI nor AD), and the PDF says so; SNOMED CT 17621005
    |Normal (qualifier value)|, used before, is a qualifier ("normal" of
    anything) and read "Normal" in an SR viewer.  The standard candidate found
    offline is SNOMED CT 449888003 "Normal cognition", named in one FHIR
    implementation guide (the Danish clinical quality registries' KIP
    infrastructure, code system CognitiveFunctionFinding for the dementia
    registry DANDEM) and in an ADNI-to-SNOMED mapping; neither is a SNOMED CT
    release, and its fully specified name and status could not be checked
    offline, so it is not asserted here.  When it can be checked against a
    SNOMED CT release, replacing :data:`COGNITIVELY_NORMAL` with it (and
    keeping the local code in :data:`EARLIER_CLASS_CONCEPTS`) is the whole change.
``Qualitative Evaluations``
    UMLS C0034375, the container of TID 1500 row 12 that holds CODE and TEXT
    evaluations of the whole report (DICOM PS3.16 TID 1500).
Volumes (:mod:`structured_reports.measurements`)
    The volume is SNOMED CT 118565006 |Volume| in UCUM ``ml``; z-score, percentile and the
    population's mean and SD are DICOM's TID 311 concepts (DCM 121416, 121415, 121414, SNOMED CT
    373098007).  The finding sites are SNOMED CT (:data:`STRUCTURE_SITES`).  DICOM has no concept
    for a volume as a share of the intracranial volume, for a volume at a prior study, for a
    change per year, for an asymmetry index or for the change of a probability since a prior
    study, so these are codes of the node's own scheme (:data:`PERCENT_OF_ICV`,
    :data:`PRIOR_VOLUME`, :data:`VOLUME_CHANGE_PER_YEAR`, :data:`RELATIVE_VOLUME_CHANGE_PER_YEAR`,
    :data:`HIPPOCAMPAL_ASYMMETRY`, :data:`PROBABILITY_CHANGE`), each with its UCUM unit.

:func:`class_for_concept` also reads the codes of reports written earlier
(:data:`EARLIER_CLASS_CONCEPTS`), so a superseded report still reads back.
"""

from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

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

#: Designator of the node's own coding scheme (a private designator begins with "99").
LOCAL_SCHEME_DESIGNATOR = "99ADNODE"

#: Name of the node's own coding scheme (Coding Scheme Name, LO).
LOCAL_SCHEME_NAME = "dicom-node AD/MCI/CN result codes"

#: Who defines the node's own codes (Coding Scheme Responsible Organization, ST).
LOCAL_SCHEME_ORGANIZATION = "Brain-Adapter Node Project"

#: (CN, 99ADNODE, "Cognitively normal"): the CN class, a code of the node's own scheme.
COGNITIVELY_NORMAL = hd.sr.CodedConcept(
    value="CN",
    scheme_designator=LOCAL_SCHEME_DESIGNATOR,
    meaning="Cognitively normal",
)

#: UMLS C0034375 "Qualitative Evaluations" (TID 1500 row 10 container).
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(
    value="C0034375",
    scheme_designator="UMLS",
    meaning="Qualitative Evaluations",
)

def _local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=LOCAL_SCHEME_DESIGNATOR, meaning=meaning)


def _ucum(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator="UCUM", meaning=meaning)


#: UCUM units of the volumes and their changes (pydicom's dictionary has neither ``ml`` nor the rates).
MILLILITER = _ucum("ml", "milliliter")
MILLILITER_PER_YEAR = _ucum("ml/a", "milliliter per year")
PERCENT_PER_YEAR = _ucum("%/a", "percent per year")

#: A structure's volume as a percentage of the intracranial volume (UCUM ``%``).
PERCENT_OF_ICV = _local("ICVPCT", "Volume, percent of intracranial volume")
#: The structure's volume at the prior study (UCUM ``ml``).
PRIOR_VOLUME = _local("PRIORVOL", "Volume at the prior study")
#: ``(current - prior) / interval`` (UCUM ``ml/a``).
VOLUME_CHANGE_PER_YEAR = _local("VOLRATE", "Volume change per year")
#: ``100 (current - prior) / prior / interval`` (UCUM ``%/a``).
RELATIVE_VOLUME_CHANGE_PER_YEAR = _local("VOLPCTRATE", "Relative volume change per year")
#: ``|L - R| / ((L + R) / 2) * 100`` of the hippocampi (UCUM ``%``).
HIPPOCAMPAL_ASYMMETRY = _local("HIPPOASYM", "Hippocampal asymmetry index")
#: Current minus prior probability of a class (UCUM ``1``), qualified by the class like the probabilities.
PROBABILITY_CHANGE = _local("PROBCHG", "Change in probability since the prior study")

#: Finding site (SNOMED CT) and laterality of each structure, keyed like :data:`pipeline.normative.STRUCTURES`.
STRUCTURE_SITES: dict[str, tuple[Code, Code | None]] = {
    "hippocampus_left": (codes.SCT.Hippocampus, codes.SCT.Left),
    "hippocampus_right": (codes.SCT.Hippocampus, codes.SCT.Right),
    "lateral_ventricles": (codes.SCT.LateralVentricle, codes.SCT.Bilateral),
    "grey_matter": (codes.SCT.GrayMatter, None),
    "white_matter": (codes.SCT.WhiteMatter, None),
    "intracranial": (codes.SCT.CranialCavity, None),
}

#: Coded value of each model class, keyed like :data:`model.types.CLASSES`.
CLASS_CONCEPTS: dict[str, hd.sr.CodedConcept] = {
    "AD": ALZHEIMERS_DISEASE,
    "MCI": MILD_COGNITIVE_IMPAIRMENT,
    "CN": COGNITIVELY_NORMAL,
}

#: Codes of the classes in reports written by earlier versions of the node (read back, never written).
EARLIER_CLASS_CONCEPTS: dict[str, tuple[hd.sr.CodedConcept, ...]] = {
    "CN": (hd.sr.CodedConcept.from_code(codes.SCT.Normal),),  # SNOMED CT 17621005 |Normal (qualifier value)|
}

#: Plain-language label of each class for text items and the PDF.
CLASS_LABELS: dict[str, str] = {
    "AD": "AD (Alzheimer's disease)",
    "MCI": "MCI (mild cognitive impairment)",
    "CN": "CN (cognitively normal)",
}

def coding_scheme_identification() -> list[CodingSchemeIdentificationItem]:
    """The Coding Scheme Identification Sequence items an SR with the node's own codes carries.

    Returns
    -------
    list[highdicom.coding_schemes.CodingSchemeIdentificationItem]
        One item: designator, name and responsible organization of the node's scheme.
    """
    # No Coding Scheme Registry (a local scheme is registered nowhere) and no Coding Scheme UID (Type 1C, only
    # for a scheme identified by an OID; the designator identifies this one).
    return [CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME_DESIGNATOR,
        name=LOCAL_SCHEME_NAME,
        responsible_organization=LOCAL_SCHEME_ORGANIZATION,
    )]


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
        if known == concept or concept in EARLIER_CLASS_CONCEPTS.get(label, ()):
            return label
    raise KeyError(f"{concept.scheme_designator} {concept.value} is no class concept")
