// The openai Node SDK streams a Responses answer from BASE_URL and prints what it saw
// as one JSON line: the event types in order, the text of the deltas, and any error.
// Used by tests/test_proxy_node_sdk.py; run: node responses_stream.mjs <base_url> <key> <model>
import OpenAI from "openai";

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 10_000 });
const seen = { types: [], text: null, error: null };
try {
  const stream = await client.responses.create({ model, input: "hi", stream: true });
  for await (const event of stream) {
    seen.types.push(event.type);
    if (event.type === "response.output_text.delta") seen.text = (seen.text ?? "") + event.delta;
    if (event.type === "error") seen.error = event.code;
  }
} catch (err) {
  seen.error = `${err.constructor.name}: ${err.message}`;
}
console.log(JSON.stringify(seen));
