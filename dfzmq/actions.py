"""What a pure core returns: messages to send to one ROUTER peer, or to publish; and counters.

Kept apart from dfzmq/service.py so that cores (brokers/*/core.py) import no zmq.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Send:
    """Send `msg` to the ROUTER peer with identity `to`."""

    to: bytes
    msg: Any


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish `msg` on the service's PUB socket."""

    msg: Any


class Counters(collections.Counter):
    """Named event counts (`dropped.bad-frame`, `sent.HAVE`, ...), reported by STAT_REQUEST."""
