"""X's API through tweepy: requests re-pointed to the configured API URL, failures as ChannelError."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import aiohttp
import tweepy.errors
from tweepy.asynchronous import AsyncClient
from yarl import URL

from channels.types import ChannelError

TWEEPY_HOST = "api.twitter.com"  # tweepy hard-codes this host; requests are re-pointed below
TIMEOUT = aiohttp.ClientTimeout(total=20, connect=5)
DEFAULT_RATE_LIMIT_WAIT = 60.0


class Credentials(Protocol):
    """What an X account gives the client (`channels.social.twitter.TwitterAccount`)."""

    @property
    def bearer_token(self) -> str: ...

    @property
    def consumer_key(self) -> str: ...

    @property
    def consumer_secret(self) -> str: ...

    @property
    def access_token(self) -> str: ...

    @property
    def access_token_secret(self) -> str: ...

    @property
    def api_url(self) -> str: ...


class RewritingSession:
    """An aiohttp session that sends tweepy's api.twitter.com requests to `api_url` instead."""

    def __init__(self, session: aiohttp.ClientSession, api_url: str):
        self._session = session
        self._base = URL(api_url)

    def request(self, method: str, url: str | URL, **kwargs: Any) -> Any:
        target = url if isinstance(url, URL) else URL(url)
        if target.host == TWEEPY_HOST:
            target = (
                target.with_scheme(self._base.scheme)
                .with_host(self._base.host or TWEEPY_HOST)
                .with_port(self._base.explicit_port)
            )
        return self._session.request(method, target, **kwargs)


@asynccontextmanager
async def client_for(account: Credentials) -> AsyncIterator[AsyncClient]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        client = AsyncClient(
            bearer_token=account.bearer_token or None,
            consumer_key=account.consumer_key,
            consumer_secret=account.consumer_secret,
            access_token=account.access_token,
            access_token_secret=account.access_token_secret,
            return_type=dict,
        )
        client.session = RewritingSession(session, account.api_url)
        yield client


async def call(coroutine: Any) -> dict[str, Any]:
    """Await a tweepy call and turn its failures into ChannelError."""
    try:
        answer = await coroutine
    except tweepy.errors.TooManyRequests as exc:
        wait = DEFAULT_RATE_LIMIT_WAIT
        if exc.reset_time is not None:
            wait = max(float(exc.reset_time) - time.time(), 1.0)
        raise ChannelError(f"X: {_message(exc)}", permanent=False, retry_after=wait) from exc
    except tweepy.errors.TwitterServerError as exc:
        raise ChannelError(f"X: {_message(exc)}", permanent=False) from exc
    except tweepy.errors.HTTPException as exc:
        raise ChannelError(f"X: {_message(exc)}", permanent=True) from exc
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise ChannelError(f"X unreachable: {exc!r}", permanent=False) from exc
    if not isinstance(answer, dict):
        raise ChannelError("X answered without a JSON object", permanent=False)
    return answer


def _message(exc: tweepy.errors.HTTPException) -> str:
    status = getattr(exc.response, "status", "?")
    return f"{status} " + ("; ".join(str(m) for m in exc.api_messages) or str(exc))
