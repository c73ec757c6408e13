"""Soak: hundreds of concurrent clients on a 1A2F cluster for a bounded time, some of them
streaming, some waiting for whole answers, some hanging up mid-stream, some sending
garbage. Every request must end in a complete answer or an explicit error (an HTTP error
with an error body, or an error event before [DONE]); none may be lost (a connection that
ends without either, or a timeout). Afterwards nothing runs, no KV block is held, and the
daemons' memory is about where it was after the warm-up.

Environment: SOAK_CLIENTS (default 200), SOAK_SECONDS (default 20).
"""
import http.client
import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Checks, LocalUp, get, post  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "200"))
SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
ck = Checks()
outcomes = Counter()
lost = []
lock = threading.Lock()


def note(kind, detail=None):
    with lock:
        outcomes[kind] += 1
        if kind.startswith("LOST"):
            lost.append(detail)


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def daemons(root_pid):
    """pid -> name of every process under the afdctl local-up process"""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/comm") as f:
                kids[int(d)] = (int(parts[1]), f.read().strip())
        except (OSError, IndexError, ValueError):
            continue
    out, stack = {}, [root_pid]
    while stack:
        p = stack.pop()
        for pid, (ppid, name) in kids.items():
            if ppid == p and pid not in out:
                out[pid] = name
                stack.append(pid)
    return out


