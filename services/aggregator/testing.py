"""For tests of the Survey's limits: the largest request they allow."""

from __future__ import annotations

from aggregator.v1 import aggregator_pb2
from routeguide.route_guide_pb2 import Point, Rectangle
from services.aggregator.survey import MAX_MESSAGE_FIELD_BYTES, MAX_ROUTE_POINTS

# Negative coordinates take the most bytes (10 per int32), and these are valid ones (within +-90/+-180 degrees).
_FAR = Point(latitude=-900_000_000, longitude=-1_800_000_000)


def largest_survey(points: int = MAX_ROUTE_POINTS) -> aggregator_pb2.SurveyRequest:
    """A valid SurveyRequest with every field at its largest encoding and a route of `points` points (a walk
    south-west, so that routeguide sums a distance)."""
    route = [Point(latitude=-1 - i * 1_000, longitude=-1 - i * 1_000) for i in range(points)]
    # The message field is tag (1 byte) + length (3 bytes) + text.
    message = "x" * (MAX_MESSAGE_FIELD_BYTES - 4)
    return aggregator_pb2.SurveyRequest(message=message, area=Rectangle(lo=_FAR, hi=_FAR), route=route)
