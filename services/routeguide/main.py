"""The routeguide service's process: ROUTEGUIDE_DB names a feature database (canonical JSON format); unset, the
built-in canonical RouteGuide features are served."""

from __future__ import annotations

from collections.abc import Sequence

from mesh import ConfigError, Runtime, Service, main, text
from routeguide import route_guide_pb2_grpc
from services.routeguide.features import FeatureDatabaseError, load_database
from services.routeguide.servicer import RouteGuideServicer

SERVICE_NAME = "routeguide.RouteGuide"
# Each request message is a Point, a Rectangle or a RouteNote (at most 4 KiB of note: chat.py): a few KiB.
MAX_REQUEST = 64 * 1024


def build(runtime: Runtime) -> Sequence[Service]:
    try:
        database = load_database(text(runtime.env, "ROUTEGUIDE_DB"))
    except FeatureDatabaseError as err:
        raise ConfigError(
            f"ROUTEGUIDE_DB: {err}; set ROUTEGUIDE_DB to a JSON feature file, or unset it"
        ) from err
    servicer = RouteGuideServicer(database)
    add = route_guide_pb2_grpc.add_RouteGuideServicer_to_server
    return [Service(SERVICE_NAME, servicer, add, max_request_bytes=MAX_REQUEST)]


if __name__ == "__main__":
    main("routeguide", build)
