#!/usr/bin/env python3
"""Turn the raw per-run results of bench/server/run into a markdown report.

Usage: report.py RESULTS.tsv META.txt

RESULTS.tsv: one line per wrk run, tab-separated:
  target op conc rep requests duration_us rps p50_us p99_us errors bad_status socket_errors cpu_us
(errors = -1 when wrk itself failed; cpu_us = the target server's CPU time per request, user +
system, all its processes and threads; "-" when unknown). META.txt: "key<TAB>value" lines shown in the header
("note" lines are shown as bullets). Prints the report on stdout; exits 1 if any run had an
error (or did not produce a result), 0 otherwise.
"""

import statistics
import sys
from collections import defaultdict

LABELS = {
    ("strongroom", "put"): "Strongroom put (`PUT /v1/me/credentials/{name}`, user JWT)",
    ("strongroom", "reveal"): "Strongroom reveal (`POST /v1/owners/{o}/credentials/{n}/reveal`, service token)",
    ("openbao", "kv_write"): "OpenBao KV v2 write (`POST /v1/secret/data/users/{u}/{n}`)",
    ("openbao", "kv_read"): "OpenBao KV v2 read (`GET /v1/secret/data/users/{u}/{n}`)",
    ("openbao", "transit_decrypt"): "OpenBao Transit decrypt (`POST /v1/transit/decrypt/{key}`)",
    ("openbao", "kv_write_app"): "OpenBao KV v2 write, application token",
    ("openbao", "kv_read_app"): "OpenBao KV v2 read, application token",
    ("openbao", "transit_decrypt_app"): "OpenBao Transit decrypt, application token",
    ("nginx", "static"): "nginx static ~100-byte JSON (`GET /static.json`)",
}
ORDER = list(LABELS)


def fmt_rps(x):
    return "n/a" if x is None else f"{x:,.0f}"


def fmt_cpu(us):
    return "n/a" if us is None else f"{us:,.0f}"


def fmt_ms(us):
    return "n/a" if us is None else f"{us / 1000:.2f}"


