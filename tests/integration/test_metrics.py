"""/metrics of the coordinator: Prometheus text that `promtool check metrics` accepts,
vLLM's decode metrics under the afd_ prefix, and values that match the traffic sent:
generation and prompt token counters, finish reasons (length, stop, abort), one
time-to-first-token observation per request, inter-token latencies."""
import json
import os
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Checks, LocalUp, post  # noqa: E402
from cluster import metric_value as value, scrape as metrics  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
model = os.path.join(MODELS, "tiny-bf16")
ck = Checks()


with LocalUp(model, 1, 2, 3) as c:
    # 3 whole requests of 6 tokens (length), one that stops on its first greedy token
    for p in ([5, 6, 7], [8, 9], [10, 11, 12, 13]):
        st, _ = post(c.url, "/v1/completions", {"prompt": p, "max_tokens": 6, "temperature": 0,
                                                "ignore_eos": True})
    st, first = post(c.url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1,
                                                "temperature": 0})
    stop_id = first["choices"][0]["token_ids"][0]
    st, _ = post(c.url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 6,
                                            "temperature": 0, "stop_token_ids": [stop_id]})
    # one streamed request the client leaves after two tokens
    body = {"prompt": [1, 2], "max_tokens": 500, "temperature": 0, "stream": True,
            "ignore_eos": True}
    r = urllib.request.urlopen(urllib.request.Request(c.url + "/v1/completions",
                                                      data=json.dumps(body).encode()), timeout=30)
    n = 0
    for raw in r:
        if raw.startswith(b"data: {"):
            n += 1
            if n == 2:
                break
    r.fp.raw._sock.close()
    r.close()
    time.sleep(1.5)  # the abort lands and a heartbeat carries the nodes' counters
    text = metrics(c.url)

path = os.path.join(os.environ.get("TEST_TMP", "/tmp"), "metrics.txt")
open(path, "w").write(text)
try:
    pc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                        text=True)
    ck.check("promtool check metrics accepts /metrics", pc.returncode == 0,
             (pc.stdout + pc.stderr).strip()[:300])
except FileNotFoundError:
    ck.check("promtool is installed (make deps installs Debian's prometheus)", False)
for name in ("afd_time_to_first_token_seconds_count", "afd_inter_token_latency_seconds_count",
             "afd_e2e_request_latency_seconds_count", "afd_request_queue_time_seconds_count",
             "afd_num_requests_running", "afd_num_requests_waiting", "afd_kv_cache_usage_perc",
             "afd_prompt_tokens_total", "afd_generation_tokens_total", "afd_build_info",
             "afd_stage_busy_seconds_total", "afd_data_plane_bytes_total",
             "afd_peer_latency_seconds_count", "afd_micro_batches"):
    ck.check(f"{name} is exported", value(text, name) is not None)
gen = value(text, "afd_generation_tokens_total")
ck.check("generation tokens count every token sent (3 x 6 + 1 + 1 + at least 2)",
         gen is not None and gen >= 22, f"{gen}")
ck.check("prompt tokens count every admitted prompt (3 + 2 + 4 + 3 + 3 + 2 = 17)",
         value(text, "afd_prompt_tokens_total") == 17)
ck.check("finish reasons: 3 length + 1 length (max_tokens 1), 1 stop, 1 abort",
         value(text, "afd_request_success_total", finished_reason="length") == 4 and
         value(text, "afd_request_success_total", finished_reason="stop") == 1 and
         value(text, "afd_request_success_total", finished_reason="abort") == 1,
         " ".join(l for l in text.splitlines() if l.startswith("afd_request_success_total")))
ck.check("one time-to-first-token observation per request (6)",
         value(text, "afd_time_to_first_token_seconds_count") == 6)
ck.check("nothing left running and no KV blocks held after the abort",
         value(text, "afd_num_requests_running") == 0 and
         value(text, "afd_kv_cache_usage_perc") == 0)
sys.exit(ck.done())
