"""Where a run's objects go: the destinations of the study's called AE title (``network.profiles``)."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import ConfigError
from dicom_node.db.models import Run, Study
from dicom_node.net.access import profile_for
from dicom_node.settings import Destination, Settings

logger = logging.getLogger(__name__)


def destinations_for(settings: Settings, called_ae_title: str | None) -> tuple[Destination, ...]:
    """The destinations that receive reports of a study sent to *called_ae_title*.

    A profile with a non-empty ``destinations`` list restricts deliveries to
    those destinations; the main AE title, an unknown title (studies received
    before profiles were configured) or a profile without destinations gets all
    configured destinations.

    Raises
    ------
    ConfigError
        A profile names a destination that is not configured.
    """
    profile = profile_for(settings, called_ae_title)
    if profile is None or not profile.destinations:
        return settings.destinations
    return tuple(settings.destination(name) for name in profile.destinations)


def routes(settings: Settings, session: Session, run_id: str) -> tuple[list[tuple[str, tuple[str, ...]]], str | None]:
    """(destination name, object kinds) of each destination of this run's study, or an error.

    The study's called AE title picks the destinations (``network.profiles``); a profile
    naming an unknown destination sends nothing and the run says why.
    """
    called = session.scalar(select(Study.called_ae_title).join(Run).where(Run.id == run_id))
    try:
        chosen = destinations_for(settings, called)
    except ConfigError as exc:
        logger.error("run %s: no delivery, destinations misconfigured: %s", run_id, exc)
        return [], f"not sent: {exc}"
    return [(dest.name, tuple(dest.objects)) for dest in chosen], None

