// node bench.mjs MODEL.gguf THREADS  -- benchmarks/decode.py's llama.cpp side, one process per (model, threads).
// Reads JSON lines {"ids": [...], "n": N} on stdin; for each, greedy-decodes N tokens after ids in a fresh
// sequence and prints one JSON line {"tokens": [...], "prefill_s": s, "decode_s": s}: prefill_s is the
// time to the first generated token (the prompt's forward), decode_s the time of the N - 1 steps after it.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
import readline from "node:readline";
const [modelPath, threads] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: 0});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 1024, batchSize: 1024, threads: Number(threads)});
console.log(JSON.stringify({ready: true, threads: context.currentThreads}));
for await (const line of readline.createInterface({input: process.stdin})) {
  if (!line.trim()) continue;
  const {ids, n} = JSON.parse(line);
  const sequence = context.getSequence();
  const tokens = [];
  const t0 = process.hrtime.bigint();
  let t1 = t0;
  for await (const token of sequence.evaluate(ids, {temperature: 0})) {
    tokens.push(token);
    if (tokens.length === 1) t1 = process.hrtime.bigint();
    if (tokens.length >= n) break;
  }
  const t2 = process.hrtime.bigint();
  sequence.dispose();
  console.log(JSON.stringify({tokens, prefill_s: Number(t1 - t0) / 1e9, decode_s: Number(t2 - t1) / 1e9}));
}
await model.dispose(); await llama.dispose();
