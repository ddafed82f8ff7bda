"""Preprocessing speed: the node's pipeline versus antspyx defaults, same run.

Run ``python -m benchmarks.bench_preprocess`` (2 ITK threads).  Colin27 (1 mm,
with skull) is written as a synthetic axial DICOM series, converted, then
preprocessed twice:

- node: :func:`pipeline.preprocess.preprocess` with its default configuration;
- defaults: ``ants.n4_bias_field_correction(image)`` with its defaults, then
  ``ants.registration(template, n4, type_of_transform="Affine")``.

Then the same on two variants of the independent scanner-like corpus
(:mod:`tests.support.corpus`, full size: a Philips coronal T1 TFE tilted 12 degrees
with RescaleSlope, a GE axial BRAVO in implicit VR), each a whole head posed in the
scanner with bias, noise and the coil's fall-off.

Prints, for each input, both times, both template correlations (Pearson, inside
the template's brain mask, on the 1 mm template grid) and ``ratio: X`` =
defaults / node.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.convert import convert_series
from pipeline.preprocess import preprocess
from pipeline.preprocess_config import PreprocessConfig
from pipeline.registration import default_template_path
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series

#: Corpus variants run besides Colin27 (full size).
CORPUS_VARIANTS = ("philips_cor_tfe_oblique12_rescale", "ge_ax_bravo_172_implicit")


def _defaults(nifti: Path, template_path: Path) -> tuple[float, float]:
    import ants

    start = time.perf_counter()
    image = ants.image_read(str(nifti), pixeltype="float")
    template = ants.image_read(str(template_path), pixeltype="float")
    corrected = ants.n4_bias_field_correction(image)
    result = ants.registration(template, corrected, type_of_transform="Affine")
    seconds = time.perf_counter() - start
    mask = template.numpy() > 0
    corr = float(np.corrcoef(result["warpedmovout"].numpy()[mask], template.numpy()[mask])[0, 1])
    return seconds, corr


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures.

    Parameters
    ----------
    argv : list of str or None
        Command-line arguments (``--threads``).

    Returns
    -------
    int
        Exit status (0).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(CORPUS_VARIANTS),
                        help="corpus variants to run besides Colin27")
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    volume, affine = load_reference_brain("colin27")
    study = StudyHeader(patient_name="Bench^Colin", patient_id="BENCH1", patient_birth_date="19600101",
                        patient_sex="M", study_instance_uid="1.2.826.0.1.3680043.8.498.1", study_date="20240101",
                        study_time="120000", accession_number="BENCH")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = [("colin27", write_mr_series(volume, affine, Path(tmp) / "dicom", study=study, series_number=2))]
        for name in args.variants:
            from tests.support.corpus import write_variant

            files = write_variant(name, Path(tmp) / "corpus", size="full")
            inputs.append((name, [f for f in files if f.parent.name == "t1"]))
        for name, files in inputs:
            nifti = convert_series(files, Path(tmp) / f"{name}.nii.gz")
            config = PreprocessConfig(threads=args.threads)
            start = time.perf_counter()
            result = preprocess(nifti, config)
            node_seconds = time.perf_counter() - start
            default_seconds, default_corr = _defaults(nifti, config.template_path or default_template_path())
            stages = ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items())
            print(f"[{name}]")
            print(f"node:     {node_seconds:.1f} s ({stages}); correlation {result.qc['correlation']:.4f}")
            print(f"defaults: {default_seconds:.1f} s; correlation {default_corr:.4f}")
            print(f"ratio: {default_seconds / node_seconds:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