def one_request(host, port, rng, cid):
    kind = rng.random()
    body = {"prompt": [rng.randrange(2, 1000) for _ in range(rng.randrange(1, 24))],
            "max_tokens": rng.randrange(1, 40), "temperature": rng.choice([0, 0.8]),
            "seed": cid}
    if kind < 0.08:  # garbage: a malformed body, or bytes that are not HTTP at all
        if rng.random() < 0.5:
            c = http.client.HTTPConnection(host, port, timeout=60)
            try:
                bad = rng.choice([b"{", b'{"prompt": "x"', b'{"prompt": [1], "max_tokens": -5}',
                                  b"[]", bytes(rng.randrange(256) for _ in range(64))])
                c.request("POST", "/v1/completions", body=bad,
                          headers={"Content-Type": "application/json"})
                r = c.getresponse()
                data = r.read()
                err = json.loads(data).get("error") if data[:1] == b"{" else None
                if 400 <= r.status < 500 and err:
                    note("error: malformed request (4xx)")
                else:
                    note("LOST: garbage answered without a 4xx error", (r.status, data[:80]))
            finally:
                c.close()
        else:
            s = socket.create_connection((host, port), timeout=60)
            try:
                s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) +
                          b"\r\n\r\n")
                s.recv(4096)  # a 400 or the connection closed: either is explicit
                note("error: not HTTP (answered or closed)")
            except OSError:
                note("error: not HTTP (answered or closed)")
            finally:
                s.close()
        return
    stream = kind < 0.85
    body["stream"] = stream
    c = http.client.HTTPConnection(host, port, timeout=60)
    try:
        c.request("POST", "/v1/completions", body=json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            data = r.read()
            try:
                msg = json.loads(data)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                note("LOST: HTTP error without an error body", (r.status, data[:80]))
                return
            note(f"error: HTTP {r.status}" + (" (busy)" if r.status in (429, 503) else ""))
            return
        if not stream:
            d = json.loads(r.read())
            n = len(d["choices"][0]["token_ids"])
            if n == body["max_tokens"] or d["choices"][0]["finish_reason"] == "stop":
                note("complete")
            else:
                note("LOST: whole answer short", (n, body["max_tokens"]))
            return
        hang_up = kind > 0.72  # some streaming clients go away mid-stream
        events, n = [], 0
        while True:
            line = r.readline()
            if not line:
                break
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            p = line[6:]
            events.append(p if p == "[DONE]" else json.loads(p))
            if p == "[DONE]":
                break
            n += 1
            if hang_up and n >= 2:
                c.sock.shutdown(socket.SHUT_RDWR)
                note("client hung up mid-stream")
                return
        errs = [e for e in events if isinstance(e, dict) and "error" in e]
        if events and events[-1] == "[DONE]":
            note("error: error event" if errs else "complete")
        elif hang_up:
            note("complete")  # it ended before the client meant to hang up
        else:
            note("LOST: stream ended without [DONE]", len(events))
    except (OSError, ValueError) as e:
        note("LOST: " + type(e).__name__, str(e)[:80])
    finally:
        c.close()


def client(host, port, cid, until):
    rng = random.Random(cid)
    while time.time() < until:
        one_request(host, port, rng, cid)


extra = []
if "san" in os.path.basename(os.environ.get("BUILD", "")):
    # under ASan freed memory waits in a quarantine (256 MB by default) before reuse, which
    # would read as growth: keep it small so the memory check still means something
    os.environ["ASAN_OPTIONS"] = ":".join(
        x for x in (os.environ.get("ASAN_OPTIONS", ""), "quarantine_size_mb=4",
                    "thread_local_quarantine_size_kb=64") if x)
with LocalUp(model, 1, 2, 2, extra=extra, timeout=120) as cl:
    host, port = "127.0.0.1", int(cl.url.rsplit(":", 1)[1])
    st, _ = post(cl.url, "/v1/completions", {"prompt": [1, 2], "max_tokens": 4})
    ck.check("the cluster serves before the soak", st == 200)
    procs = daemons(cl.proc.pid)
    # warm-up: one wave of the same mix, then the memory baseline
    until = time.time() + min(5.0, SECONDS / 4)
    th = [threading.Thread(target=client, args=(host, port, 10_000 + i, until))
          for i in range(CLIENTS)]
    for t in th:
        t.start()
    for t in th:
        t.join(120)
    base = {pid: rss_kb(pid) for pid in procs}
    outcomes.clear()
    t0 = time.time()
    until = t0 + SECONDS
    th = [threading.Thread(target=client, args=(host, port, i, until)) for i in range(CLIENTS)]
    for t in th:
        t.start()
    for t in th:
        t.join(SECONDS + 120)
    took = time.time() - t0
    total = sum(outcomes.values())
    print(f"# {CLIENTS} clients for {SECONDS:.0f} s ({took:.1f} s with the tail): {total} "
          f"requests")
    for k, v in sorted(outcomes.items()):
        print(f"#   {v:6d}  {k}")
    ck.check("no client thread is stuck", not any(t.is_alive() for t in th))
    ck.check("every request got a complete answer or an explicit error (0 lost)",
             not lost and total > CLIENTS, f"{len(lost)} lost: {lost[:3]}")
    ck.check("most requests completed", outcomes["complete"] > total // 2,
             f"{outcomes['complete']} of {total}")
    # afterwards: nothing running, no KV block held
    t0 = time.time()
    while time.time() - t0 < 30:
        st, s = get(cl.admin, "/admin/status")
        busy = [(n.get("running", 0), n.get("kv_blocks_reserved", 0), n.get("kv_blocks_used", 0))
                for n in s.get("nodes", []) if n.get("role") == "attention"]
        if st == 200 and s["requests"]["running"] == 0 and s["requests"]["waiting"] == 0 and \
                all(b == (0, 0, 0) for b in busy):
            break
        time.sleep(0.3)
    ck.check("afterwards nothing runs or waits and no KV block is reserved or used",
             st == 200 and s["requests"]["running"] == 0 and s["requests"]["waiting"] == 0 and
             all(b == (0, 0, 0) for b in busy), f"{s.get('requests')} {busy}")
    end = {pid: rss_kb(pid) for pid in procs}
    for pid, name in sorted(procs.items()):
        print(f"# {name:16s} RSS after warm-up {base[pid] / 1024:7.1f} MB, after the soak "
              f"{end[pid] / 1024:7.1f} MB")
    grew = {procs[p]: end[p] - base[p] for p in procs if end[p] - base[p] > 32 * 1024 and
            end[p] > 1.25 * base[p]}
    ck.check("memory stays flat: no daemon grew by more than 32 MB and 25%", not grew, str(grew))
    st, _ = post(cl.url, "/v1/completions", {"prompt": [1, 2], "max_tokens": 4})
    ck.check("the cluster still serves", st == 200)
sys.exit(ck.done())
