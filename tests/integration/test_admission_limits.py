"""An attention node's own limit on running sequences (--max-seqs) reaches the coordinator
in its hello: with the coordinator's --max-running far above it, the coordinator still
never places more sequences on the node than it takes; the rest wait in the queue and
every request completes (none fails with "too many running sequences").
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Checks, LocalUp, get, post  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
ck = Checks()
os.environ["AFD_MAX_SEQS"] = "3"  # read by the attention node (the coordinator has no such option)
with LocalUp(model, 1, 1, 2) as c:
    results, peak = [], [0]

    def one(i):
        results.append(post(c.url, "/v1/completions", {"prompt": [2 + i, 3, 4], "max_tokens": 24,
                                                       "temperature": 0, "ignore_eos": True}))

    th = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in th:
        t.start()
    while any(t.is_alive() for t in th):
        st, s = get(c.admin, "/admin/status")
        if st == 200:
            peak[0] = max([peak[0]] + [n.get("running", 0) for n in s["nodes"]
                                       if n["role"] == "attention"])
        time.sleep(0.01)
    for t in th:
        t.join()
    ok = [r for r in results if r[0] == 200 and len(r[1]["choices"][0]["token_ids"]) == 24]
    ck.check("12 concurrent requests on a node that runs 3 at a time: all complete",
             len(ok) == 12, str([r for r in results if r[0] != 200][:2])[:300])
    ck.check("the coordinator never placed more than 3 on it", 1 <= peak[0] <= 3,
             f"peak {peak[0]}")
sys.exit(ck.done())
