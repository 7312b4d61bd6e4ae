// Runs GGUF files through a real llama.cpp (node-llama-cpp's prebuilt CPU build) for cairn's GGUF checks
// (tests/test_export_gguf.py, benchmarks/scripts/gguf_check.py).
//
//   node tests/run_llama_cpp.mjs < request.json > answer.json
//
// request: {"install": DIR holding node_modules/node-llama-cpp, "threads": N, "files": [one per GGUF file:
//   {"model": FILE.gguf, "kv": "F32" | "F16" (the KV cache's type; default F32),
//    "tokenize": [text, ...]                    -> "tokens": [[id, ...], ...] (no bos added)
//    "score": [[id, ...], ...], "scores": FILE  -> FILE: float32 log-probabilities of every vocabulary token
//                                                  after each position of each sequence, row after row
//    "greedy": [{"prompt": [id, ...], "n": N}]  -> "greedy": [[id, ...], ...] (end-of-text included)}]}
// answer: {"files": [{"vocab", "kv", "context", "tokens", "greedy", and the vocabulary's type, bos and eos
//                      as llama.cpp reads them}, ...]}
//
// node-llama-cpp gives no raw logits, but at temperature 0 it returns the softmax of the raw logits over
// the whole vocabulary (its greedy sampler changes no logit) in float32: log p is the log-softmax of
// llama.cpp's logits, which is how the checks compare them with cairn's. Flash attention is off: on CPUs
// llama.cpp's flash attention computes in f16 whatever the KV cache's type (log-probabilities 2e-3 off
// cairn's with an f32 cache, against 1e-5 without it).
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const req = JSON.parse(readFileSync(0, "utf8"));
const entry = join(req.install, "node_modules", "node-llama-cpp", "dist", "index.js");
const { getLlama } = await import(pathToFileURL(entry).href);
const tStart = Date.now();
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error" });

if (process.env.CAIRN_LLAMA_CPP_TIMES) process.stderr.write(`getLlama: ${Date.now() - tStart} ms\n`);

async function run(job) {
    const model = await llama.loadModel({ modelPath: job.model, gpuLayers: 0 });
    const nCtx = model.trainContextSize;
    const kv = job.kv ?? "F32";
    // one slot more than the model's context: node-llama-cpp shifts a full context (drops its first tokens)
    // before it evaluates the last token that fits, so a sequence of exactly nCtx tokens would lose its start
    const context = await model.createContext({
        contextSize: nCtx + 1, batchSize: nCtx, sequences: 1, threads: req.threads ?? 1, flashAttention: false,
        experimentalKvCacheKeyType: kv, experimentalKvCacheValueType: kv,
    });
    const sequence = context.getSequence();
    const t = model.tokens;
    const answer = {
        vocab: null, kv: [context.kvCacheKeyType, context.kvCacheValueType], context: nCtx,
        vocabularyType: model.vocabularyType, bos: t.bos, eos: t.eos, bosString: t.bosString,
        prependsBos: t.shouldPrependBosToken, appendsEos: t.shouldAppendEosToken,
        endOfGeneration: [t.bos, t.eos].map((id) => model.isEogToken(id)),
    };

    if (job.tokenize) answer.tokens = job.tokenize.map((text) => Array.from(model.tokenize(text, false)));

    if (job.score) {
        const rows = [];
        for (const ids of job.score) {
            await sequence.clearHistory();
            const input = ids.map((t) => [t, { generateNext: { probabilities: true, options: { temperature: 0 } } }]);
            const out = await sequence.controlledEvaluate(input);
            for (let i = 0; i < ids.length; i++) {
                const probs = out[i].next.probabilities;
                answer.vocab ??= probs.size;
                const row = new Float32Array(answer.vocab);
                for (const [token, p] of probs) row[token] = Math.log(p);
                rows.push(row);
            }
        }
        const all = new Float32Array(rows.length * (answer.vocab ?? 0));
        rows.forEach((row, i) => all.set(row, i * answer.vocab));
        writeFileSync(job.scores, Buffer.from(all.buffer));
    }

    if (job.greedy) {
        answer.greedy = [];
        for (const { prompt, n } of job.greedy) {
            await sequence.clearHistory();
            // one token at a time, each the argmax of llama.cpp's logits (its greedy sampler)
            const got = [];
            let input = prompt.slice();
            while (got.length < n) {
                const last = input.length - 1;
                const items = input.map((t, i) => (i === last
                    ? [t, { generateNext: { token: true, options: { temperature: 0 } } }] : t));
                const out = await sequence.controlledEvaluate(items);
                const token = out[last].next.token;
                got.push(token);
                input = [token];
            }
            answer.greedy.push(got);
        }
    }
    await context.dispose();
    await model.dispose();
    return answer;
}

const files = [];
const t0 = Date.now();
for (const job of req.files) {
    files.push(await run(job));
    if (process.env.CAIRN_LLAMA_CPP_TIMES) process.stderr.write(`${job.model}: ${Date.now() - t0} ms\n`);
}
process.stdout.write(JSON.stringify({ files }));
