#!/usr/bin/env python3
"""Send a batch of HTTPS requests (the benchmark's fixtures) and check every status.

Usage: seed.py BASE_URL CAFILE [--threads N] < requests.jsonl

Each input line is a JSON object {"method", "path", "headers", "body", "expect"}; "body"
is sent as given (a string) and "expect" is the only accepted status. Requests are shared
among N threads, each on one kept-alive TLS connection verified against CAFILE (pass "-"
to skip verification, e.g. for a server whose certificate is not known). Exits 1 and
prints the first failures on any unexpected status or connection error.
"""

import argparse
import http.client
import json
import queue
import ssl
import sys
import threading
import urllib.parse


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("cafile")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()

    url = urllib.parse.urlsplit(args.base_url)
    if url.scheme != "https":
        print("seed.py: only https:// URLs", file=sys.stderr)
        return 2
    if args.cafile == "-":
        ctx = ssl._create_unverified_context()  # noqa: S323 (explicitly requested)
    else:
        ctx = ssl.create_default_context(cafile=args.cafile)
        # Let a server certificate itself be the trust anchor (as curl does), not only a CA.
        ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)

    work: "queue.Queue[dict]" = queue.Queue()
    total = 0
    for line in sys.stdin:
        line = line.strip()
        if line:
            work.put(json.loads(line))
            total += 1

    failures: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = None
        while True:
            try:
                req = work.get_nowait()
            except queue.Empty:
                break
            for attempt in (1, 2):  # one retry on a dropped keep-alive connection
                try:
                    if conn is None:
                        conn = http.client.HTTPSConnection(
                            url.hostname, url.port, context=ctx, timeout=args.timeout
                        )
                    body = req.get("body")
                    headers = dict(req.get("headers") or {})
                    if body is not None:
                        headers.setdefault("Content-Type", "application/json")
                    conn.request(req["method"], req["path"], body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.status != req.get("expect", 200):
                        with lock:
                            failures.append(
                                f"{req['method']} {req['path']} -> {resp.status}: {data[:300]!r}"
                            )
                    break
                except (OSError, http.client.HTTPException) as exc:
                    if conn is not None:
                        conn.close()
                    conn = None
                    if attempt == 2:
                        with lock:
                            failures.append(f"{req['method']} {req['path']} -> {exc!r}")
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.threads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    if failures:
        print(f"seed.py: {len(failures)} of {total} requests failed; first ones:", file=sys.stderr)
        for f in failures[:5]:
            print("  " + f, file=sys.stderr)
        return 1
    print(f"seed.py: {total} requests OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
