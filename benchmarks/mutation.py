"""Mutation testing of the modules whose decisions matter: ``make mutation``.

Runs mutmut (``requirements-mutation.txt``; its configuration is the ``[mutmut]``
section of ``setup.cfg``) on one module at a time, each mutant against the tests
of the selection that call the mutated function, then prints, per module, how
many mutants the tests killed, and every survivor.  The score leaves out the
mutants that ``EQUIVALENT`` names (a mutant that behaves exactly like the
original cannot be killed); ``docs/mutation.md`` says why each of them is
equivalent.  Mutant names carry a per-function number that changes when the
function changes: a listed name that no longer survives is reported as stale.

Usage::

    python -m benchmarks.mutation [--module completeness ...] [--max-children 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: Module short name -> source file, in the order they run (the SR builder last).
MODULES: dict[str, str] = {
    "completeness": "dicom_node/ingest/completeness.py",
    "select": "pipeline/select.py",
    "uids": "structured_reports/uids.py",
    "access": "dicom_node/net/access.py",
    "delivery": "dicom_node/outbox/delivery.py",
    "routing": "dicom_node/outbox/routing.py",
    "identity": "dicom_node/ingest/identity.py",
    "sources": "structured_reports/sources.py",
    "sr": "structured_reports/sr.py",
    "fusion": "model/fusion.py",
}

#: Surviving mutants that behave exactly like the original (the reason for each is in docs/mutation.md).
EQUIVALENT: dict[str, str] = {
    "model.fusion.x_image_logits_of__mutmut_1":
        "device None: the tests run on the CPU, torch's default device (a GPU run would catch it)",
    "model.fusion.x_image_logits_of__mutmut_12":
        "as _1 (the batch moved to the default device)",
    "model.fusion.x_refit_note_fusion__mutmut_1":
        "default batch size 9: the batching does not change the logits",
    "model.fusion.x_refit_note_fusion__mutmut_5":
        ("`numbers is None and head is None`: a model without numbers has note_text=True (the config refuses "
         "otherwise), so the next clause returns None"),
    "model.fusion.x_refit_note_fusion__mutmut_37":
        "as image_logits_of _1 (the numbers moved to the default device)",
    "model.fusion.x_refit_note_fusion__mutmut_51":
        "eye dtype None: float32, the layer's dtype",
    "model.fusion.x_refit_note_fusion__mutmut_52":
        "as image_logits_of _1",
    "model.fusion.x_refit_note_fusion__mutmut_54":
        "as _51",
    "model.fusion.x_refit_note_fusion__mutmut_55":
        "as image_logits_of _1",
    "model.fusion.x_refit_note_fusion__mutmut_60":
        "to(None) keeps float64; copying into the float32 slice casts it the same",
    "model.fusion.x_refit_note_fusion__mutmut_63":
        "as _60 (bias)",
    "model.fusion.x_refit_note_fusion__mutmut_82":
        "7 digits instead of 6 in a reported cross-entropy",
    "model.fusion.x_refit_note_fusion__mutmut_90":
        "as _82",
    "model.fusion.x_solve__mutmut_13":
        "bias in float32 (promoted to float64 in the sum): the optimum to float32 precision, below the model's",
    "model.fusion.x_solve__mutmut_16":
        "as _13",
    "model.fusion.x_solve__mutmut_26":
        "no line search: on this convex problem L-BFGS with step 1 reaches the same optimum",
    "model.fusion.x_solve__mutmut_28":
        "lr dropped: 1 is LBFGS's default",
    "model.fusion.x_solve__mutmut_30":
        "tolerance_grad default 1e-7: the loop stops on the change tolerance first, same optimum",
    "model.fusion.x_solve__mutmut_32":
        "history 100 instead of 20: the same optimum",
    "model.fusion.x_solve__mutmut_33":
        "as _26",
    "model.fusion.x_solve__mutmut_34":
        "lr 2: the strong-Wolfe search rescales the step, same optimum",
    "model.fusion.x_solve__mutmut_35":
        "max_iter 1001: converged long before",
    "model.fusion.x_solve__mutmut_38":
        "history 21: the same optimum",
    "dicom_node.ingest.completeness.x__check_stack__mutmut_30":
        "dtype=None: the positions are Python floats, numpy makes float64 anyway",
    "dicom_node.ingest.completeness.x__check_stack__mutmut_32":
        "dtype dropped: the same float64 array",
    "dicom_node.ingest.completeness.x_evaluate_series__mutmut_55":
        "AcquisitionNumber default None: only names the bucket of a missing number",
    "dicom_node.ingest.completeness.x_evaluate_series__mutmut_57":
        "AcquisitionNumber default dropped (None): the same bucket count",
    "dicom_node.ingest.completeness.x_evaluate_series__mutmut_61":
        "AcquisitionNumber default 'XXXX': the same bucket count",
    "dicom_node.ingest.completeness.x__headers__mutmut_4":
        "stop_before_pixels=None: reads more, decides the same",
    "dicom_node.ingest.completeness.x__headers__mutmut_5":
        "specific_tags=None: reads every tag, decides the same",
    "dicom_node.ingest.completeness.x__headers__mutmut_7":
        "stop_before_pixels dropped: reads more, decides the same",
    "dicom_node.ingest.completeness.x__headers__mutmut_8":
        "specific_tags dropped: reads every tag, decides the same",
    "dicom_node.ingest.completeness.x__headers__mutmut_10":
        "stop_before_pixels=False: reads more, decides the same",
    "dicom_node.ingest.completeness.x_complete_quiet_series__mutmut_36":
        "a receiving series never keeps a record saying complete with an unchanged count",
    "dicom_node.ingest.completeness.x_complete_quiet_series__mutmut_37":
        "as _36",
    "dicom_node.ingest.completeness.x_complete_quiet_series__mutmut_38":
        "as _36",
    "dicom_node.ingest.completeness.x_complete_quiet_series__mutmut_108":
        "the condition only guards a log line",
    "dicom_node.ingest.completeness.x_create_runs__mutmut_22":
        "only membership of running/queued in the set is tested",
    "dicom_node.ingest.completeness.x_create_runs__mutmut_34":
        "session.scalar takes the first row: limit(None) gives the same",
    "dicom_node.ingest.completeness.x_create_runs__mutmut_43":
        "session.scalar takes the first row: limit(2) gives the same",
    "dicom_node.ingest.completeness.x_create_runs__mutmut_39":
        "reached only when the study has no queued or running run: only finished runs remain",
    "dicom_node.ingest.completeness.x_create_runs__mutmut_47":
        "state=None: the column default (queued) applies",
    "dicom_node.ingest.completeness.x_create_runs__mutmut_52":
        "state dropped: the column default (queued) applies",
    "dicom_node.ingest.completeness.x_study_input_lossy__mutmut_3":
        "session.scalar takes the first row: limit(None) gives the same",
    "dicom_node.ingest.completeness.x_study_input_lossy__mutmut_17":
        "session.scalar takes the first row: limit(2) gives the same",
    "pipeline.select.x__describe__mutmut_12":
        "int(None) and int('') raise and are caught: the number is -1 either way",
    "pipeline.select.x__describe__mutmut_15":
        "as _12",
    "pipeline.select.x__image_count__mutmut_5":
        "get default None: `None or 1` is 1",
    "pipeline.select.x__image_count__mutmut_7":
        "get default dropped (None): `None or 1` is 1",
    "pipeline.select.x__orientation__mutmut_11":
        "dtype=None: the cosines are Python floats, numpy makes float64 anyway",
    "pipeline.select.x__orientation__mutmut_13":
        "dtype dropped: the same float64 array",
    "pipeline.select.x__orientation__mutmut_35":
        "'MIXED': every rule test compares case-insensitively, and the plane is reported nowhere else",
    "pipeline.select.x__orientation__mutmut_48":
        "'OBLIQUE': as _35",
    "pipeline.select.x__rule__mutmut_150":
        "missing_ok default None: bool(None) is False",
    "pipeline.select.x__rule__mutmut_152":
        "missing_ok default dropped (None): bool(None) is False",
    "pipeline.select.x_load_rules__mutmut_6":
        "encoding 'UTF-8': codec names are case-insensitive",
    "dicom_node.ingest.identity.x__identify__mutmut_7":
        "the kind of SOPClassUID (UI/CS/IS/DA) changed: any kind but PN/LO/SH/LT/ST/UT/UC decodes as ASCII",
    "dicom_node.ingest.identity.x__identify__mutmut_13":
        "as _identify_7 (SOPClassUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_14":
        "as _identify_7 (SOPClassUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_98":
        "as _identify_7 (SOPInstanceUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_104":
        "as _identify_7 (SOPInstanceUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_105":
        "as _identify_7 (SOPInstanceUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_114":
        "as _identify_7 (SeriesInstanceUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_120":
        "as _identify_7 (SeriesInstanceUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_121":
        "as _identify_7 (SeriesInstanceUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_130":
        "as _identify_7 (StudyInstanceUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_136":
        "as _identify_7 (StudyInstanceUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_137":
        "as _identify_7 (StudyInstanceUID)",
    "dicom_node.ingest.identity.x__identify__mutmut_34":
        "as _identify_7 (Modality)",
    "dicom_node.ingest.identity.x__identify__mutmut_40":
        "as _identify_7 (Modality)",
    "dicom_node.ingest.identity.x__identify__mutmut_41":
        "as _identify_7 (Modality)",
    "dicom_node.ingest.identity.x__identify__mutmut_53":
        "as _identify_7 (SeriesNumber)",
    "dicom_node.ingest.identity.x__identify__mutmut_59":
        "as _identify_7 (SeriesNumber)",
    "dicom_node.ingest.identity.x__identify__mutmut_60":
        "as _identify_7 (SeriesNumber)",
    "dicom_node.ingest.identity.x__identify__mutmut_188":
        "as _identify_7 (StudyDate)",
    "dicom_node.ingest.identity.x__identify__mutmut_194":
        "as _identify_7 (StudyDate)",
    "dicom_node.ingest.identity.x__identify__mutmut_195":
        "as _identify_7 (StudyDate)",
    "dicom_node.ingest.identity.x__pixel_values__mutmut_51":
        "as _identify_7 (NumberOfFrames)",
    "dicom_node.ingest.identity.x__pixel_values__mutmut_57":
        "as _identify_7 (NumberOfFrames)",
    "dicom_node.ingest.identity.x__pixel_values__mutmut_58":
        "as _identify_7 (NumberOfFrames)",
    "dicom_node.ingest.identity.x_read_identity__mutmut_80":
        "as _identify_7 (LossyImageCompression)",
    "dicom_node.ingest.identity.x_read_identity__mutmut_86":
        "as _identify_7 (LossyImageCompression)",
    "dicom_node.ingest.identity.x_read_identity__mutmut_87":
        "as _identify_7 (LossyImageCompression)",
    "dicom_node.ingest.identity.x__identify__mutmut_159":
        "[:65] on PatientID: check_copied_attributes refuses more than 64 characters first",
    "dicom_node.ingest.identity.x__identify__mutmut_172":
        "[:65] on IssuerOfPatientID: refused above 64 characters first",
    "dicom_node.ingest.identity.x__identify__mutmut_185":
        "[:65] on AccessionNumber: refused above 16 characters first",
    "dicom_node.ingest.identity.x__parse_da__mutmut_4":
        "'XXXX' for an empty date: four characters, None either way",
    "dicom_node.ingest.identity.x__pixel_values__mutmut_20":
        "the message of the internal ValueError: only its class name is reported",
    "dicom_node.ingest.identity.x__pixel_values__mutmut_21":
        "as _20",
    "dicom_node.ingest.identity.x__pixel_values__mutmut_22":
        "as _20",
    "dicom_node.ingest.identity.x__pixel_values__mutmut_23":
        "as _20",
    "dicom_node.ingest.identity.xǁHeaderǁ_value__mutmut_16":
        "the message of the internal TypeError: only its class name is reported",
    "dicom_node.ingest.identity.xǁHeaderǁ_value__mutmut_17":
        "as _16",
    "dicom_node.ingest.identity.xǁHeaderǁ_value__mutmut_18":
        "as _16",
    "dicom_node.ingest.identity.x_decode_dataset__mutmut_5":
        "implicit VR None: falsy, read as explicit, like False",
    "dicom_node.ingest.identity.x_decode_dataset__mutmut_16":
        "deflated read as implicit VR: pydicom detects the VR from the first element",
    "dicom_node.ingest.identity.x_decode_dataset__mutmut_19":
        "implicit VR None: pydicom detects the VR from the first element",
    "dicom_node.ingest.identity.x_identify__mutmut_6":
        "getattr without a default: every element pydicom yields has a VR attribute",
    "dicom_node.ingest.identity.x_is_lossy__mutmut_6":
        "default None: `None or ''`, not '01'",
    "dicom_node.ingest.identity.x_is_lossy__mutmut_8":
        "default dropped (None): as _6",
    "dicom_node.ingest.identity.x_is_lossy__mutmut_12":
        "default 'XXXX': not '01'",
    "dicom_node.ingest.identity.x_is_lossy__mutmut_13":
        "`or 'XXXX'`: not '01'",
    "dicom_node.ingest.identity.x_read_identity__mutmut_41":
        "little_endian=None: falsy, the big-endian codec, like False",
    "dicom_node.ingest.identity.xǁHeaderǁ_charset_names__mutmut_19":
        "codec 'ASCII': codec names are case-insensitive",
    "dicom_node.ingest.identity.xǁHeaderǁtext__mutmut_35":
        "codec 'ASCII': as _charset_names_19",
    "structured_reports.sr.x_build_sr__mutmut_49":
        "title=None: highdicom's MeasurementReport defaults to the same title",
    "structured_reports.sr.x_build_sr__mutmut_53":
        "title dropped: as _49",
    "structured_reports.sr.x_build_sr__mutmut_83":
        "is_final=None: falsy, highdicom writes PRELIMINARY as for False",
    "structured_reports.sr.x_build_sr__mutmut_103":
        "is_final dropped: highdicom's default is False",
    "structured_reports.sr.x_build_sr__mutmut_84":
        "is_verified=None: falsy, UNVERIFIED as for False",
    "structured_reports.sr.x_build_sr__mutmut_104":
        "is_verified dropped: highdicom's default is False",
    "structured_reports.sr.x__measurement_group__mutmut_31":
        "algorithm_id=None in the not-analysed group: the algorithm is None there",
    "structured_reports.sr.x__measurement_group__mutmut_34":
        "algorithm_id dropped in the not-analysed group: as _31",
    "structured_reports.sr.x__probability__mutmut_21":
        "a bare highdicom Measurement has no ContentSequence: the else branch runs either way",
    "structured_reports.sr.x__probability__mutmut_22":
        "as _21",
    "structured_reports.sr.x__probability__mutmut_23":
        "as _21",
    "structured_reports.sr.x__probability__mutmut_25":
        "the branch is never taken (as _21)",
    "structured_reports.sr.x_check_report_input__mutmut_43":
        ">= the tolerance: no double sum s has |s - 1| exactly 1e-3",
    "structured_reports.uids.x_derive_uid__mutmut_20":
        "separators: the name is a JSON list of strings, it has no key/value separator",
    "dicom_node.net.access.x__resolve__mutmut_10":
        "the protocol filter only removes duplicate addresses; the set dedups them",
    "dicom_node.net.access.x__resolve__mutmut_4":
        "an address literal resolves to itself through getaddrinfo",
    "dicom_node.outbox.delivery.x_deliver_due__mutmut_7":
        "the state filter is repeated by _claim, which refuses anything not pending",
    "dicom_node.outbox.delivery.x_deliver_due__mutmut_8":
        "the due-time filter is repeated by _claim, which refuses anything not due",
    "dicom_node.outbox.delivery.x_attempt__mutmut_29":
        "a failed result without a class is recorded as local_error by _record",
    "dicom_node.outbox.delivery.x_attempt__mutmut_32":
        "as _29",
    "dicom_node.outbox.delivery.x_attempt__mutmut_36":
        "as _29",
    "dicom_node.outbox.delivery.x_attempt__mutmut_39":
        "as _29",
}

#: mutmut's exit codes, as ``mutmut.stats.status_by_exit_code`` reads them.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "type check", -11: "segfault",
          -9: "segfault"}
_SPINNER = re.compile(r"[\u2800-\u28ff][^\n\u2800-\u28ff]*")


@dataclass
class Score:
    """The outcome of one module's mutants."""

    module: str
    counts: Counter[str]
    survivors: list[str]
    equivalent: list[str]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def killed(self) -> int:
        return self.counts["killed"] + self.counts["timeout"]

    @property
    def score(self) -> float:
        """Killed among the mutants that are not equivalent."""
        candidates = self.total - len(self.equivalent)
        return self.killed / candidates if candidates else 1.0


