"""A stand-in for the third-party notification provider (SPEC section 2), served over real HTTP.

It owns the fake provider's side of the contract: it accepts notifications once per idempotency
key (409 with the first id afterwards), fails on demand through switchable `Rule`s (any status,
`Retry-After`, accept-then-drop, a limited number of times, or with a seeded probability), and
records every request in arrival order. `latency_ms` delays each answer; `capacity` (None: no
limit) caps how many requests are handled at once, the rest wait their turn, so a provider
that comes back slower can be modelled. Tests run it in-process (`DemoProvider`), where an
`on_request` hook runs while each recorded request is still unanswered (the fault suite kills a
worker mid-call with it); the demo and docker compose run it standalone
(`python -m worker.tooling.demo_provider`), driven by a control API.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

logger = logging.getLogger(__name__)

CHANNELS = frozenset({"email", "sms"})
REQUIRED_FIELDS = ("idempotency_key", "ticker", "price", "occurred_at", "audience")
ERROR_BODIES = ("json", "binary", "huge")
HUGE_BODY_BYTES = 10 * 2**20
_BINARY_PAGE = b"\x00\xff\xfe<html>\x00\x1b[31mBad Gateway\xc3\x28\x00\xed\xa0\x80</html>\x00"


@dataclass(frozen=True)
class Rule:
    """A failure to inject. `channel`/`audience` None match any; the first live match decides.

    `drop` accepts the key, then cuts the connection without answering (`status` is unused).
    `times` limits how often the rule fires; `probability` makes it fire only sometimes.
    `body` shapes the failure's body: "json" (a short error object), "binary" (a proxy's
    binary error page, NUL bytes and invalid UTF-8), "huge" (a 10 MB error page).
    `nul_id` accepts the key instead and answers 200 with an `id` holding a NUL.
    """

    channel: str | None = None
    audience: str | None = None
    status: int = 500
    retry_after: int | None = None
    drop: bool = False
    times: int | None = None
    probability: float = 1.0
    body: str = "json"
    nul_id: bool = False

    def __post_init__(self) -> None:
        if self.body not in ERROR_BODIES:
            raise ValueError(f"body must be one of {', '.join(ERROR_BODIES)}, got {self.body!r}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status, got {self.status!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {self.probability!r}")
        if self.times is not None and self.times < 0:
            raise ValueError(f"times must not be negative, got {self.times!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        unknown = set(data) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown rule fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def matches(self, channel: str, audience: str) -> bool:
        return self.channel in (None, channel) and self.audience in (None, audience)


@dataclass(frozen=True)
class RequestRecord:
    """One notification request as the provider saw it; `status` is the answer it chose."""

    key: str
    channel: str
    audience: str
    ticker: str
    price: str
    occurred_at: str
    status: int
    dropped: bool
    at: float
    seq: int


class DemoProvider:
    """The fake provider's state and HTTP server; `async with` starts and stops it."""

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        *,
        latency_ms: int = 0,
        capacity: int | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.latency_ms = latency_ms
        self._slots: asyncio.Semaphore | None = None
        self.capacity = capacity
        # awaited with each recorded request before its answer is written
        self.on_request: Callable[[RequestRecord], Awaitable[None]] | None = None
        self._seed = seed
        self._random = random.Random(seed)
        self._host = host
        self._port = port
        self._ids = itertools.count(1)  # message ids stay unique across resets
        self._requests: list[RequestRecord] = []
        self._accepted: dict[str, str] = {}
        self.set_rules(rules)
        self.app = web.Application()
        self.app.add_routes(
            [
                web.post("/v1/notifications/{channel}", self._notify),
                web.get("/_control/requests", self._get_requests),
                web.get("/_control/accepted", self._get_accepted),
                web.get("/_control/stats", self._get_stats),
                web.put("/_control/rules", self._put_rules),
                web.delete("/_control/state", self._delete_state),
            ]
        )
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("the demo provider is not running")
        host, port = self._runner.addresses[0][:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def requests(self) -> list[RequestRecord]:
        return list(self._requests)

    @property
    def accepted(self) -> dict[str, str]:
        return dict(self._accepted)

    def set_rules(self, rules: Iterable[Rule]) -> None:
        self._rules = list(rules)
        self._fired = [0] * len(self._rules)

    def reset(self) -> None:
        """Forget requests, accepted keys and rules, and reseed the random source."""
        self._requests.clear()
        self._accepted.clear()
        self.set_rules(())
        self._random.seed(self._seed)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _firing_rule(self, channel: str, audience: str) -> Rule | None:
        for index, rule in enumerate(self._rules):
            if not rule.matches(channel, audience):
                continue
            if rule.times is not None and self._fired[index] >= rule.times:
                continue
            if rule.probability < 1.0 and self._random.random() >= rule.probability:
                continue
            self._fired[index] += 1
            return rule
        return None

    def _answer(self, key: str, channel: str, audience: str) -> tuple[web.Response, bool]:
        """Decide the answer (accepting the key if it is accepted) and whether to drop it."""
        if key in self._accepted:
            return web.json_response({"id": self._accepted[key]}, status=409), False
        rule = self._firing_rule(channel, audience)
        if rule is None or rule.drop or rule.nul_id:
            nul = "\x00" if rule is not None and rule.nul_id else ""
            self._accepted[key] = message_id = f"msg-{nul}{next(self._ids)}"
            return web.json_response({"id": message_id}), rule is not None and rule.drop
        headers = {} if rule.retry_after is None else {"Retry-After": str(rule.retry_after)}
        if rule.body == "binary":
            page = web.Response(body=_BINARY_PAGE, status=rule.status, headers=headers)
            return page, False
        if rule.body == "huge":
            filler = b"<html>" + b"x" * (HUGE_BODY_BYTES - 13) + b"</html>"
            return web.Response(body=filler, status=rule.status, headers=headers), False
        error = {"error": f"injected failure {rule.status}"}
        return web.json_response(error, status=rule.status, headers=headers), False

    @property
    def capacity(self) -> int | None:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int | None) -> None:
        if value is not None and value < 1:
            raise ValueError(f"capacity must be at least 1, got {value!r}")
        self._capacity = value
        self._slots = None if value is None else asyncio.Semaphore(value)

    async def _notify(self, request: web.Request) -> web.Response:
        slots = self._slots
        if slots is None:
            return await self._handle(request)
        async with slots:
            return await self._handle(request)

    async def _handle(self, request: web.Request) -> web.Response:
        channel = request.match_info["channel"]
        key = request.headers.get("Idempotency-Key", "")
        if channel not in CHANNELS:
            return _rejection(404, f"unknown channel {channel!r}")
        if not key:
            return _rejection(400, "missing Idempotency-Key header")
        try:
            body = await request.json()
        except ValueError:
            return _rejection(400, "body is not JSON")
        if not isinstance(body, dict) or not all(
            isinstance(body.get(name), str) for name in REQUIRED_FIELDS
        ):
            return _rejection(
                400, f"body must be an object with string {', '.join(REQUIRED_FIELDS)}"
            )
        if body["idempotency_key"] != key:
            return _rejection(400, "idempotency_key differs from the Idempotency-Key header")

        response, drop = self._answer(key, channel, body["audience"])
        record = RequestRecord(
            key=key,
            channel=channel,
            audience=body["audience"],
            ticker=body["ticker"],
            price=body["price"],
            occurred_at=body["occurred_at"],
            status=response.status,
            dropped=drop,
            at=time.monotonic(),
            seq=len(self._requests),
        )
        self._requests.append(record)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "#%d %s %s audience=%s key=%s -> %s",
                record.seq,
                channel,
                record.ticker,
                record.audience,
                key,
                "dropped" if drop else response.status,
            )
        if self.on_request is not None:
            await self.on_request(record)
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        if drop and request.transport is not None:
            # Cut the connection before anything is written. aiohttp then fails to write the
            # returned response and takes that as a client disconnect, without logging an error.
            request.transport.close()
        return response

    async def _get_requests(self, request: web.Request) -> web.Response:
        return web.json_response([dataclasses.asdict(record) for record in self._requests])

    async def _get_accepted(self, request: web.Request) -> web.Response:
        return web.json_response(self._accepted)

    async def _get_stats(self, request: web.Request) -> web.Response:
        """Counts only, cheap enough to poll: requests seen and keys accepted."""
        return web.json_response(
            {
                "requests": len(self._requests),
                "accepted": len(self._accepted),
                "latency_ms": self.latency_ms,
                "capacity": self.capacity,
            }
        )

    async def _put_rules(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            rules = [Rule.from_dict(rule) for rule in body["rules"]]
            latency_ms = int(body.get("latency_ms", self.latency_ms))
            capacity = body.get("capacity", self.capacity)
            if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
                raise ValueError(f"capacity must be null or a positive integer, got {capacity!r}")
        except (ValueError, TypeError, KeyError) as exc:
            return _rejection(
                400, f"expected {{'rules': [rule, ...], 'latency_ms': N, 'capacity': N}}: {exc}"
            )
        self.set_rules(rules)
        self.latency_ms = latency_ms
        self.capacity = capacity
        return web.json_response(
            {
                "rules": [rule.to_dict() for rule in rules],
                "latency_ms": latency_ms,
                "capacity": capacity,
            }
        )

    async def _delete_state(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({})


def _rejection(status: int, message: str) -> web.Response:
    logger.warning("rejected with %d: %s", status, message)
    return web.json_response({"error": message}, status=status)


def _rule_arg(text: str) -> Rule:
    try:
        return Rule.from_dict(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"bad rule {text!r}: {exc}") from exc


async def _serve(provider: DemoProvider) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    async with provider:
        logger.info("demo provider listening on %s", provider.url)
        await stopping.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tooling.demo_provider",
        description="Run the demo notification provider.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument(
        "--rule",
        type=_rule_arg,
        action="append",
        default=[],
        metavar="JSON",
        help='a failure rule, e.g. \'{"channel": "email", "audience": "b", "status": 500}\'',
    )
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument(
        "--capacity", type=int, default=None, help="requests handled at once (default: no limit)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quiet", action="store_true", help="no log line per request (the benchmarks)"
    )
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    provider = DemoProvider(
        args.rule,
        latency_ms=args.latency_ms,
        capacity=args.capacity,
        seed=args.seed,
        host=args.host,
        port=args.port,
    )
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(provider))
    else:
        asyncio.run(_serve(provider))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
