"""A fast check that the Hugging Face hub can be reached.

Without ``HF_HUB_OFFLINE=1``, an offline machine spends about 30 s in the hub client's retries
before failing. One short request answers the same question in at most ``timeout`` seconds,
so weight resolution can fail at once with its usual message.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

__all__ = ["hub_endpoint", "hub_reachable"]

# endpoint -> answer; one check per endpoint and process.
_CACHE: dict[str, bool] = {}
_LOCK = threading.Lock()


def hub_endpoint() -> str:
    """The hub URL the client uses (``HF_ENDPOINT`` or https://huggingface.co), read now."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def _offline_by_setting() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers one HEAD request within ``timeout`` seconds.

    Any HTTP answer, even an error status, counts as reachable (the server is there; the hub
    client reports what is wrong). No answer (no network, DNS failure, refused connection,
    timeout) is False, and so is ``HF_HUB_OFFLINE=1`` without a request. The answer is cached
    per endpoint for the life of the process; ``hub_reachable.cache_clear()`` forgets it.
    Proxies from the environment (``HTTPS_PROXY``...) are used, as by the hub client.
    """
    if _offline_by_setting():
        return False
    endpoint = hub_endpoint()
    with _LOCK:
        if endpoint not in _CACHE:
            _CACHE[endpoint] = _probe(endpoint, timeout)
        return _CACHE[endpoint]


def _probe(url: str, timeout: float) -> bool:
    """The request in a daemon thread, so that a slow DNS lookup (which the socket timeout
    does not cover) cannot hold the caller longer than ``timeout`` either."""
    answer: list[bool] = []
    worker = threading.Thread(target=lambda: answer.append(_head(url, timeout)), daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(answer and answer[0])


def _head(url: str, timeout: float) -> bool:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, timeouts, refused connections, bad URLs
        return False


def _cache_clear() -> None:
    with _LOCK:
        _CACHE.clear()


hub_reachable.cache_clear = _cache_clear  # type: ignore[attr-defined]
