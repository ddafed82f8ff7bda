"""A model quality test that can fail: the demonstration configuration must learn (README, "the code learns").

A small synthetic cohort is made in the test (``model.cohort``, seeded), the
demonstration configuration is trained on it for a few epochs, MRI only
(preset BRAIN_ADAPTER on the demonstration base with the committed pretrained
ViT ``model/demo/vision.safetensors``; the learning rates of ``make
demo-model``), and the trained parts are read back and scored on the held-out
subjects.  Macro F1 over the three classes must beat chance (1/3: a guess blind
to the image; always answering the largest class scores less) by :data:`MARGIN`.

Measured on this machine (2 CPU cores, torch 2.13 CPU), 90 subjects (about
110 scans, 32-36 of them held out), 15 epochs: held-out macro F1 0.725 with the
seeds below (the same on every run); 0.61-0.83 with training seeds 1-5 on the
same cohort; with the labels shuffled across subjects before training (the same
set-up otherwise) 0.19-0.34, chance, so the test can fail.  The split, the
order and the initialisation are seeded, so the figure depends only on the torch
build and the thread count (three runs here: 0.7253 each time).  Cost: 84-95 s
of CPU time on two threads (the cohort about 10 s of it); 86 s of wall time on
this machine's two cores with other jobs at load 3-4, 133 s at load 6; marked
slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from model.cohort import CohortConfig, generate_cohort
from model.dataset import read_manifest
from model.demo import DEMO_DIR
from model.evaluate import load_run
from model.feed import build_inputs, predict
from model.train import TrainConfig, train

#: Macro F1 of a guess blind to the image, over three classes.
CHANCE = 1 / 3
#: What the trained model must add to chance on held-out subjects.
MARGIN = 0.15
SUBJECTS, EPOCHS, COHORT_SEED, TRAIN_SEED = 90, 15, 1, 0


@pytest.mark.slow
def test_the_demonstration_configuration_learns_on_held_out_subjects(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", CohortConfig(n_subjects=SUBJECTS, size=64, seed=COHORT_SEED))
    run = train(TrainConfig(manifest=str(manifest), out_dir=str(tmp_path / "run"), inputs="mri", demo_base=True,
                            demo_vision=str(DEMO_DIR / "vision.safetensors"), epochs=EPOCHS, lr_projection=1e-3,
                            lr_head=1e-2, seed=TRAIN_SEED, progress=False))

    # score the parts as written, on the subjects the run held out (by name, not by the run's own numbers)
    model, summary = load_run(run)
    held_out = set(summary["split"]["test_subjects"])
    trained_on = set(summary["split"]["train_subjects"]) | set(summary["split"]["validation_subjects"])
    samples = read_manifest(manifest)
    test_idx = [i for i, s in enumerate(samples) if s.subject_id in held_out]
    assert held_out and not held_out & trained_on
    assert len(test_idx) >= 30
    pred = predict(model, build_inputs(model, samples, "mri"), test_idx)
    truth = np.array([samples[i].label for i in test_idx])
    macro_f1 = f1_score(truth, pred.predicted, labels=[0, 1, 2], average="macro", zero_division=0)

    assert macro_f1 > CHANCE + MARGIN, f"held-out macro F1 {macro_f1:.3f}"
    assert len(set(pred.predicted.tolist())) == 3  # not a constant guess
    assert macro_f1 == pytest.approx(summary["test_metrics"]["macro avg"]["f1"])
    assert json.loads((run / "run.json").read_text())["finished"] is True
