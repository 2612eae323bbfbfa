#!/usr/bin/env python3
"""tern's RESP front through redis-py, run by integration/tests/resp_clients.rs.

One phase per call: python3 clients.py PHASE --port P [--slave-port S]
[--token T] [--n N]. Every check is an assert on data (replies, values,
counts); a failure exits non-zero with the traceback. On success the phase
prints one line "ok PHASE: ...".
"""

import argparse
import sys
import threading
import time

import redis
from redis.exceptions import (
    AuthenticationError,
    ExecAbortError,
    ReadOnlyError,
    ResponseError,
)

HOST = "127.0.0.1"
# redis-py 4 raises -WRONGPASS as a plain ResponseError, later versions as an
# AuthenticationError.
WRONGPASS = (ResponseError, AuthenticationError)


def binary_value(i):
    """Same bytes as binary_value in integration/tests/support/resp.rs."""
    return (
        bytes([i % 256, 0, 13, 10, ord("$"), ord("*"), 0xFF])
        + ("%d\r\n" % i).encode()
        + b"\x00end"
    )


def client(port, **kw):
    return redis.Redis(host=HOST, port=port, single_connection_client=True, **kw)


def expect_error(cls, fn, *words):
    """fn() must raise cls (or a subclass) whose message has every word."""
    try:
        got = fn()
    except cls as e:
        msg = str(e)
        for w in words:
            assert w in msg, "error %r lacks %r" % (msg, w)
        return msg
    raise AssertionError("expected %s%s, got the reply %r" % (cls.__name__, words, got))


def ok(x):
    """A +OK reply, as redis-py gives it with or without a callback."""
    return x is True or x == b"OK"


def as_int(x):
    return int(x.decode() if isinstance(x, bytes) else x)


def raw(r, *args):
    """One command on r's connection, its reply as RESP2 gives it (no
    redis-py reply callback)."""
    r.connection.send_command(*args)
    return r.connection.read_response()


def scan_all(r, match=None, count=None):
    """SCAN from cursor 0 to 0; every cursor must be an integer."""
    keys = []
    cursor = 0
    while True:
        cursor, batch = r.scan(cursor=cursor, match=match, count=count)
        assert isinstance(cursor, int), cursor
        keys.extend(batch)
        if cursor == 0:
            return keys


