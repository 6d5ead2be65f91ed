"""One HTTP session for every outgoing request (the MediConfusion download, the judge, the question
writer): urllib3 retries broken connections, timeouts and 429/5xx answers with exponential backoff,
honouring ``Retry-After``."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import requests

RETRY_STATUS = (429, 500, 502, 503, 504)


def http_session(retries: int, backoff: float = 0.5, pool_maxsize: int = 10) -> requests.Session:
    """A ``requests.Session`` that retries up to ``retries`` times (``retries + 1`` attempts) on
    connection errors, timeouts and the statuses in ``RETRY_STATUS``, for every method (the judge
    POSTs). Waits: none before the first retry, then ``backoff * 2**(n - 1)`` before retry n
    (urllib3's schedule, at most 120 s each), or what a ``Retry-After`` header asks. When the
    retries run out on a status, the last reply is returned (not raised): callers check
    ``status_code`` and name the URL in their error."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    retry = Retry(total=max(0, retries), backoff_factor=backoff, status_forcelist=RETRY_STATUS,
                  allowed_methods=None, respect_retry_after_header=True, raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=pool_maxsize)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
