// node greedy.mjs MODEL.gguf '[ids]' N -> one JSON line: {"tokens": [...], "probs": [...]}
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
const [modelPath, idsJson, n] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 256, threads: 1});
const tokens = [], probs = [];
for await (const out of context.getSequence().evaluateWithMetadata(JSON.parse(idsJson), {confidence: true}, {temperature: 0})) {
  tokens.push(out.token); probs.push(out.confidence);
  if (tokens.length >= Number(n)) break;
}
console.log(JSON.stringify({tokens, probs}));
await model.dispose(); await llama.dispose();
