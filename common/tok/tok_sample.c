/*
 * tok_sample: the bundled training text for the tokenizer afd_mkmodel writes: English
 * prose, code, digits and numbers, CJK, other scripts, combining marks, emoji and
 * whitespace runs. The benchmark builds its inputs from it too.
 */
#include "tok.h"

#include <string.h>

/* one source line per line of text (clang-format miscounts emoji sequences) */
// clang-format off
static const char sample[] =
    "The coordinator accepts requests over HTTP and hands each sequence to an attention node.\n"
    "Attention nodes keep the key and value cache for every active sequence; the feed-forward\n"
    "nodes hold the experts. A decode step moves the hidden states from attention to FFN and\n"
    "back again, so the two sides can be sized and scaled on their own.\n"
    "\n"
    "When the queue is full, the server answers 429 and asks the client to retry after one "
    "second.\n"
    "If a node stops answering, its sequences are finished with an error and the rest go on.\n"
    "Operators watch the metrics: tokens per second, time to first token, queue depth, and the\n"
    "share of time each node spends waiting for the other side.\n"
    "\n"
    "Here is a short story. Once upon a time, in a small town by the sea, there lived a baker\n"
    "named Clara. Every morning she woke up at four o'clock, lit the old oven, and kneaded the\n"
    "dough while the town was still asleep. People came from far away to taste her bread: \"It's\n"
    "the best I've ever had!\" they said. She smiled, wrapped another loaf, and didn't say much.\n"
    "She'd learned that good work speaks for itself, and that patience matters more than speed.\n"
    "\n"
    "Questions people often ask: What is a tokenizer? Why does it matter? How fast is it?\n"
    "A tokenizer turns text into numbers that a model can read, and numbers back into text.\n"
    "It doesn't understand meaning; it only knows which pieces of text appear together often.\n"
    "\n"
    "    def encode(self, text: str) -> list[int]:\n"
    "        ids = []\n"
    "        for word in self.split(text):\n"
    "            ids.extend(self.merge(word.encode(\"utf-8\")))\n"
    "        return ids\n"
    "\n"
    "    int main(int argc, char **argv)\n"
    "    {\n"
    "        if (argc < 2) {\n"
    "            fprintf(stderr, \"usage: %s FILE\\n\", argv[0]);\n"
    "            return 1;\n"
    "        }\n"
    "        for (int i = 1; i < argc; i++)\n"
    "            printf(\"%d: %s\\n\", i, argv[i]);\n"
    "        return 0;\n"
    "    }\n"
    "\n"
    "    const total = items.reduce((sum, x) => sum + x.price * x.count, 0);\n"
    "    console.log(`total: ${total.toFixed(2)} EUR`);\n"
    "    SELECT name, COUNT(*) AS n FROM orders WHERE created_at >= '2024-01-01' GROUP BY name;\n"
    "    $ make -j8 BUILD=build/release && ./build/bin/afd_run --model models/tiny --steps 16\n"
    "\n"
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 4096 65536 3.14159 2.71828 -17 +5\n"
    "1,000,000 people; 12.5% growth; version 1.2.3; call +1 (555) 010-9999; 2026-11-28 21:45:00.\n"
    "Prices: $19.99, €5.50, £3, ¥1200. Temperatures ranged from -3°C to 28°C in one week.\n"
    "The answer is 42. Pi is about 3.14159265358979. Powers of two: 2, 4, 8, 16, 32, 64, 128.\n"
    "\n"
    "中文：今天天气很好，我们去公园散步吧。人工智能正在改变世界，大语言模型可以回答问题、写代码、翻"
    "译文章。\n"
    "分布式推理系统把注意力计算和前馈网络分开部署，以提高吞吐量并降低延迟。\n"
    "日本語：こんにちは、世界。今日はいい天気ですね。カタカナとひらがなを使います。東京は大きな都市"
    "です。\n"
    "한국어: 안녕하세요. 만나서 반갑습니다. 오늘 날씨가 좋네요.\n"
    "Русский: Привет, мир! Как дела? Ελληνικά: Γειά σου κόσμε. العربية: مرحبا بالعالم.\n"
    "Français : déjà vu, naïve, café, crème brûlée, garçon, où est la bibliothèque ?\n"
    "Deutsch: Größe, Übermut, schön, Straße, Fußgängerüberweg, Äpfel und Öl.\n"
    "Español: ¿Dónde está el baño? ¡Qué sorpresa! mañana, niño, corazón.\n"
    "Tiếng Việt: Xin chào thế giới. Combining marks: é ä ñ (é ä ñ).\n"
    "\n"
    "Emoji: 😀 😂 🥲 👍 🎉 🚀 ❤️ 🔥 ✨ 🌍 🍕 🐍 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 🇯🇵 1️⃣ ✅ ❌ ⚠️\n"
    "Great work today 🎉 — the release is out 🚀! Thanks everyone 🙏 and have a nice weekend 😊.\n"
    "\n"
    "Whitespace runs:    four spaces,\t\ttwo tabs, a trailing space \n"
    "and blank lines follow.\n"
    "\n"
    "\n"
    "Symbols: @user #hashtag a+b=c (x, y) [1, 2] {\"key\": \"value\"} <tag/> a->b a=>b x<=y x!=y\n"
    "Punctuation!!! Really??? Yes... no -- maybe; \"quoted\" 'single' `code` «guillemets» "
    "“curly”.\n"
    "URLs: https://example.com/path?q=1&r=two#frag and mail@example.org are common in text.\n"
    "Paths: /usr/local/bin, C:\\Windows\\System32, ./build/bin/afd_coordinator --port 8080.\n"
    "\n"
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.\n"
    "Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump!\n"
    "In the beginning the model knew nothing; after training it could complete sentences,\n"
    "answer questions, summarize documents, and write programs in many languages.\n"
    "Good systems are simple, measured, and tested: they fail loudly and recover quietly.\n";
// clang-format on

const char *tok_sample_text(size_t *len)
{
    *len = sizeof(sample) - 1;
    return sample;
}

const char *const tok_deepseek_patterns[3] = {
    "\\p{N}{1,3}",
    "[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+",
    "[!\"#$%&'()*+,\\-./"
    ":;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};
