// Independent reference for the C tokenizer: encodes texts with Tokenizers.js (a separate
// implementation of Hugging Face's tokenizer.json) and prints the token ids.
// usage: node tokref.mjs TOKENIZER_JSON TOKENIZER_CONFIG_JSON < texts.json > ids.json
// texts.json is a JSON list of strings; the answer is a JSON list of
// {"ids": [...], "decoded": "..."} in the same order (no post-processor specials added).
import { readFileSync } from "node:fs";
import { Tokenizer } from "@huggingface/tokenizers";

const [tokPath, cfgPath] = process.argv.slice(2);
if (!tokPath) {
  console.error("usage: node tokref.mjs TOKENIZER_JSON [TOKENIZER_CONFIG_JSON] < texts.json");
  process.exit(2);
}
const tokJson = JSON.parse(readFileSync(tokPath, "utf8"));
const cfgJson = cfgPath ? JSON.parse(readFileSync(cfgPath, "utf8")) : {};
const tok = new Tokenizer(tokJson, cfgJson);
const texts = JSON.parse(readFileSync(0, "utf8"));
const out = texts.map((t) => {
  const ids = tok.encode(t, { add_special_tokens: false }).ids.map(Number);
  return { ids, decoded: tok.decode(ids, { skip_special_tokens: false }) };
});
process.stdout.write(JSON.stringify(out));
