"""The demo's client: a text chat (the model's tokenizer and chat template), a few
completions through the OpenAI-compatible API, one streamed, and a short decode-throughput
figure."""
import json
import sys
import threading
import time
import urllib.error
import urllib.request

url = sys.argv[1]


def post(body, stream=False, path="/v1/completions"):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


print("== text chat (chat template -> tokens -> cluster -> streaming detokenizer -> text)")
chat = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Tell me about the sea, in one line."}],
        "max_tokens": 24, "temperature": 0, "stop": ["\n\n"]}
try:
    with post(chat, path="/v1/chat/completions") as r:
        body = json.load(r)
    ch = body["choices"][0]
    print(f"  user: {chat['messages'][1]['content']}")
    print(f"  assistant: {ch['message']['content']!r} ({ch['finish_reason']}; random weights, "
          f"so the words are noise, but they are text)")
    print(f"  usage {body['usage']}")
    print("  streamed:", end=" ", flush=True)
    with post(dict(chat, stream=True), path="/v1/chat/completions") as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line[6:] != "[DONE]":
                print(repr(json.loads(line[6:])["choices"][0]["delta"].get("content", "")),
                      end=" ", flush=True)
    print()
except urllib.error.HTTPError as e:
    print(f"  (no text chat: {json.loads(e.read())['error']['message']})")


print("== completion (greedy, token ids in, token ids out)")
with post({"prompt": [1, 2, 3, 4], "max_tokens": 12, "temperature": 0, "logprobs": 1}) as r:
    body = json.load(r)
ch = body["choices"][0]
print(f"  prompt [1, 2, 3, 4] -> {ch['token_ids']} ({ch['finish_reason']})")
print(f"  logprobs {[round(x, 3) for x in ch['logprobs']['token_logprobs']]}")
print(f"  usage {body['usage']}")

print("== two prompts in one request, sampled (temperature 0.8, top_p 0.9, seed 7)")
with post({"prompt": [[17, 42], [5, 6, 7]], "max_tokens": 8, "temperature": 0.8,
           "top_p": 0.9, "seed": 7}) as r:
    for c in json.load(r)["choices"]:
        print(f"  choice {c['index']}: {c['token_ids']}")

print("== streamed (Server-Sent Events)")
with post({"prompt": [9, 9, 9], "max_tokens": 8, "temperature": 0, "stream": True}) as r:
    for raw in r:
        line = raw.decode().strip()
        if line.startswith("data: "):
            p = line[6:]
            print("  data:", p if p == "[DONE]" else
                  f"token_ids={json.loads(p)['choices'][0]['token_ids']} "
                  f"finish={json.loads(p)['choices'][0]['finish_reason']}")

B, N = 16, 32
print(f"== decode throughput: {B} concurrent requests x {N} tokens")
done = []


def one(i):
    with post({"prompt": [i + 1, i + 2, i + 3], "max_tokens": N, "temperature": 0,
               "ignore_eos": True}) as r:
        done.append(len(json.load(r)["choices"][0]["token_ids"]))


t0 = time.time()
th = [threading.Thread(target=one, args=(i,)) for i in range(B)]
for t in th:
    t.start()
for t in th:
    t.join()
dt = time.time() - t0
print(f"  {sum(done)} tokens in {dt:.2f} s: {sum(done) / dt:.1f} tokens/s "
      f"(tiny model, CPU, all daemons on this machine)")
