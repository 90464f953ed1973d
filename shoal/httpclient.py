"""HTTP requests that carry a credential (the API token, a node's registration credential).

Redirects are not followed: urllib sends a request's headers, the ``Authorization`` header with them, to
wherever a 3xx points, another host included (and turns a POST into a GET that still carries it). Shoal's
API never redirects; a 3xx comes back as :class:`urllib.error.HTTPError`, for the caller to report.
"""

from __future__ import annotations

import urllib.request
from http.client import HTTPResponse
from typing import Any


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def urlopen(request: urllib.request.Request, timeout: float) -> HTTPResponse:
    """``urllib.request.urlopen`` that does not follow redirects."""
    response: HTTPResponse = _opener.open(request, timeout=timeout)
    return response
