"""Parent scoring: how good a candidate parent is for one child. Pure arithmetic.

The scheduler core filters candidates (same host, blocklisted, dead, wrong state) and hands
the survivors here as `Candidate` records; `rank` orders them best first. Kept apart from the
core so that swarm-speed work can tune weights or replace the formula without touching the
state machine. This module must never look at scheduler state, the clock, or randomness:
the same inputs always give the same order.

The score is a weighted sum of terms in [0, 1]:
- pieces: fraction of the task's manifest the candidate holds (1 for a finished peer);
- free slots: upload slots the candidate's host has left after the children already assigned
  to it, as a fraction of its slots (load spreading, as Dragonfly's load score); with
  `free_steps`, counted in steps of that fraction of the slots (rounded up), so that hosts a
  few children apart tie and the hash below spreads the choice among them (the scheduler's
  parent choice at registration, brokers/scheduler/parents.py);
- idc: same non-empty IDC as the child;
- location: leading fields of "country|province|city|zone|cluster" that match;
- seed: the candidate runs on a seed host (seed hosts are provisioned to upload);
- uplink: the candidate's measured upload rate shared by its children plus this one
  (uplink_bps / (children + 1)), as a fraction of the best such share among the candidates;
  a candidate not measured yet gets the median of those that are, and when none is measured
  the term is the same for all (it decides nothing).
Ties are broken by a hash of (child, candidate), so equal candidates are spread across
children instead of every child picking the alphabetically first one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

LOCATION_FIELDS = 5


@dataclass(frozen=True, slots=True)
class Weights:
    pieces: float = 0.35
    free_slots: float = 0.30
    idc: float = 0.15
    location: float = 0.10
    seed: float = 0.10
    uplink: float = 0.20


DEFAULT_WEIGHTS = Weights()


@dataclass(frozen=True, slots=True)
class Candidate:
    peer_id: str
    host_id: str
    pieces_fraction: float  # 0..1
    free_slots: int  # may be negative when a host is over-assigned
    upload_slots: int
    idc: str = ""
    location: str = ""
    seed: bool = False
    uplink_bps: float = 0.0  # measured upload rate of its host, bytes/s; 0 = not known yet


def location_affinity(a: str, b: str) -> float:
    """Matching leading fields of two locations, as a fraction of LOCATION_FIELDS."""
    if not a or not b:
        return 0.0
    n = 0
    for x, y in zip(a.split("|")[:LOCATION_FIELDS], b.split("|")[:LOCATION_FIELDS]):
        if not x or x != y:
            break
        n += 1
    return n / LOCATION_FIELDS


def uplink_shares(candidates: list[Candidate]) -> dict[str, float]:
    """peer id -> the uplink term in [0, 1] (module docstring); {} when no candidate is measured."""
    share = {c.peer_id: c.uplink_bps / (max(0, c.upload_slots - c.free_slots) + 1)
             for c in candidates if c.uplink_bps > 0}
    if not share:
        return {}
    top = max(share.values())
    known = sorted(share.values())
    median = known[len(known) // 2]
    return {c.peer_id: share.get(c.peer_id, median) / top for c in candidates}


def score(c: Candidate, child_idc: str = "", child_location: str = "",
          weights: Weights = DEFAULT_WEIGHTS, uplink: float = 0.0, free_steps: int = 0) -> float:
    slots = max(1, c.upload_slots)
    free = min(1.0, max(0.0, c.free_slots / slots))
    if free_steps > 0:
        free = math.ceil(free * free_steps) / free_steps
    pieces = min(1.0, max(0.0, c.pieces_fraction))
    return (
        weights.pieces * pieces
        + weights.free_slots * free
        + weights.idc * (1.0 if child_idc and c.idc == child_idc else 0.0)
        + weights.location * location_affinity(child_location, c.location)
        + weights.seed * (1.0 if c.seed else 0.0)
        + weights.uplink * uplink
    )


def _tiebreak(child_id: str, peer_id: str) -> bytes:
    return hashlib.blake2b(f"{child_id}\0{peer_id}".encode(), digest_size=8).digest()


def rank(candidates: list[Candidate], child_id: str, child_idc: str = "",
         child_location: str = "", weights: Weights = DEFAULT_WEIGHTS,
         free_steps: int = 0) -> list[Candidate]:
    """Candidates best first; deterministic for the same inputs. `free_steps`: count free slots
    in steps (module docstring), 0 for exactly."""
    shares = uplink_shares(candidates)
    return sorted(
        candidates,
        key=lambda c: (-round(score(c, child_idc, child_location, weights, shares.get(c.peer_id, 0.0),
                                     free_steps), 9),
                       _tiebreak(child_id, c.peer_id)),
    )
