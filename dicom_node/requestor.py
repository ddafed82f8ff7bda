"""Associations we request (reports to the PACS, C-ECHO checks), without pynetdicom's lost-response race.

pynetdicom (3.0.4) lets a ``send_*()`` call pause the association's reactor
thread so that the reactor does not take the call's response off the DIMSE
queue: the call clears ``_reactor_checkpoint`` and waits until the reactor
says ``_is_paused``.  The reactor's side has a gap::

    self._is_paused = True
    self._reactor_checkpoint.wait()     # returns: the checkpoint is still set
                                        # <- send_c_store() clears it, sees _is_paused, sends
    self._is_paused = False
    self.dimse.get_msg(block=False)     # the C-STORE-RSP, if it came back already

The reactor then drops the response as an "unexpected C-STORE service
message" and ``send_c_store()`` waits for it until the DIMSE timeout aborts
the association.  The peer had stored the instance and said so; the sender
reports a failure.  Under load (several associations on two cores) the chaos
harness saw this in about one C-STORE in 700 (pynetdicom issues #842, #850).

:func:`associate` opens an association whose reactor closes the gap:
:func:`checkpoint` looks at the checkpoint again after leaving the wait, and
goes back to waiting when a ``send_*()`` call cleared it in between.  Everything
else is pynetdicom's reactor, step for step.  It relies on pynetdicom
internals (the node pins ``pynetdicom>=3,<4``); an association whose internals
differ keeps pynetdicom's reactor.
"""

from __future__ import annotations

import logging
import threading
import types
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association

logger = logging.getLogger(__name__)

#: How long the requestor's reactor waits between looks at its queues (pynetdicom's own figure).
POLL_S = 0.001


def checkpoint(assoc: Any) -> bool:
    """Wait while a ``send_*()`` call holds the reactor of *assoc*.

    Returns False when a call cleared the checkpoint after the wait returned: the
    reactor must then not look at the DIMSE queue (the call's response will be
    there) and comes back here instead.
    """
    assoc._is_paused = True
    assoc._reactor_checkpoint.wait()
    assoc._is_paused = False
    return bool(assoc._reactor_checkpoint.is_set())


def associate(ae: AE, host: str, port: int, *, ae_title: str, tls_args: Any = None,
              evt_handlers: list[Any] | None = None) -> Association:
    """``ae.associate(...)`` with the race-free reactor (see the module's description)."""
    handlers = [*(evt_handlers or []), (evt.EVT_CONN_OPEN, _install)]
    return ae.associate(host, port, ae_title=ae_title, tls_args=tls_args, evt_handlers=handlers)


def _install(event: Any) -> None:
    """``EVT_CONN_OPEN``: give the requestor association the race-free reactor before it starts."""
    assoc = event.assoc
    if assoc.is_requestor and all(hasattr(assoc, name) for name in ("_reactor_checkpoint", "_is_paused", "dimse")):
        assoc._run_reactor = types.MethodType(_requestor_reactor, assoc)


def _requestor_reactor(self: Any) -> None:
    """pynetdicom's ``Association._run_reactor`` with :func:`checkpoint` closing the lost-response gap."""
    pause = threading.Event()
    self._is_paused = False
    while not self._kill:
        pause.wait(POLL_S)
        if not checkpoint(self):
            continue
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            logger.debug("association released by the peer")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            logger.debug("association aborted")
            self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            logger.error("network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return
