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
              evt_handlers: list[Any] | None = None, ext_neg: list[Any] | None = None) -> Association:
    """``ae.associate(...)`` with the race-free reactor (see the module's description)."""
    handlers = [*(evt_handlers or []), (evt.EVT_CONN_OPEN, _install)]
    return ae.associate(host, port, ae_title=ae_title, tls_args=tls_args, evt_handlers=handlers, ext_neg=ext_neg)


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
        if turn_ended(self):
            return


def turn_ended(assoc: Any) -> bool:
    """The end of a reactor turn, after any message was served: True when the association is over (killed).

    Shared by this module's requestor reactor and the acceptor's (:mod:`dicom_node.net.reactors`); the steps
    are pynetdicom's: the peer's release request answered, an abort, the DUL gone, the network timeout.
    """
    if assoc.is_established and assoc.acse.is_release_requested():
        # Released before the response goes out: the peer may close the
        # connection (EVT_CONN_CLOSE) as soon as it has it.
        assoc.is_released = True
        assoc.is_established = False
        assoc.acse.send_release(is_response=True)
        logger.debug("association released by the peer")
        evt.trigger(assoc, evt.EVT_RELEASED, {})
    elif assoc.acse.is_aborted():
        logger.debug("association aborted")
        assoc.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
        assoc.is_aborted = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_ABORTED, {})
    elif not assoc.dul.is_alive():
        pass  # the DUL thread ended: nothing more will come
    elif assoc.dul.idle_timer_expired():
        logger.error("network timeout reached")
        if assoc.network_timeout_response == "A-RELEASE":
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc.release()
            assoc._is_paused = False
        else:
            assoc.abort()
    else:
        return False
    assoc.kill()
    return True
