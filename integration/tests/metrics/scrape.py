"""Scrapes a tern node's metrics endpoint and parses it with Prometheus's own
Python parser (prometheus_client.parser), as a Prometheus server would read it.

    scrape.py http://127.0.0.1:9400/metrics

Prints one line per fact, for the Rust test to read without a JSON parser:

    status 200
    content_type text/plain; version=0.0.4; charset=utf-8
    family tern_requests counter
    sample tern_requests_total{code="OK",method="/tern.kv.v1.Kv/Put"} 12.0

Labels are sorted by name, their values JSON-quoted. Exits non-zero (with
the parser's error) if the text does not parse.
"""

import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main():
    url = sys.argv[1]
    with urllib.request.urlopen(url, timeout=20) as resp:
        status = resp.status
        content_type = resp.headers.get("Content-Type", "")
        text = resp.read().decode("utf-8")
    out = [f"status {status}", f"content_type {content_type}"]
    for family in text_string_to_metric_families(text):
        out.append(f"family {family.name} {family.type}")
        for s in family.samples:
            labels = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(s.labels.items()))
            out.append(f"sample {s.name}{{{labels}}} {float(s.value)!r}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
