"""Text in, text out, on a real 1A1F cluster of a tiny checkpoint that afd_mkmodel writes
with its tokenizer (tokenizer.json trained over the bundled sample, tokenizer_config.json
with the Step3-style chat template).

- Token ids from the coordinator's tokenizer (POST /tokenize) equal those of an
  independent implementation of tokenizer.json (Tokenizers.js, tests/tokref) on the same
  file and varied text: ASCII, CJK, emoji and ZWJ sequences, combining marks, scripts the
  sample lacks, whitespace runs, digits, code, special tokens inside text. (Invalid UTF-8
  cannot travel in JSON; the unit test covers it on the C API.)
- Every text round-trips through /detokenize.
- A text chat answers text, and its stream's deltas add up to the same text; the answer
  equals the generated ids decoded by an independent decoder written here.
- Stop strings that span token boundaries cut the text before them (finish_reason
  "stop"; Anthropic's stop_reason "stop_sequence" naming it), whole and streamed.
- Unknown roles and malformed messages are 400s naming the field.
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from cluster import BIN, TMP, Checks, LocalUp, get, post, stream  # noqa: E402

ROOT = os.environ.get("ROOT", os.getcwd())
ck = Checks()
model = os.path.join(TMP, "tok-tiny")
r = subprocess.run([os.path.join(BIN, "afd_mkmodel"), "--out", model, "--preset", "tiny",
                    "--force"], capture_output=True, text=True)
ck.check("afd_mkmodel writes a tiny checkpoint with its tokenizer",
         r.returncode == 0 and os.path.exists(os.path.join(model, "tokenizer.json"))
         and os.path.exists(os.path.join(model, "tokenizer_config.json")), r.stderr[-300:])

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tnewlines\n\n\nand\r\nCRLF",
    "          ten spaces then text",
    "12345678901234567890 and 3.14159, 1,000,000, -42, 0x1F",
    "中文文本：今天天气很好，我们去公园散步吧。",
    "日本語のテキスト、カタカナとひらがな。東京タワー",
    "한국어 텍스트 안녕하세요",
    "emoji 😀🎉🚀 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 and keycap 1️⃣",
    "combining: e\u0301 a\u0308 n\u0303 o\u0302\u0323 and precomposed é ä ñ",
    "Ελληνικά, Русский текст, العربية, עברית, हिन्दी, ไทย",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "int main(void) { return printf(\"%d\\n\", 42) < 0; }",
    "<|BOT|>user\nHi there<|EOT|><|BOT|>assistant\n<think>\nhmm</think>",
    "partial specials: <|BO <|EO T|> <think <｜begin▁of",
    "<｜begin▁of▁sentence｜>text after bos<｜end▁of▁sentence｜>",
    "!!!??? ... --- ;;; @#$%^&*() []{}<> 'quotes' \"double\" `back`",
    "URL https://example.com/a/b?c=d&e=f#g and mail a.b@example.org",
    "mixed中文English混合123emoji😀end",
    "\u00a0non-breaking\u2003em space\u3000ideographic space",
    "x",
    " ",
    "\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]


def reference_ids(texts):
    """Token ids from Tokenizers.js on the same tokenizer.json."""
    node_dir = os.path.join(ROOT, "tests", "tokref")
    if not os.path.isdir(os.path.join(node_dir, "node_modules", "@huggingface", "tokenizers")):
        return None, "tests/tokref/node_modules missing: run scripts/deps.sh"
    p = subprocess.run(["node", os.path.join(node_dir, "tokref.mjs"),
                        os.path.join(model, "tokenizer.json"),
                        os.path.join(model, "tokenizer_config.json")],
                       input=json.dumps(texts), capture_output=True, text=True, cwd=node_dir,
                       timeout=120)
    if p.returncode != 0:
        return None, p.stderr[-400:]
    return [e["ids"] for e in json.loads(p.stdout)], ""


def bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def make_decoder():
    tj = json.load(open(os.path.join(model, "tokenizer.json"), encoding="utf-8"))
    inv = {i: t for t, i in tj["model"]["vocab"].items()}
    special = set()
    for a in tj["added_tokens"]:
        inv[a["id"]] = a["content"]
        if a["special"]:
            special.add(a["id"])
    c2b = bytes_to_unicode()

    def dec(ids, skip_special=True):
        out = b""
        for i in ids:
            if skip_special and i in special:
                continue
            t = inv[i]
            out += bytes(c2b[ch] for ch in t) if all(ch in c2b for ch in t) else t.encode()
        return out.decode("utf-8", errors="replace")
    return dec


def events(url, path, body):
    return [e for e in stream(url, path, body) if isinstance(e, dict)]


def chunks_text(chunks, key):
    return "".join(c["choices"][0][key].get("content", "") if key == "delta"
                   else c["choices"][0]["text"] for c in chunks if c.get("choices"))


with LocalUp(model, 1, 1, 2) as c:
    # 1. ids against the independent implementation
    ref, why = reference_ids(TEXTS)
    ck.check("the reference implementation ran", ref is not None, why)
    mism = []
    ours = []
    for i, t in enumerate(TEXTS):
        st, b = post(c.url, "/tokenize", {"prompt": t, "add_special_tokens": False})
        ids = b.get("tokens") if st == 200 else None
        ours.append(ids)
        if ref is not None and ids != ref[i]:
            mism.append(f"{t[:30]!r}: ours {ids} ref {ref[i]}")
    ck.check(f"/tokenize ids equal Tokenizers.js on {len(TEXTS)} varied texts",
             ref is not None and not mism, "; ".join(mism[:3]))
    ck.check("special tokens inside text are single ids, never split",
             ours[14] is not None and ours[14][0] == 3 and ours[14].count(4) == 1, str(ours[14]))
    st, b = post(c.url, "/tokenize", {"prompt": TEXTS[0]})
    ck.check("add_special_tokens (default) puts bos_token first",
             st == 200 and b["tokens"] == [0] + (ours[0] or []) and b["count"] == len(b["tokens"]),
             str(b))

    # 2. round trip
    bad = []
    for t, ids in zip(TEXTS, ours):
        st, b = post(c.url, "/detokenize", {"tokens": ids or []})
        if st != 200 or b.get("prompt") != t:
            bad.append(f"{t[:30]!r} -> {b}")
    ck.check("every text round-trips through /tokenize and /detokenize", not bad, "; ".join(bad[:3]))

    # 3. a text chat, whole and streamed
    dec = make_decoder()
    chat = {"model": "step3", "temperature": 0, "max_tokens": 16, "ignore_eos": True,
            "messages": [{"role": "system", "content": "You are brief."},
                         {"role": "user", "content": "Say something about 世界 🌍."}]}
    st, whole = post(c.url, "/v1/chat/completions", chat)
    msg = whole["choices"][0]["message"] if st == 200 else {}
    text, ids = msg.get("content"), msg.get("token_ids", [])
    ck.check("a text chat answers text", st == 200 and isinstance(text, str) and len(ids) == 16,
             str(whole))
    ck.check("the answer is its token ids decoded (independent decoder)", text == dec(ids),
             f"{text!r} vs {dec(ids)!r}")
    st, tp = post(c.url, "/tokenize", {"messages": chat["messages"]})
    want = ("<｜begin▁of▁sentence｜>You are brief.<|BOT|>user\nSay something about 世界 🌍."
            "<|EOT|><|BOT|>assistant\n<think>\n")
    st2, b2 = post(c.url, "/tokenize", {"prompt": want, "add_special_tokens": False})
    ck.check("the chat template renders Step3's format (system, user, generation prompt)",
             st == 200 and st2 == 200 and tp["tokens"] == b2["tokens"]
             and whole["usage"]["prompt_tokens"] == tp["count"], f"{tp} vs {b2}")
    chunks = events(c.url, "/v1/chat/completions", dict(chat, stream=True))
    got = chunks_text(chunks, "delta")
    sids = [i for ch in chunks if ch.get("choices") for i in ch["choices"][0]["delta"].get(
        "token_ids", [])]
    ck.check("streamed deltas add up to the same text and ids", got == text and sids == ids,
             f"{got!r} vs {text!r}")

    # 4. stop strings across token boundaries
    cut = len(dec(ids[:3]))
    stop = text[cut - 1:cut + 1] if 1 <= cut < len(text) else None
    if stop and len(stop.encode()) >= 2:
        expect = text[:text.find(stop)]
        st, b = post(c.url, "/v1/chat/completions", dict(chat, stop=[stop, "never-appears"]))
        ch = b["choices"][0] if st == 200 else {}
        ck.check(f"a stop string spanning tokens ({stop!r}) cuts the text before it",
                 st == 200 and ch["message"]["content"] == expect and ch["finish_reason"] == "stop",
                 f"{b} want {expect!r}")
        chunks = events(c.url, "/v1/chat/completions", dict(chat, stop=stop, stream=True))
        fins = [ch["choices"][0]["finish_reason"] for ch in chunks if ch.get("choices")]
        ck.check("streamed: the same cut text, finish_reason stop",
                 chunks_text(chunks, "delta") == expect and fins[-1] == "stop",
                 f"{chunks_text(chunks, 'delta')!r} vs {expect!r}")
        comp = {"model": "step3", "prompt": "Once upon a time", "temperature": 0,
                "max_tokens": 16, "ignore_eos": True}
        st, b = post(c.url, "/v1/completions", comp)
        ctext = b["choices"][0]["text"] if st == 200 else ""
        ccut = len(dec(b["choices"][0]["token_ids"][:2])) if st == 200 else 0
        cstop = ctext[ccut - 1:ccut + 1] if 1 <= ccut < len(ctext) else "\n"
        st, b2 = post(c.url, "/v1/completions", dict(comp, stop=cstop))
        ck.check("completions: text prompt, stop string cut, finish_reason stop",
                 st == 200 and b2["choices"][0]["text"] == ctext[:ctext.find(cstop)]
                 and b2["choices"][0]["finish_reason"] == "stop", f"{b2} vs {ctext!r}")
        two = dict(comp, prompt=[comp["prompt"], "Hello"])
        st, full = post(c.url, "/v1/completions", two)
        st2, cut2 = post(c.url, "/v1/completions", dict(two, stop=[cstop]))
        want2 = [(t[:t.find(cstop)], "stop") if cstop in t else (t, "length")
                 for t in (ch["text"] for ch in full.get("choices", []))]
        got2 = [(ch["text"], ch["finish_reason"]) for ch in cut2.get("choices", [])]
        ck.check("two prompts, one stop string: each choice cut (or not) on its own",
                 st == 200 and st2 == 200 and got2 == want2 and len(got2) == 2,
                 f"{got2} vs {want2}")
        # a choice cut by its stop string stops generating at once, while the other runs on
        # to max_tokens: the coordinator counts the tokens the nodes generated
        long = dict(two, max_tokens=96)
        st, lfull = post(c.url, "/v1/completions", long)
        texts = [ch["text"] for ch in lfull.get("choices", [])] if st == 200 else ["", ""]
        ids0 = lfull["choices"][0]["token_ids"] if st == 200 else []
        lstop = None
        for k in range(1, 8):  # a stop string early in choice 0's text, absent from choice 1's
            cut0 = len(dec(ids0[:k]))
            cand = texts[0][max(0, cut0 - 2):cut0 + 1]
            if len(cand) >= 2 and cand not in texts[1] and texts[0].find(cand) >= 0:
                lstop = cand
                break
        if lstop is None:
            ck.check("a stop string early in one choice and absent from the other", False,
                     repr(texts))
        else:
            before = get(c.admin, "/admin/status")[1]["cluster"]["tokens_generated"]
            st, b3 = post(c.url, "/v1/completions", dict(long, stop=[lstop]))
            after = get(c.admin, "/admin/status")[1]["cluster"]["tokens_generated"]
            chs = b3.get("choices", []) if st == 200 else []
            fins = [ch["finish_reason"] for ch in chs]
            n0 = next((k for k in range(1, len(ids0) + 1)
                       if lstop in dec(ids0[:k])), len(ids0))
            # choice 1 makes 96 tokens; choice 0 the tokens up to its stop string, plus those
            # of the steps already planned when it was cut (a few)
            ck.check(f"a choice cut by a stop string ({lstop!r}) stops generating at once: "
                     f"{after - before} tokens for {n0} + 96",
                     fins == ["stop", "length"] and n0 + 96 <= after - before <= n0 + 96 + 8,
                     str(fins))
        anth = {"model": "step3", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "system": "You are brief.",
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "Say something about 世界 🌍."}]}]}
        st, b = post(c.url, "/v1/messages", dict(anth, stop_sequences=[stop]))
        ck.check("messages: stop_sequences -> stop_reason stop_sequence naming it",
                 st == 200 and b["content"][0]["text"] == expect
                 and b["stop_reason"] == "stop_sequence" and b["stop_sequence"] == stop, str(b))
        evs = events(c.url, "/v1/messages", dict(anth, stop_sequences=[stop], stream=True))
        atext = "".join(e["delta"]["text"] for e in evs if e.get("type") == "content_block_delta")
        md = [e for e in evs if e.get("type") == "message_delta"]
        ck.check("messages stream: the cut text, then stop_reason stop_sequence naming it",
                 atext == expect and len(md) == 1
                 and md[0]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
                 and evs[-1].get("type") == "message_stop", f"{atext!r} {md}")
    else:
        ck.check("the greedy answer has a token boundary to put a stop string on", False,
                 repr(text))
    comp = {"model": "step3", "prompt": "Once upon a time", "temperature": 0,
            "max_tokens": 8, "ignore_eos": True}
    st, b = post(c.url, "/v1/completions", comp)
    r = subprocess.run([os.path.join(BIN, "afd_run"), "--model", model, "--prompt-text",
                        comp["prompt"], "--max-tokens", "8", "--ignore-eos", "--threads", "1",
                        "--json"], capture_output=True, text=True)
    ref = json.loads(r.stdout)["outputs"][0] if r.returncode == 0 else {}
    ck.check("afd_run --prompt-text gives the cluster's ids and text (monolithic reference)",
             st == 200 and ref.get("token_ids") == b["choices"][0]["token_ids"]
             and ref.get("text") == b["choices"][0]["text"], f"{ref} vs {b}")
    st, b = post(c.url, "/v1/completions", {"prompt": ["One", "Two"], "max_tokens": 2})
    ck.check("completions: a list of text prompts gives one choice each",
             st == 200 and len(b["choices"]) == 2, str(b))

    # 5. refusals
    def err(st, b, *words):
        e = b.get("error", {}) if isinstance(b, dict) else {}
        return st == 400 and all(w in e.get("message", "") for w in words)
    base = {"model": "step3", "max_tokens": 2}
    cases = [
        ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, ["robot"]),
        ("content of a wrong type", {"messages": [{"role": "user", "content": 5}]},
         ["messages[0].content"]),
        ("an image part", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}, ["image_url"]),
        ("a text part without text", {"messages": [{"role": "user", "content": [
            {"type": "text"}]}]}, ["text"]),
        ("text and ids mixed", {"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": [5, 6]}]}, ["mix"]),
        ("17 stop strings", {"messages": [{"role": "user", "content": "hi"}],
                             "stop": [str(i) for i in range(17)]}, ["stop"]),
        ("a stop string of 300 bytes", {"messages": [{"role": "user", "content": "hi"}],
                                        "stop": ["x" * 300]}, ["stop"]),
        ("an empty stop string", {"messages": [{"role": "user", "content": "hi"}],
                                  "stop": [""]}, ["stop"]),
        ("add_generation_prompt not a bool", {"messages": [{"role": "user", "content": "hi"}],
                                              "add_generation_prompt": "yes"},
         ["add_generation_prompt"]),
    ]
    for name, body, words in cases:
        st, b = post(c.url, "/v1/chat/completions", dict(base, **body))
        ck.check(f"chat: {name} -> 400", err(st, b, *words), str(b))
    st, b = post(c.url, "/detokenize", {"tokens": [1, 5000]})
    ck.check("/detokenize: an id beyond the vocabulary -> 400", err(st, b, "tokens"), str(b))
    st, b = post(c.url, "/tokenize", {"prompt": 5})
    ck.check("/tokenize: no text -> 400", err(st, b, "prompt"), str(b))
    st, b = post(c.url, "/v1/completions", {"prompt": "", "max_tokens": 2,
                                            "add_special_tokens": False})
    ck.check("completions: an empty text prompt -> 400", err(st, b, "prompt"), str(b))
    ck.check("cluster stops cleanly", c.stop() == 0)
sys.exit(ck.done())
