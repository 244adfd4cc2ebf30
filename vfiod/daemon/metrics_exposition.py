"""``/metrics`` answers joined from each family's text, formatted once per change
(docs/architecture.md §6; docs/benchmarks.md §2).

At 64 guests x 4 devices a scrape is about 1,300 samples (100 KB), and prometheus-client's
exposition formats each sample anew: 7 ms of the daemon's CPU alone (11 ms in the
OpenMetrics format Prometheus asks for), 15-30 ms under a ``status`` load, all of it
holding the GIL, so the ``status`` requests that arrive meanwhile wait. Between two
scrapes most families do not change: a guest's device states, its RAM, its protocol and
tracker change when the guest does. So every scrape still collects every family from
the registry (``VfiodCollector``: no value is older than the scrape), and each family is
compared with the one its kept text was formatted from: an equal family reuses that
text, a different one is formatted again by prometheus-client's own encoder (the family
alone) and kept instead. The answer is the texts joined and the format's trailer (``#
EOF`` for OpenMetrics), byte for byte what the encoder gives for the whole collection
(``tests/daemon/test_metrics_exposition.py``). Nothing is served stale: a change shows in
the very next scrape.

Equal is prometheus-client's ``Metric ==`` (name, help, type, unit, samples). Values that
are equal numbers print alike (``1``, ``1.0`` and ``True`` all as ``1.0``) except ``0.0``
and ``-0.0``: a value that went from one to the other keeps its earlier text, the same
number to Prometheus. The collector itself hands out the guest, device and migration
families of the previous scrape while the guests' rows equal that scrape's
(``VfiodCollector._per_guest_families``), and the comparison of a family with itself is
immediate.

Texts are kept per format (the answer's content type names it: the text format, or
OpenMetrics with a version and escaping, from the scraper's Accept header), for the
latest ``KEEP_FORMATS`` formats asked for. A scrape asking for some families only
(``name[]``), and every method but GET, is left to prometheus-client's own application.
Scrapes may run at once (the server has a thread per request): a kept pair (family, text)
is replaced whole, so a scrape compares with a pair that belongs together.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

Encoder = Callable[[Collector], bytes]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: formats whose texts are kept (a scraper asks for one; a client may send any version)
KEEP_FORMATS = 4


class _Families(Collector):
    """Hands the encoder a given list of families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class _KeptFormat:
    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.trailer = encoder(_Families([]))
        self.families: dict[str, tuple[Metric, bytes]] = {}


class FamilyTexts:
    """The exposition of ``collector`` in any format, each family formatted once per
    change."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self._formats: dict[str, _KeptFormat] = {}
        self._lock = threading.Lock()
        #: families formatted rather than reused (for tests and the README)
        self.formatted = 0

    def render(self, encoder: Encoder, content_type: str) -> bytes:
        """What ``encoder(registry of collector)`` gives; ``content_type`` names the
        format (``choose_encoder``'s answer for the scraper's Accept header)."""
        kept = self._format(encoder, content_type)
        pieces = [self._text(kept, family) for family in self.collector.collect()]
        pieces.append(kept.trailer)
        return b"".join(pieces)

    def _format(self, encoder: Encoder, content_type: str) -> _KeptFormat:
        with self._lock:
            kept = self._formats.pop(content_type, None)
            if kept is None:
                kept = _KeptFormat(encoder)
                if len(self._formats) >= KEEP_FORMATS:
                    del self._formats[next(iter(self._formats))]
            self._formats[content_type] = kept          # the latest asked for comes last
            return kept

    def _text(self, kept: _KeptFormat, family: Metric) -> bytes:
        pair = kept.families.get(family.name)
        if pair is not None and (pair[0] is family or pair[0] == family):
            return pair[1]
        text = kept.encoder(_Families([family]))
        body = text[:len(text) - len(kept.trailer)]
        kept.families[family.name] = (family, body)
        self.formatted += 1
        return body


def metrics_app(texts: FamilyTexts, fallback: WsgiApp) -> WsgiApp:
    """The WSGI application of ``/metrics``: a GET of everything from ``texts``, with the
    content type and gzip the scraper asked for; the rest to ``fallback``
    (prometheus-client's ``make_wsgi_app`` of the same collector)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if (environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico"
                or "name[]" in parse_qs(environ.get("QUERY_STRING", ""))):
            return fallback(environ, start_response)
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        output = texts.render(encoder, content_type)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            output = gzip.compress(output)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return app