def phase_commands(a):
    r = client(a.port)
    p = "py:cmd:"
    assert r.ping() is True
    assert r.echo(b"a\x00b\r\nc") == b"a\x00b\r\nc"
    assert ok(r.execute_command("SELECT", 0))
    expect_error(ResponseError, lambda: r.execute_command("SELECT", 1), "DB index is out of range")
    hello = r.execute_command("HELLO", 2)
    fields = dict(zip(hello[0::2], hello[1::2]))
    assert as_int(fields[b"proto"]) == 2, hello
    assert fields[b"role"] == b"master", hello
    assert r.client_setname("tern-py") is True
    assert r.client_getname() == "tern-py"
    assert r.command_count() > 0
    msg = expect_error(ResponseError, lambda: r.execute_command("NOSUCHCMD", "x", "y"))
    assert msg.startswith("unknown command 'NOSUCHCMD', with args beginning with: 'x' 'y'"), msg

    # GET / SET with NX and XX; expiry options are refused and change nothing.
    assert r.get(p + "missing") is None
    assert r.set(p + "k", b"v1") is True
    assert r.get(p + "k") == b"v1"
    assert r.set(p + "k", b"v2", nx=True) is None
    assert r.set(p + "nx", b"n", nx=True) is True
    assert r.set(p + "k", b"v3", xx=True) is True
    assert r.set(p + "xx", b"x", xx=True) is None
    assert r.get(p + "xx") is None
    for kw in ({"ex": 10}, {"px": 10000}, {"exat": 4102444800}, {"pxat": 4102444800000}, {"keepttl": True}):
        expect_error(ResponseError, lambda: r.set(p + "k", b"ttl", **kw), "TTL")
    assert r.get(p + "k") == b"v3"
    assert r.get(p + "nx") == b"n"

    # DEL / EXISTS (EXISTS counts a key named twice twice, as Redis does).
    assert r.set(p + "d1", b"1") and r.set(p + "d2", b"2")
    assert r.exists(p + "d1", p + "d1", p + "d2", p + "missing") == 3
    assert r.delete(p + "d1", p + "d2", p + "missing") == 2
    assert r.exists(p + "d1", p + "d2") == 0
    assert r.delete(p + "d1") == 0

    # MSET / MGET.
    assert r.mset({p + "m1": b"a", p + "m2": b"", p + "m3": b"c"}) is True
    assert r.mget([p + "m1", p + "missing", p + "m2", p + "m3"]) == [b"a", None, b"", b"c"]
    expect_error(ResponseError, lambda: r.execute_command("MSET", p + "odd"), "wrong number of arguments")

    # Counters.
    assert r.incr(p + "n") == 1
    assert r.incrby(p + "n", 41) == 42
    assert r.decr(p + "n") == 41
    assert r.decrby(p + "n", 50) == -9
    assert r.get(p + "n") == b"-9"
    assert r.incrby(p + "n", -1) == -10
    assert r.decr(p + "newdecr") == -1
    expect_error(ResponseError, lambda: r.incr(p + "k"), "not an integer")
    assert r.set(p + "max", str(2**63 - 1)) is True
    expect_error(ResponseError, lambda: r.incr(p + "max"), "overflow")
    assert r.get(p + "max") == str(2**63 - 1).encode()
    assert r.get(p + "k") == b"v3"

    # APPEND / STRLEN.
    assert r.append(p + "ap", b"ab") == 2
    assert r.append(p + "ap", b"\x00cd") == 5
    assert r.get(p + "ap") == b"ab\x00cd"
    assert r.strlen(p + "ap") == 5
    assert r.strlen(p + "missing") == 0

    # DBSIZE agrees with SCAN and INFO keyspace.
    keys = scan_all(r, count=1000)
    assert len(keys) == len(set(keys))
    assert r.dbsize() == len(keys), (r.dbsize(), len(keys))
    info = r.info()
    assert info["db0"]["keys"] == len(keys), info.get("db0")

    # INFO and ROLE of a master with one connected slave.
    assert info["role"] == "master", info
    assert info["connected_slaves"] == 1, info
    s0 = info["slave0"]
    assert s0["ip"] == HOST and s0["state"] == "online", s0
    assert isinstance(s0["offset"], int) and isinstance(s0["lag"], int), s0
    assert isinstance(info["master_repl_offset"], int), info
    assert isinstance(info["sync_full"], int) and isinstance(info["sync_partial_ok"], int), info
    assert any(k.startswith("tern_") for k in info), sorted(info)
    for section in ("server", "replication", "stats", "keyspace"):
        assert r.info(section), section
    assert r.wait(1, 0) == 1
    assert r.info("replication")["master_repl_offset"] >= s0["offset"]
    role = r.execute_command("ROLE")
    assert role[0] == b"master", role
    assert as_int(role[1]) >= as_int(s0["offset"]), role
    assert len(role[2]) == 1, role
    ip, port, offset = role[2][0]
    assert ip == HOST.encode() and as_int(port) == as_int(s0["port"]) > 0, role
    assert as_int(offset) <= as_int(role[1]), role

    # Transactions: MULTI/EXEC is one transaction, DISCARD drops it, an error
    # while queueing aborts it, WATCH is refused.
    assert raw(r, "MULTI") == b"OK"
    assert raw(r, "SET", p + "t1", "x") == b"QUEUED"
    assert raw(r, "INCRBY", p + "t2", 5) == b"QUEUED"
    assert raw(r, "APPEND", p + "t1", "y") == b"QUEUED"
    assert raw(r, "GET", p + "t1") == b"QUEUED"
    assert raw(r, "EXEC") == [b"OK", 5, 2, b"xy"]
    assert raw(r, "MULTI") == b"OK"
    assert raw(r, "SET", p + "t1", "discarded") == b"QUEUED"
    assert raw(r, "DISCARD") == b"OK"
    assert r.get(p + "t1") == b"xy"
    assert raw(r, "MULTI") == b"OK"
    assert raw(r, "SET", p + "t1", "aborted") == b"QUEUED"
    expect_error(ResponseError, lambda: raw(r, "SET", p + "t1"), "wrong number of arguments for 'set' command")
    expect_error(ExecAbortError, lambda: raw(r, "EXEC"), "Transaction discarded")
    assert r.get(p + "t1") == b"xy"
    msg = expect_error(ResponseError, lambda: raw(r, "WATCH", p + "t1"))
    assert "support" in msg.lower(), msg
    tx = r.pipeline(transaction=True)
    tx.set(p + "t3", b"a").incr(p + "t4").get(p + "t3")
    assert tx.execute() == [True, 1, b"a"]

    # QUIT answers OK and closes the connection.
    assert raw(r, "QUIT") == b"OK"
    try:
        more = r.connection._sock.recv(1)
    except OSError:
        more = b""
    assert more == b"", "the connection stayed open after QUIT: %r" % more
    r.connection.disconnect()
    assert r.get(p + "k") == b"v3"
    print("ok commands: %d keys, INFO and ROLE of a master with slave0 at offset %d" % (len(keys), s0["offset"]))