def main() -> int:
    tsv, meta_path = sys.argv[1], sys.argv[2]
    runs = defaultdict(list)
    for line in open(tsv, encoding="utf-8"):
        f = line.rstrip("\n").split("\t")
        if len(f) < 12:
            continue
        key = (f[0], f[1], int(f[2]))
        runs[key].append(
            {
                "rep": int(f[3]),
                "rps": float(f[6]) if f[6] not in ("", "-") else None,
                "p50": float(f[7]) if f[7] not in ("", "-") else None,
                "p99": float(f[8]) if f[8] not in ("", "-") else None,
                "errors": int(f[9]),
                "bad": f[10],
                "cpu": float(f[12]) if len(f) > 12 and f[12] not in ("", "-") else None,
            }
        )
    meta, notes = [], []
    for line in open(meta_path, encoding="utf-8"):
        k, _, v = line.rstrip("\n").partition("\t")
        (notes.append(v) if k == "note" else meta.append((k, v)))

    def med(key, field):
        vals = [r[field] for r in runs.get(key, []) if r[field] is not None and r["errors"] == 0]
        if not vals:
            vals = [r[field] for r in runs.get(key, []) if r[field] is not None]
        return statistics.median(vals) if vals else None

    out = []
    out.append(
        "| target and operation | conns | req/s (median) | p50 ms | p99 ms | server CPU µs/req | errors | req/s per repeat |"
    )
    out.append("|---|--:|--:|--:|--:|--:|--:|---|")
    failed = False
    concs = sorted({k[2] for k in runs})
    for t_op in ORDER:
        for c in concs:
            key = (*t_op, c)
            if key not in runs:
                continue
            rs = sorted(runs[key], key=lambda r: r["rep"])
            errs = sum(max(r["errors"], 0) for r in rs)
            broken = [r for r in rs if r["errors"] != 0]
            failed = failed or bool(broken)
            err_txt = str(errs)
            if any(r["errors"] < 0 for r in rs):
                err_txt += " (wrk failed)"
            bads = sorted({r["bad"] for r in rs if r["bad"] not in ("", "-")})
            if bads:
                err_txt += " " + ",".join(bads)
            if broken:
                err_txt = f"**FAILED** {err_txt}"
            per = " / ".join(fmt_rps(r["rps"]) for r in rs)
            out.append(
                f"| {LABELS[t_op]} | {c} | {fmt_rps(med(key, 'rps'))} | {fmt_ms(med(key, 'p50'))}"
                f" | {fmt_ms(med(key, 'p99'))} | {fmt_cpu(med(key, 'cpu'))} | {err_txt} | {per} |"
            )

    def rps16(t, op):
        return med((t, op, 16), "rps")

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    def goal(r, need):
        if r is None:
            return "n/a"
        return "met" if r >= need else "**not met**"

    out.append("")
    out.append("Ratios of median throughput at 16 connections:")
    out.append("")
    out.append("| ratio (16 conns) | value | goal |")
    out.append("|---|--:|---|")
    rows = []
    for sfx, who in (("_app", "application token"), ("", "root token")):
        if ("openbao", "kv_write" + sfx, 16) not in runs and ("openbao", "kv_read" + sfx, 16) not in runs:
            continue
        rows += [
            (f"Strongroom put / OpenBao KV v2 write ({who})", ratio(rps16("strongroom", "put"), rps16("openbao", "kv_write" + sfx)), 10.0),
            (f"Strongroom reveal / OpenBao KV v2 read ({who})", ratio(rps16("strongroom", "reveal"), rps16("openbao", "kv_read" + sfx)), 5.0),
            (f"Strongroom reveal / OpenBao Transit decrypt ({who}, reference)", ratio(rps16("strongroom", "reveal"), rps16("openbao", "transit_decrypt" + sfx)), None),
        ]
    rows += [
        ("Strongroom reveal / nginx static", ratio(rps16("strongroom", "reveal"), rps16("nginx", "static")), 0.5),
        ("OpenBao KV v2 read (root token) / nginx static (reference)", ratio(rps16("openbao", "kv_read"), rps16("nginx", "static")), None),
        ("OpenBao KV v2 read, application / root token (reference)", ratio(rps16("openbao", "kv_read_app"), rps16("openbao", "kv_read")), None),
    ]
    for name, r, need in rows:
        val = "n/a" if r is None else (f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×")
        g = "—" if need is None else f"≥ {need:g}× ({goal(r, need)})"
        if need == 0.5:
            g = f"within 2× of nginx, i.e. ≥ 0.5× ({goal(r, need)})"
        out.append(f"| {name} | {val} | {g} |")
    cpu_reveal, cpu_nginx = med(("strongroom", "reveal", 16), "cpu"), med(("nginx", "static", 16), "cpu")
    if cpu_reveal and cpu_nginx:
        out.append(
            f"| server CPU per request, Strongroom reveal / nginx static (reference) | {cpu_reveal / cpu_nginx:.2f}× | — |"
        )
    for op in ("put", "reveal"):
        p99 = med(("strongroom", op, 16), "p99")
        if p99 is None:
            out.append(f"| Strongroom {op} p99 at 16 conns | n/a | < 5 ms (n/a) |")
        else:
            ok = "met" if p99 < 5000 else "**not met**"
            out.append(f"| Strongroom {op} p99 at 16 conns | {p99 / 1000:.2f} ms | < 5 ms ({ok}) |")
    out.append(f"| errors, all runs | {'some: FAILED' if failed else '0'} | 0 ({'**not met**' if failed else 'met'}) |")

    head = [f"- {k}: {v}" for k, v in meta] + [f"- {n}" for n in notes]
    print("\n".join(head + [""] + out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
