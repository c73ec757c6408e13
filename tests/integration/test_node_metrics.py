"""Each node serves Prometheus /metrics (--metrics-port): promtool accepts it and the
counters follow the traffic (tokens computed, KV blocks, data-plane bytes, per-peer
latency), while the node's own loop never waits on a scrape."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from cluster import BIN, TMP, Checks, free_port, get, post  # noqa: E402
from cluster import metric_value as value, scrape as scrape_url  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
ck = Checks()
port, ctrl, admin_port, m_attn, m_ffn = (free_port() for _ in range(5))
url = f"http://127.0.0.1:{port}"
procs = {}


def start(name, argv):
    procs[name] = subprocess.Popen(argv, stdout=open(os.path.join(TMP, name + ".log"), "w"),
                                   stderr=subprocess.STDOUT)


def scrape(p):
    return scrape_url(f"http://127.0.0.1:{p}")


start("coordinator", [os.path.join(BIN, "afd_coordinator"), "--model", model, "--cluster-token",
                      "t", "--port", str(port), "--ctrl-port", str(ctrl), "--admin-port",
                      str(admin_port)])
time.sleep(0.3)
common = ["--model", model, "--coordinator", f"127.0.0.1:{ctrl}", "--cluster-token", "t",
          "--busy-poll-us", "0", "--heartbeat-ms", "200"]
start("ffn", [os.path.join(BIN, "ffn_node"), "--metrics-port", str(m_ffn)] + common)
start("attn", [os.path.join(BIN, "attn_node"), "--metrics-port", str(m_attn)] + common)
try:
    t0 = time.time()
    while time.time() - t0 < 30 and get(url, "/ready")[0] != 200:
        time.sleep(0.1)
    st, _ = post(url, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0})
    time.sleep(0.6)  # two heartbeats: the nodes publish their counters with each
    for name, p in (("attention", m_attn), ("ffn", m_ffn)):
        text = scrape(p)
        pc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                            text=True)
        ck.check(f"the {name} node's /metrics passes promtool check metrics",
                 pc.returncode == 0, (pc.stdout + pc.stderr)[:200])
        ck.check(f"the {name} node counted its tokens and data-plane bytes",
                 (value(text, "afd_node_tokens_total") or 0) >= 10 and
                 (value(text, "afd_node_data_plane_bytes_total", direction="a2f") or 0) > 0 and
                 (value(text, "afd_node_peer_latency_seconds_count") or 0) > 0,
                 text[:300])
        ck.check(f"the {name} node reports its data plane as staged (a host backend)",
                 value(text, "afd_node_data_plane_device") == 0, text[:300])
    text = scrape(m_attn)
    ck.check("the attention node reports its KV blocks",
             (value(text, "afd_node_kv_blocks", state="total") or 0) > 0 and
             value(text, "afd_node_kv_blocks", state="used") == 0)
    with urllib.request.urlopen(f"http://127.0.0.1:{m_ffn}/health", timeout=5) as r:
        ck.check("a node's /health answers", r.status == 200)
finally:
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
sys.exit(ck.done())