def phase_slave(a):
    """Reads, INFO, ROLE and READONLY refusals on a slave."""
    r = client(a.port)
    p = "py:cmd:"
    assert r.get(p + "k") == b"v3"
    assert r.mget([p + "m1", p + "m3"]) == [b"a", b"c"]
    readonly = "You can't write against a read only replica."
    for fn in (
        lambda: r.set(p + "k", b"no"),
        lambda: r.delete(p + "k"),
        lambda: r.incr(p + "n"),
        lambda: r.incrby(p + "n", 2),
        lambda: r.decr(p + "n"),
        lambda: r.decrby(p + "n", 2),
        lambda: r.append(p + "k", b"no"),
        lambda: r.mset({p + "k": b"no"}),
    ):
        expect_error(ReadOnlyError, fn, readonly)
    assert r.get(p + "k") == b"v3"
    assert r.get(p + "n") == b"-10"
    info = r.info()
    assert info["role"] == "slave", info
    assert info["master_link_status"] == "up", info
    assert info["master_sync_in_progress"] == 0, info
    assert info["db0"]["keys"] == r.dbsize(), info
    role = r.execute_command("ROLE")
    assert role[0] == b"slave", role
    assert role[1] == HOST.encode(), role
    assert isinstance(role[2], int), role
    assert role[3] == b"connected", role
    assert isinstance(role[4], int), role
    print("ok slave: READONLY for 8 writes, role slave, link up, %d keys" % r.dbsize())


def phase_pipeline(a):
    r = client(a.port)
    p = "py:pipe:"
    n = a.n
    pipe = r.pipeline(transaction=False)
    want = []
    for i in range(n):
        pipe.set("%s%05d" % (p, i), binary_value(i))
        want.append(True)
        pipe.incr(p + "counter")
        want.append(i + 1)
        pipe.get("%s%05d" % (p, i))
        want.append(binary_value(i))
        if i == n // 2:
            pipe.incr("%s%05d" % (p, i))
            want.append("error")
    got = pipe.execute(raise_on_error=False)
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        if w == "error":
            assert isinstance(g, ResponseError) and "not an integer" in str(g), (i, g)
        else:
            assert g == w, (i, g, w)
    assert r.get(p + "counter") == str(n).encode()
    print("ok pipeline: %d commands in one pipeline, answers in order" % len(want))


