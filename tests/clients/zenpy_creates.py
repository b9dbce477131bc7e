"""Creates tickets through the proxy with the real Zendesk client library, zenpy, from several
threads at once, and prints what each create returned (one JSON line per ticket).

Usage: python3 zenpy_creates.py HOST:PORT COUNT
"""
import json
import os
import sys
import threading

os.environ["ZENPY_FORCE_SCHEME"] = "http"
from zenpy import Zenpy  # noqa: E402
from zenpy.lib.api_objects import Ticket  # noqa: E402

host, port = sys.argv[1].rsplit(":", 1)
count = int(sys.argv[2])
# zenpy builds https://{subdomain}.{domain}/api/v2; split the loopback address across the two.
first, rest = host.split(".", 1)
client = Zenpy(subdomain=first, domain=f"{rest}:{port}", email="agent@example.com",
               token="zenpy-test-token", timeout=60)
results = [None] * count


def create(i):
    got = client.tickets.create(Ticket(subject=f"zenpy-{i}", description="from zenpy"))
    ticket = getattr(got, "ticket", got)
    results[i] = {
        "type": type(got).__name__,
        "id": getattr(ticket, "id", None),
        "subject": getattr(ticket, "subject", None),
    }


threads = [threading.Thread(target=create, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for r in results:
    print(json.dumps(r))
