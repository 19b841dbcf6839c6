"""The Survey's limits, as arithmetic on the encoding: the largest valid request is exactly the aggregator's
request size limit, and one more route point takes it past."""

from __future__ import annotations

from aggregator.v1 import aggregator_pb2
from routeguide.route_guide_pb2 import Point
from services.aggregator.survey import MAX_REQUEST_BYTES, MAX_ROUTE_POINTS, too_long
from services.aggregator.testing import largest_survey


def test_the_largest_valid_survey_fits_the_request_limit_exactly() -> None:
    assert largest_survey().ByteSize() == MAX_REQUEST_BYTES
    assert largest_survey(MAX_ROUTE_POINTS + 1).ByteSize() > MAX_REQUEST_BYTES


def test_a_route_past_the_cap_is_refused_with_the_cap_in_the_message() -> None:
    at_cap = aggregator_pb2.SurveyRequest(route=[Point()] * MAX_ROUTE_POINTS)
    assert too_long(at_cap) is None
    past = aggregator_pb2.SurveyRequest(route=[Point()] * (MAX_ROUTE_POINTS + 1))
    assert too_long(past) == (
        f"route has {MAX_ROUTE_POINTS + 1} points; a Survey takes at most {MAX_ROUTE_POINTS} "
        "(survey a longer route in parts)"
    )