def phase_atomicity(a):
    """Transactions of many INCRs, read concurrently on another connection.

    Each transaction adds 1 to each of KEYS keys and INCRs `sum` 10 times. A
    reader on its own connection GETs `sum` (always a multiple of 10) and the
    keys one after the other, alternately forwards and backwards: with
    all-or-nothing transactions every sequence read is non-decreasing.
    """
    p = "py:atom:"
    keys = [p + "k%02d" % i for i in range(10)]
    txns = a.n
    done = threading.Event()
    failures = []
    reads = [0]

    def reader():
        rr = client(a.port)
        forward = True
        last = True
        while last:
            last = not done.is_set()
            s = rr.get(p + "sum")
            s = int(s) if s is not None else 0
            if s % 10:
                failures.append("sum %d is not a multiple of 10" % s)
            order = keys if forward else keys[::-1]
            seq = [s // 10] + [int(rr.get(k) or 0) for k in order]
            if seq != sorted(seq):
                failures.append("non-monotonic read %s of %s" % (seq, ["sum/10"] + order))
            forward = not forward
            reads[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    w = client(a.port)
    try:
        for _ in range(txns):
            tx = w.pipeline(transaction=True)
            for k in keys:
                tx.incr(k)
            for _ in range(10):
                tx.incr(p + "sum")
            res = tx.execute()
            assert len(res) == 20, res
            v = res[0]
            assert res[:10] == [v] * 10, res
    finally:
        done.set()
        t.join()
    assert not failures, failures[:5]
    assert w.mget(keys) == [str(txns).encode()] * len(keys)
    assert w.get(p + "sum") == str(10 * txns).encode()
    print("ok atomicity: %d transactions of 20 INCRs, %d concurrent reads, none saw a part" % (txns, reads[0]))


def phase_binary(a):
    r = client(a.port)
    p = b"py:bin:"
    for i in range(a.n):
        k = p + bytes([0, 13, 10, i % 256]) + str(i).encode()
        assert r.set(k, binary_value(i)) is True
        assert r.get(k) == binary_value(i)
        assert r.strlen(k) == len(binary_value(i))
    big = bytes((i * 7919) % 256 for i in range(1 << 20))
    assert r.set(p + b"big", big) is True
    assert r.get(p + b"big") == big
    assert r.append(p + b"big", b"\r\n\x00") == len(big) + 3
    assert r.get(p + b"big") == big + b"\r\n\x00"
    pairs = {p + b"m\x00" + str(i).encode(): binary_value(i) for i in range(20)}
    assert r.mset(pairs) is True
    assert r.mget(list(pairs)) == list(pairs.values())
    assert r.set(p + b"empty", b"") is True
    assert r.get(p + b"empty") == b""
    assert r.exists(p + b"empty") == 1
    # For the gRPC check of the Rust test: resp:py:NNN = binary_value(i).
    half = a.n // 2
    assert r.mset({"resp:py:%03d" % i: binary_value(i) for i in range(half)}) is True
    for i in range(half, a.n):
        assert r.set("resp:py:%03d" % i, binary_value(i)) is True
    print("ok binary: %d binary keys and values, 1 MiB value, MSET/MGET, empty value" % a.n)


def phase_scan(a):
    r = client(a.port)
    p = "py:scan:"
    mine = {("%sa:%04d" % (p, i)).encode() for i in range(a.n)}
    others = {("%sb:%04d" % (p, i)).encode() for i in range(a.n // 2)}
    pipe = r.pipeline(transaction=False)
    for k in sorted(mine | others):
        pipe.set(k, b"1")
    assert all(x is True for x in pipe.execute())
    for count in (1, 7, 100, 10000):
        got = scan_all(r, match=p + "a:*", count=count)
        assert len(got) == len(set(got)), "COUNT %d: a key came twice" % count
        assert set(got) == mine, "COUNT %d: %d keys, wanted %d" % (count, len(got), len(mine))
    got = list(r.scan_iter(match=p + "*", count=13))
    assert sorted(got) == sorted(mine | others)
    # A cursor from one connection continues on another.
    cursor, first = r.scan(0, match=p + "a:*", count=10)
    assert cursor != 0
    r2 = client(a.port)
    seen = list(first)
    while cursor:
        cursor, batch = r2.scan(cursor, match=p + "a:*", count=50)
        seen.extend(batch)
    assert sorted(seen) == sorted(mine), (len(seen), len(mine))
    everything = scan_all(r, count=500)
    assert len(everything) == len(set(everything)) == r.dbsize()
    print("ok scan: %d matching keys exactly once at COUNT 1, 7, 100, 10000 and across connections" % len(mine))


def phase_grpc_readback(a):
    """grpc:NNN = binary_value(i) were Put through gRPC on the master: wait for
    them on the slave's RESP port (a slave has no read-your-writes over RESP)."""
    r = client(a.port)
    keys = ["grpc:%03d" % i for i in range(a.n)]
    want = [binary_value(i) for i in range(a.n)]
    deadline = time.time() + 60
    while True:
        got = r.mget(keys)
        if got == want:
            break
        assert all(g is None or g == w for g, w in zip(got, want)), "a wrong value: %r" % got
        assert time.time() < deadline, "the slave never showed every gRPC write: %r" % got
        time.sleep(0.1)
    print("ok grpc-readback: %d gRPC Puts read back through RESP on the slave" % a.n)


def phase_auth(a):
    t = a.token
    anon = client(a.port)
    for fn in (anon.ping, lambda: anon.get("k"), lambda: anon.set("k", "v"), anon.dbsize, anon.info):
        expect_error(AuthenticationError, fn, "Authentication required")
    expect_error(WRONGPASS, lambda: anon.execute_command("AUTH", "wrong"), "invalid username-password pair")
    expect_error(WRONGPASS, lambda: anon.execute_command("AUTH", "default", "wrong"), "invalid username-password pair")
    expect_error(AuthenticationError, lambda: anon.get("k"), "Authentication required")
    assert ok(anon.execute_command("AUTH", t))
    assert anon.ping() is True
    assert ok(anon.execute_command("AUTH", "default", t))
    expect_error(WRONGPASS, lambda: client(a.port, password="wrong").ping(), "invalid username-password pair")
    good = client(a.port, password=t)
    if a.writable:
        assert good.set("py:auth", b"ok") is True
        assert good.incr("py:auth:n") == 1
    else:
        expect_error(ReadOnlyError, lambda: good.set("py:auth", b"no"), "read only replica")
    named = client(a.port, username="default", password=t)
    assert named.ping() is True
    deadline = time.time() + 60
    while named.get("py:auth") != b"ok":
        assert time.time() < deadline, "py:auth never became visible"
        time.sleep(0.1)
    # HELLO with AUTH authenticates too.
    h = client(a.port)
    hello = h.execute_command("HELLO", 2, "AUTH", "default", t)
    assert dict(zip(hello[0::2], hello[1::2]))[b"proto"] == 2, hello
    assert h.get("py:auth") == b"ok"
    print("ok auth: NOAUTH before AUTH, WRONGPASS for a wrong token, AUTH/AUTH default/HELLO AUTH accepted")


def phase_proxy(a):
    """Through twemproxy: shard:py:NNNN = binary_value(i) (pipelined SETs and
    one MSET that the proxy splits per shard), 20 counters INCRBY'd, every
    value read back through the proxy (GET and MGET)."""
    r = client(a.port)
    pipe = r.pipeline(transaction=False)
    half = a.n // 2
    for i in range(half):
        pipe.set("shard:py:%04d" % i, binary_value(i))
        pipe.incrby("shard:py:ctr:%02d" % (i % 20), i)
    assert all(x is True or isinstance(x, int) for x in pipe.execute())
    assert r.mset({"shard:py:%04d" % i: binary_value(i) for i in range(half, a.n)}) is True
    check_proxy_reads(r, a.n)
    print("ok proxy: %d keys and 20 counters written and read back through twemproxy" % a.n)


def check_proxy_reads(r, n):
    keys = ["shard:py:%04d" % i for i in range(n)]
    assert r.mget(keys) == [binary_value(i) for i in range(n)]
    for i in range(0, n, 7):
        assert r.get(keys[i]) == binary_value(i)
    half = n // 2
    ctr = [sum(i for i in range(half) if i % 20 == c) for c in range(20)]
    assert r.mget(["shard:py:ctr:%02d" % c for c in range(20)]) == [str(v).encode() for v in ctr]


def phase_proxy_read(a):
    """What phase_proxy wrote, read through a pool of the slaves."""
    check_proxy_reads(client(a.port), a.n)
    print("ok proxy-read: %d keys and 20 counters read through the pool of slaves" % a.n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token", default="")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--writable", type=int, default=1)
    a = ap.parse_args()
    phases = {
        "commands": phase_commands,
        "slave": phase_slave,
        "pipeline": phase_pipeline,
        "atomicity": phase_atomicity,
        "binary": phase_binary,
        "scan": phase_scan,
        "grpc-readback": phase_grpc_readback,
        "auth": phase_auth,
        "proxy": phase_proxy,
        "proxy-read": phase_proxy_read,
    }
    phases[a.phase](a)


if __name__ == "__main__":
    sys.exit(main())
