"""What a run needs, built once per process that processes runs.

The processing stack (torch, antspyx, the model) is imported only when
:func:`build_run_context` is called, so that the listener's process, which
imports this module, stays small and starts quickly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from core.errors import ConfigError, NodeError
from dicom_node.db.notes import NotesSource, make_notes_source
from dicom_node.settings import Settings

if TYPE_CHECKING:
    from dicom_node.net.qr import PriorStudyClient
    from model.inference import Predictor
    from pipeline.normative import NormativeTable
    from pipeline.preprocess_config import PreprocessConfig
    from pipeline.select import SelectionRules
    from pipeline.volumetry import VolumetryConfig

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a run needs, built once at start-up by the composition root."""

    settings: Settings
    sessions: sessionmaker[Session]
    predictor: Predictor
    rules: SelectionRules
    preprocess_config: PreprocessConfig
    software_version: str = "0.1.0"
    notes: NotesSource | None = None
    #: Called AE title of a profile with its own model (``network.profiles[].model_path``) -> that model.
    profile_predictors: dict[str, Predictor] = field(default_factory=dict)
    #: The volumetry method (``volumetry.*``); None: no volumetry.
    volumetry: VolumetryConfig | None = None
    #: Normative values of the volumes (``volumetry.normative_table``); None: none.
    normative: NormativeTable | None = None
    #: The Q/R SCU of the prior study (``prior.*``); None: no comparison with a prior.
    prior_client: PriorStudyClient | None = None

    def predictor_for(self, called_ae_title: str | None) -> Predictor:
        """The model of the profile the study was sent to, or the node's model."""
        return self.profile_predictors.get(called_ae_title or "", self.predictor)


def series_rules(settings: Settings) -> SelectionRules:
    """The series-selection rules the settings point at (``processing.series_rules``).

    Raises
    ------
    ConfigError
        If the rules file is missing or malformed.
    """
    from pipeline.select import load_rules

    return load_rules(settings.series_rules_path)


def preprocess_config(settings: Settings) -> PreprocessConfig:
    """The preprocessing settings and QC limits of runs (``processing.registration``, ``processing.n4``)."""
    from pipeline.preprocess_config import PreprocessConfig

    return PreprocessConfig(registration=settings.processing.registration, n4=settings.processing.n4)


def volumetry_config(settings: Settings) -> VolumetryConfig | None:
    """The volumetry method of runs (``volumetry.*``), or None when ``volumetry.enabled`` is off.

    Raises
    ------
    ConfigError
        An atlas file is missing (each report would say so otherwise): the message names the key and the package.
    """
    if not settings.volumetry.enabled:
        return None
    from pipeline import volumetry

    defaults = volumetry.VolumetryConfig()
    atlas = volumetry.ATLAS_DIR
    missing = [name for name in ("ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz") if not (atlas / name).is_file()]
    if missing:
        raise ConfigError(f"invalid setting volumetry.enabled: atlas file(s) {', '.join(missing)} missing in "
                          f"{atlas} (Debian package mricron-data), or set volumetry.enabled = false")
    return volumetry.VolumetryConfig(
        working_spacing_mm=settings.volumetry.working_spacing_mm, atlas_dir=atlas,
        local_iterations=defaults.local_iterations if settings.volumetry.hippocampal_refinement else ())


def normative_table(settings: Settings) -> NormativeTable | None:
    """The normative values of ``volumetry.normative_table``, read once (None: not set).

    Raises
    ------
    ConfigError
        The file cannot be read or is not a normative table; the message names the key.
    """
    path = settings.normative_table_path
    if path is None or not settings.volumetry.enabled:
        return None
    from pipeline.normative import NormativeTable

    try:
        return NormativeTable.load(path)
    except (NodeError, OSError, ValueError) as exc:
        raise ConfigError(f"invalid setting volumetry.normative_table: {exc}") from exc


def prior_client(settings: Settings) -> PriorStudyClient | None:
    """The Q/R SCU of ``prior.*`` (None: ``prior.enabled`` is off); ConfigError for an unknown PACS or rules file."""
    if not settings.prior.enabled:
        return None
    from dicom_node.net.qr import PriorStudyClient

    return PriorStudyClient(settings)


def build_run_context(settings: Settings, sessions: sessionmaker[Session]) -> RunContext:
    """Load the models and the rules: what :func:`~dicom_node.runs.processing.process_run` needs.

    The node's model and the model of each profile that names one
    (``network.profiles[].model_path``), each directory loaded once.

    Called once per process that processes runs (each worker process of the
    local executor, the node itself with ``processing.isolation = "thread"``,
    each Celery worker process).
    """
    from model.inference import Predictor

    predictor = Predictor.load(settings.model_path, device=settings.model.device)
    loaded = {settings.model_path.resolve(): predictor}
    profile_predictors: dict[str, Predictor] = {}
    for profile in settings.network.profiles:
        if profile.model_path:
            path = Path(profile.model_path).resolve()
            if path not in loaded:
                loaded[path] = Predictor.load(path, device=settings.model.device)
            profile_predictors[profile.ae_title] = loaded[path]
            logger.info("profile %s uses model %s", profile.ae_title, loaded[path].info.name)
    return RunContext(
        settings=settings,
        sessions=sessions,
        predictor=predictor,
        profile_predictors=profile_predictors,
        rules=series_rules(settings),
        preprocess_config=preprocess_config(settings),
        notes=make_notes_source(settings.notes, sessions),
        volumetry=volumetry_config(settings),
        normative=normative_table(settings),
        prior_client=prior_client(settings),
    )