def dotted(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def run_module(source: str, max_children: int, log: Path) -> int:
    """``mutmut run`` on the mutants of one source file; mutmut's progress goes to *log*."""
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), f"{dotted(source)}.*"]
    # mutmut forks a child per mutant after importing the tests: torch's OpenMP pool does not survive a fork
    # (every mutant of model/fusion.py ended in SIGSEGV), one thread per child does.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    log.write_text(_SPINNER.sub("", result.stdout) + result.stderr)
    return result.returncode


def score(module: str, source: str) -> Score:
    """Count the results mutmut recorded for *source* (``mutants/<source>.meta``)."""
    meta = Path("mutants") / f"{source}.meta"
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    counts: Counter[str] = Counter(STATUS.get(code, "suspicious") if code is not None else "not checked"
                                   for code in codes.values())
    not_killed = sorted(name for name, code in codes.items()
                        if code is None or STATUS.get(code) not in ("killed", "timeout"))
    equivalent = [name for name in not_killed if name in EQUIVALENT]
    return Score(module, counts, [n for n in not_killed if n not in EQUIVALENT], equivalent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=list(MODULES), help="only these modules")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--report-only", action="store_true", help="summarise the results mutmut recorded")
    parser.add_argument("--min-score", type=float, default=0.85, help="fail below this score")
    args = parser.parse_args(argv)
    logs = Path("var/mutation")
    logs.mkdir(parents=True, exist_ok=True)
    chosen = args.module or list(MODULES)
    for module in chosen:
        if not args.report_only:
            print(f"mutating {MODULES[module]} ...", flush=True)
            code = run_module(MODULES[module], args.max_children, logs / f"{module}.log")
            if code != 0:
                print(f"  mutmut exited with {code}; see {logs / f'{module}.log'}", flush=True)
    scores = [score(module, MODULES[module]) for module in chosen]
    print("\n| module | mutants | killed | survived | no tests | equivalent | score |\n|---|---|---|---|---|---|---|")
    for s in scores:
        print(f"| {MODULES[s.module]} | {s.total} | {s.killed} | {s.counts['survived']} | {s.counts['no tests']} "
              f"| {len(s.equivalent)} | {100 * s.score:.1f} % |")
    for s in scores:
        if s.survivors:
            print(f"\n{MODULES[s.module]}: not killed, not known equivalent (`mutmut show NAME`):")
            for name in s.survivors:
                print(f"  {name}")
    known = {n for s in scores for n in s.equivalent}
    stale = sorted(n for n in EQUIVALENT if n not in known and any(n.startswith(dotted(MODULES[m])) for m in chosen))
    if stale:
        print("\nlisted as equivalent but killed or gone (renumbered?): " + ", ".join(stale))
    low = [s for s in scores if s.total and s.score < args.min_score]
    return 1 if low else 0


if __name__ == "__main__":
    raise SystemExit(main())
