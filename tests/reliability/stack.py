"""The three services as real processes: in h2c without tokens (for raw-frame and bad-input tests), or as on
Cloud Run (TLS on every hop, ID tokens from the identity emulator's metadata servers, allow-lists)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from emulators.dev_ca import DevCerts
from emulators.identity import IdentityEmulator, Names
from tests.reliability.processes import Service

NAMES = Names("reliability", "reliability.test")
DEVELOPER = NAMES.account("developer")
account = NAMES.account
audience = NAMES.audience


@dataclass
class Stack:
    ping: Service
    routeguide: Service
    aggregator: Service

    @property
    def all(self) -> list[Service]:
        return [self.aggregator, self.ping, self.routeguide]

    async def stop(self) -> dict[str, int | None]:
        """Callers first; the exit codes."""
        return {service.name: await service.stop() for service in self.all}


async def start_h2c(extra: Mapping[str, str] = {}) -> Stack:
    ping = await Service("ping", dict(extra)).start()
    routeguide = await Service("routeguide", dict(extra)).start()
    aggregator = await Service(
        "aggregator",
        {
            "PING_ADDR": ping.address,
            "ROUTEGUIDE_ADDR": routeguide.address,
            "UPSTREAM_INSECURE": "1",
            **extra,
        },
    ).start()
    return Stack(ping, routeguide, aggregator)


def secure_env(
    name: str, emulator: IdentityEmulator, certs: DevCerts, callers: tuple[str, ...] = ()
) -> dict[str, str]:
    """TLS with the dev certificate, tokens verified for `name`'s audience, the developer and `callers` allowed,
    and a metadata server of its own for `name`'s account."""
    return {
        "TLS_CERT_FILE": str(certs.server_cert),
        "TLS_KEY_FILE": str(certs.server_key),
        "TLS_CA_FILE": str(certs.ca_cert),
        "AUTH_AUDIENCE": audience(name),
        "AUTH_CERTS_URL": emulator.certs_url,
        "AUTH_ALLOWED_CALLERS": ",".join([DEVELOPER, *(account(c) for c in callers)]),
        **emulator.env_for(account(name)),
    }


async def start_secure(emulator: IdentityEmulator, certs: DevCerts, extra: Mapping[str, str] = {}) -> Stack:
    ping = await Service("ping", {**secure_env("ping", emulator, certs, ("aggregator",)), **extra}).start()
    routeguide = await Service(
        "routeguide", {**secure_env("routeguide", emulator, certs, ("aggregator",)), **extra}
    ).start()
    aggregator = await Service(
        "aggregator",
        {
            **secure_env("aggregator", emulator, certs),
            "PING_ADDR": f"localhost:{ping.port}",
            "PING_ADDR_AUDIENCE": audience("ping"),
            "ROUTEGUIDE_ADDR": f"localhost:{routeguide.port}",
            "ROUTEGUIDE_ADDR_AUDIENCE": audience("routeguide"),
            **extra,
        },
    ).start()
    return Stack(ping, routeguide, aggregator)
