"""OpenAI /v1/chat/completions and Anthropic /v1/messages on a real 1A1F cluster.

The request bodies are the JSON the official OpenAI Python client and Anthropic Python
SDK send (written out literally), with token ids as content: the coordinator runs with
its tokenizer off (AFD_TOKENIZER=none), so this covers the token-id path and the
"needs a tokenizer" refusals (test_tokenizer.py covers text). Greedy answers must equal /v1/completions on the concatenated prompt (same ids,
log-probs within 1e-4), whole or streamed; the shapes are each API's own (chat.completion,
chat.completion.chunk SSE with role first, finish_reason last, usage when asked, [DONE];
Anthropic's message object and its named events); refused requests get 400 in each
API's error shape, naming the field.
"""
import json
import os
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
from cluster import Checks, LocalUp, get, post, stream  # noqa: E402

MODELS = os.environ.get("MODELS", "build/models")
os.environ["AFD_TOKENIZER"] = "none"  # the coordinator's --tokenizer, for the daemons started
model = os.path.join(MODELS, "tiny-bf16")
TOL = 1e-4
ck = Checks()


def text_of(ids):
    return "".join(f"token_id:{i}" for i in ids)


def events(url, path, body, timeout=60):
    """POST a streaming request; returns [(event name or None, decoded data)]."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "anthropic-version": "2023-06-01"})
    out, name = [], None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        ctype = r.headers.get("Content-Type", "")
        for raw in r:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
                name = None
    return ctype, out


def openai_error(status, body, want_status, *words):
    e = body.get("error") if isinstance(body, dict) else None
    return (status == want_status and isinstance(e, dict) and isinstance(e.get("message"), str)
            and e.get("type") == "invalid_request_error"
            and all(w in e["message"] for w in words))


def anthropic_error(status, body, want_status, *words):
    e = body.get("error") if isinstance(body, dict) else None
    return (status == want_status and body.get("type") == "error" and isinstance(e, dict)
            and e.get("type") == "invalid_request_error" and isinstance(e.get("message"), str)
            and all(w in e["message"] for w in words))


with LocalUp(model, 1, 1, 2) as c:
    url = c.url
    # the reference: /v1/completions on the concatenated prompt
    st, ref = post(url, "/v1/completions", {"prompt": [1, 2, 3, 4, 5], "max_tokens": 6,
                                            "temperature": 0, "logprobs": 2})
    ref_ch = ref["choices"][0]
    ref_ids, ref_fin = ref_ch["token_ids"], ref_ch["finish_reason"]
    ref_lp = ref_ch["logprobs"]["token_logprobs"]
    ref_top = [sorted(t.items(), key=lambda kv: -kv[1]) for t in ref_ch["logprobs"]["top_logprobs"]]
    ck.check("reference completion", st == 200 and len(ref_ids) >= 1, str(ref)[:200])
    anth_stop = "end_turn" if ref_fin == "stop" else "max_tokens"

    # ---- OpenAI chat, whole ----
    st, b = post(url, "/v1/chat/completions",
                 {"messages": [{"role": "system", "content": [1, 2]},
                               {"role": "user", "content": [3, 4, 5]}],
                  "model": "step3", "max_completion_tokens": 6, "temperature": 0,
                  "stream": False})
    ch = b.get("choices", [{}])[0] if st == 200 else {}
    msg = ch.get("message", {})
    ck.check("chat: greedy ids equal /v1/completions on the concatenated prompt",
             st == 200 and msg.get("token_ids") == ref_ids, str(b)[:300])
    ck.check("chat: chat.completion shape",
             st == 200 and b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-")
             and isinstance(b["created"], int) and b["model"] == "step3"
             and ch.get("index") == 0 and msg.get("role") == "assistant"
             and msg.get("content") == text_of(ref_ids) and ch.get("logprobs") is None
             and ch.get("finish_reason") == ref_fin
             and b.get("usage") == {"prompt_tokens": 5, "completion_tokens": len(ref_ids),
                                    "total_tokens": 5 + len(ref_ids)}, str(b)[:300])

    st, b = post(url, "/v1/chat/completions",
                 {"messages": [{"role": "system", "content": [1, 2]},
                               {"role": "user", "content": [3, 4, 5]}],
                  "model": "step3", "max_completion_tokens": 6, "temperature": 0,
                  "logprobs": True, "top_logprobs": 2})
    content = (b.get("choices", [{}])[0].get("logprobs") or {}).get("content") if st == 200 else None
    ok = (content is not None and len(content) == len(ref_ids)
          and [e["token"] for e in content] == [f"token_id:{i}" for i in ref_ids])
    worst = 0.0
    if ok:
        for e, lp, top in zip(content, ref_lp, ref_top):
            worst = max(worst, abs(e["logprob"] - lp))
            ok = ok and e["bytes"] is None and len(e["top_logprobs"]) == 2 and \
                [t["token"] for t in e["top_logprobs"]] == [k for k, _ in top]
            worst = max([worst] + [abs(t["logprob"] - v) for t, (_, v) in
                                   zip(e["top_logprobs"], top)])
    ck.check(f"chat: logprobs + top_logprobs=2 equal /v1/completions (max diff {worst:.1e})",
             ok and worst <= TOL, str(b)[:300])

    # multi-turn, developer role, max_tokens (legacy) and max_completion_tokens preferred
    st, b = post(url, "/v1/chat/completions",
                 {"messages": [{"role": "developer", "content": [1]},
                               {"role": "user", "content": [2, 3], "name": "alice"},
                               {"role": "assistant", "content": [4]},
                               {"role": "user", "content": [5]}],
                  "model": "step3", "max_tokens": 3, "temperature": 0})
    ck.check("chat: multi-turn prompt is the messages' ids in order; max_tokens honoured",
             st == 200 and b["choices"][0]["message"]["token_ids"] == ref_ids[:3], str(b)[:300])
    st, b = post(url, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": [1, 2, 3, 4, 5]}], "model": "step3",
                  "max_tokens": 2, "max_completion_tokens": 4, "temperature": 0})
    ck.check("chat: max_completion_tokens wins over max_tokens",
             st == 200 and b["choices"][0]["message"]["token_ids"] == ref_ids[:4], str(b)[:300])

    # harmless fields the official client may send are accepted
    st, b = post(url, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": [1, 2, 3, 4, 5]}], "model": "step3",
                  "max_completion_tokens": 2, "temperature": 0, "top_p": 1, "n": 1,
                  "user": "user-1234", "frequency_penalty": 0, "presence_penalty": 0,
                  "response_format": {"type": "text"}, "parallel_tool_calls": True,
                  "stop": None, "seed": 7, "logprobs": False, "metadata": {"k": "v"},
                  "store": False, "tool_choice": "none"})
    ck.check("chat: harmless optional fields are accepted",
             st == 200 and b["choices"][0]["message"]["token_ids"] == ref_ids[:2], str(b)[:300])

    # stop_token_ids: stop on the first greedy token
    st, b = post(url, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": [1, 2, 3, 4, 5]}], "model": "step3",
                  "max_completion_tokens": 6, "temperature": 0, "stop_token_ids": [ref_ids[0]]})
    ck.check("chat: stop_token_ids ends with finish_reason stop",
             st == 200 and b["choices"][0]["finish_reason"] == "stop"
             and b["choices"][0]["message"]["token_ids"] == ref_ids[:1], str(b)[:300])

    # ---- OpenAI chat, streamed ----
    evs = stream(url, "/v1/chat/completions",
                 {"messages": [{"role": "system", "content": [1, 2]},
                               {"role": "user", "content": [3, 4, 5]}],
                  "model": "step3", "max_completion_tokens": 6, "temperature": 0,
                  "stream": True, "stream_options": {"include_usage": True}})
    chunks = [e for e in evs if e != "[DONE]"]
    tok = [e for e in chunks if e.get("choices")]
    ids = [i for e in tok for i in e["choices"][0]["delta"].get("token_ids", [])]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in tok)
    ck.check("chat stream: chunks reassemble the same ids and text",
             ids == ref_ids and text == text_of(ref_ids), str(evs)[:300])
    ck.check("chat stream: chat.completion.chunk objects of one id",
             all(e["object"] == "chat.completion.chunk" and e["model"] == "step3"
                 and e["id"] == chunks[0]["id"] and e["id"].startswith("chatcmpl-")
                 for e in chunks), str(chunks[:1])[:300])
    ck.check("chat stream: role in the first chunk only",
             tok and tok[0]["choices"][0]["delta"].get("role") == "assistant"
             and all("role" not in e["choices"][0]["delta"] for e in tok[1:]), str(tok[:2])[:300])
    ck.check("chat stream: finish_reason on the last token chunk only",
             tok and tok[-1]["choices"][0]["finish_reason"] == ref_fin
             and all(e["choices"][0]["finish_reason"] is None for e in tok[:-1]), str(tok[-1:]))
    ck.check("chat stream: usage chunk (include_usage) then [DONE]",
             len(evs) >= 2 and evs[-1] == "[DONE]" and evs[-2].get("choices") == []
             and evs[-2].get("usage") == {"prompt_tokens": 5, "completion_tokens": len(ref_ids),
                                          "total_tokens": 5 + len(ref_ids)}, str(evs[-2:]))
    evs = stream(url, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": [1, 2, 3, 4, 5]}], "model": "step3",
                  "max_completion_tokens": 6, "temperature": 0, "stream": True,
                  "logprobs": True, "top_logprobs": 1})
    tok = [e for e in evs if e != "[DONE]"]
    lps = [e["choices"][0]["logprobs"]["content"][0] for e in tok if e.get("choices")]
    ck.check("chat stream: no usage chunk unless asked; per-token logprobs equal /v1/completions",
             evs[-1] == "[DONE]" and all(e.get("choices") for e in tok)
             and len(lps) == len(ref_ids)
             and all(abs(e["logprob"] - lp) <= TOL and len(e["top_logprobs"]) == 1
                     for e, lp in zip(lps, ref_lp)), str(evs[:2])[:300])

    # ---- Anthropic messages, whole ----
    st, b = post(url, "/v1/messages",
                 {"model": "step3", "max_tokens": 6,
                  "messages": [{"role": "user", "content": [3, 4, 5]}], "system": [1, 2],
                  "temperature": 0, "metadata": {"user_id": "u-1"}},
                 headers={"anthropic-version": "2023-06-01", "x-api-key": "k"})
    ck.check("messages: greedy ids equal /v1/completions on system + messages",
             st == 200 and b.get("token_ids") == ref_ids, str(b)[:300])
    ck.check("messages: Anthropic message shape",
             st == 200 and b["type"] == "message" and b["id"].startswith("msg_")
             and b["role"] == "assistant" and b["model"] == "step3"
             and b["content"] == [{"type": "text", "text": text_of(ref_ids)}]
             and b["stop_reason"] == anth_stop and b["stop_sequence"] is None
             and b["usage"] == {"input_tokens": 5, "output_tokens": len(ref_ids)}, str(b)[:300])
    st, b = post(url, "/v1/messages",
                 {"model": "step3", "max_tokens": 4, "temperature": 0,
                  "messages": [{"role": "user", "content": [1, 2, 3]},
                               {"role": "assistant", "content": [4]},
                               {"role": "user", "content": [5]}]})
    ck.check("messages: multi-turn without system",
             st == 200 and b["token_ids"] == ref_ids[:4] and b["stop_reason"] == "max_tokens"
             and b["usage"] == {"input_tokens": 5, "output_tokens": 4}, str(b)[:300])
    st, b = post(url, "/v1/messages",
                 {"model": "step3", "max_tokens": 6, "temperature": 0,
                  "messages": [{"role": "user", "content": [1, 2, 3, 4, 5]}],
                  "stop_token_ids": [ref_ids[0]]})
    ck.check("messages: a stop token ends with stop_reason end_turn",
             st == 200 and b["stop_reason"] == "end_turn" and b["token_ids"] == ref_ids[:1],
             str(b)[:300])

    # ---- Anthropic messages, streamed ----
    ctype, evs = events(url, "/v1/messages",
                        {"model": "step3", "max_tokens": 6,
                         "messages": [{"role": "user", "content": [3, 4, 5]}], "system": [1, 2],
                         "temperature": 0, "stream": True})
    names = [n for n, _ in evs]
    want = (["message_start", "content_block_start"] + ["content_block_delta"] * len(ref_ids)
            + ["content_block_stop", "message_delta", "message_stop"])
    ck.check("messages stream: event sequence, each data's type its event name",
             ctype.startswith("text/event-stream") and names == want
             and all(d.get("type") == n for n, d in evs), str(names))
    d = dict(evs[:2] + evs[-3:]) if names == want else {}
    m = d.get("message_start", {}).get("message", {})
    ck.check("messages stream: message_start and content_block_start",
             m.get("type") == "message" and m.get("role") == "assistant"
             and m.get("id", "").startswith("msg_") and m.get("content") == []
             and m.get("model") == "step3" and m.get("stop_reason") is None
             and m.get("usage", {}).get("input_tokens") == 5
             and d.get("content_block_start", {}).get("index") == 0
             and d.get("content_block_start", {}).get("content_block") == {"type": "text",
                                                                           "text": ""},
             str(evs[:2])[:300])
    deltas = [dd["delta"] for n, dd in evs if n == "content_block_delta"]
    ck.check("messages stream: text deltas reassemble the same ids",
             all(x["type"] == "text_delta" for x in deltas)
             and "".join(x["text"] for x in deltas) == text_of(ref_ids)
             and [i for x in deltas for i in x.get("token_ids", [])] == ref_ids, str(deltas)[:300])
    md = d.get("message_delta", {})
    ck.check("messages stream: message_delta carries stop_reason and output_tokens",
             md.get("delta") == {"stop_reason": anth_stop, "stop_sequence": None}
             and md.get("usage", {}).get("output_tokens") == len(ref_ids), str(md))

    # ---- refused requests ----
    def chat(body):
        return post(url, "/v1/chat/completions", body)

    def msgs(body):
        return post(url, "/v1/messages", body)

    st, b = chat({"messages": [{"role": "user", "content": "Hello!"}], "model": "step3"})
    ck.check("chat: text content -> 400 naming the tokenizer",
             openai_error(st, b, 400, "tokenizer", "messages[0].content"), str(b))
    st, b = chat({"messages": [{"role": "user",
                                "content": [{"type": "text", "text": "Hello!"}]}],
                  "model": "step3"})
    ck.check("chat: text content parts -> 400 naming the tokenizer",
             openai_error(st, b, 400, "tokenizer"), str(b))
    st, b = chat({"messages": [{"role": "system", "content": [1]}, {"role": "user", "content": [2]},
                               {"role": "robot", "content": [3]}], "model": "step3"})
    ck.check("chat: unknown role -> 400 naming messages[2].role",
             openai_error(st, b, 400, "messages[2].role"), str(b))
    st, b = chat({"messages": [{"role": "user", "content": [2]},
                               {"role": "tool", "content": [3], "tool_call_id": "call_1"}]})
    ck.check("chat: tool role -> 400 not supported",
             openai_error(st, b, 400, "messages[1].role", "not supported"), str(b))
    st, b = chat({"messages": [{"role": "user", "content": [1, 2]}], "model": "step3", "n": 2})
    ck.check("chat: n=2 -> 400", openai_error(st, b, 400, "n"), str(b))
    st, b = chat({"messages": [], "model": "step3"})
    ck.check("chat: empty messages -> 400", openai_error(st, b, 400, "messages"), str(b))
    st, b = chat({"messages": [{"role": "user"}], "model": "step3"})
    ck.check("chat: missing content -> 400 naming it",
             openai_error(st, b, 400, "messages[0].content"), str(b))
    st, b = chat({"messages": [[1, 2]], "model": "step3"})
    ck.check("chat: a message that is not an object -> 400",
             openai_error(st, b, 400, "messages[0]"), str(b))
    st, b = chat({"messages": [{"role": "user", "content": [1, 2]}], "model": "step3",
                  "tools": [{"type": "function",
                             "function": {"name": "get_weather", "description": "Weather",
                                          "parameters": {"type": "object", "properties": {}}}}],
                  "tool_choice": "auto"})
    ck.check("chat: tools -> 400 unsupported", openai_error(st, b, 400, "tool"), str(b))
    st, b = chat({"messages": [{"role": "user", "content": [1, 2]}], "model": "step3",
                  "stop": ["\n"]})
    ck.check("chat: stop strings -> 400 naming the tokenizer",
             openai_error(st, b, 400, "tokenizer"), str(b))
    st, b = chat({"messages": [{"role": "user", "content": [1, 5000]}], "model": "step3"})
    ck.check("chat: an id beyond the vocabulary -> 400", openai_error(st, b, 400, "content[1]"),
             str(b))
    st, b = chat({"messages": [{"role": "user", "content": [1] * 2500},
                               {"role": "user", "content": [2] * 2500}],
                  "max_completion_tokens": 4})
    ck.check("chat: prompt over the context -> 400", openai_error(st, b, 400, "context"), str(b))

    st, b = msgs({"model": "step3", "messages": [{"role": "user", "content": [3, 4, 5]}]})
    ck.check("messages: missing max_tokens -> 400 in Anthropic's error shape",
             anthropic_error(st, b, 400, "max_tokens"), str(b))
    st, b = msgs({"model": "step3", "max_tokens": 6,
                  "messages": [{"role": "user", "content": "Hello, Claude"}]})
    ck.check("messages: text content -> 400 naming the tokenizer (Anthropic shape)",
             anthropic_error(st, b, 400, "tokenizer"), str(b))
    st, b = msgs({"model": "step3", "max_tokens": 6, "system": "You are helpful.",
                  "messages": [{"role": "user", "content": [3]}]})
    ck.check("messages: text system -> 400 naming the tokenizer",
             anthropic_error(st, b, 400, "system", "tokenizer"), str(b))
    st, b = msgs({"model": "step3", "max_tokens": 6,
                  "messages": [{"role": "user", "content": [3]},
                               {"role": "system", "content": [4]}]})
    ck.check("messages: role system inside messages -> 400 naming messages[1].role",
             anthropic_error(st, b, 400, "messages[1].role"), str(b))
    st, b = msgs({"model": "step3", "max_tokens": 6, "messages": []})
    ck.check("messages: empty messages -> 400", anthropic_error(st, b, 400, "messages"), str(b))
    st, b = msgs({"model": "step3", "max_tokens": 6,
                  "messages": [{"role": "user", "content": [3]}], "stop_sequences": ["\n\nHuman:"]})
    ck.check("messages: stop_sequences -> 400", anthropic_error(st, b, 400, "stop_sequences"),
             str(b))
    st, b = msgs({"model": "step3", "max_tokens": 6,
                  "messages": [{"role": "user", "content": [3]}],
                  "tools": [{"name": "get_weather", "description": "Weather",
                             "input_schema": {"type": "object", "properties": {}}}]})
    ck.check("messages: tools -> 400", anthropic_error(st, b, 400, "tool"), str(b))
    st, b = msgs({"model": "step3", "max_tokens": 6, "temperature": 1.5,
                  "messages": [{"role": "user", "content": [3]}]})
    ck.check("messages: temperature out of range -> 400 in Anthropic's shape",
             anthropic_error(st, b, 400, "temperature"), str(b))
    st, b = msgs({"model": "step3", "max_tokens": 4000,
                  "messages": [{"role": "user", "content": [3] * 200}]})
    ck.check("messages: prompt + max_tokens over the context -> 400 in Anthropic's shape",
             anthropic_error(st, b, 400, "context"), str(b))

    st, b = get(url, "/health")
    ck.check("coordinator healthy after the refusals", st == 200, str(b))
    rc = c.stop()
    ck.check("cluster stops cleanly", rc == 0, f"rc {rc}")

sys.exit(ck.done())
