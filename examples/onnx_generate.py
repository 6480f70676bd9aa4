#!/usr/bin/env python3
"""Generate text with ONNX Runtime alone (numpy + onnxruntime), from export.py --decode's graphs.

    python export.py --workdir runs/iliad_char_cpu --onnx orpheus.onnx --decode
    python examples/onnx_generate.py --prefill orpheus.prefill.onnx --step orpheus.step.onnx --prompt Achilles

The prompt is prefilled once, then each character costs one step: the key/value buffers (block_size
positions per layer) go in and come back. When they are full, the last block_size - shift characters
are prefilled again, as sample.py does, so with --temperature 0 the text is sample.py's greedy text
(same --shift). With a temperature, draws come from NumPy's generator: other text than sample.py's.
"""

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort


def generate(prefill, step, prompt_ids, max_new_tokens, shift=None, temperature=0.0, top_k=0, seed=0):
    meta = prefill.get_modelmeta().custom_metadata_map
    L = int(meta["block_size"])
    shift = shift or max(1, L // 2)
    rng = np.random.default_rng(seed)
    window = list(prompt_ids[-L:])  # the characters in the buffers, positions 0 .. len - 1
    logits, *kv = prefill.run(None, {"input": np.array([window], np.int64)})
    next_logits = logits[0, -1]
    past_names = [i.name for i in step.get_inputs()][2:]
    out = []
    for _ in range(max_new_tokens):
        if len(window) == L:  # full: keep the last L - shift characters, prefilled again
            window = window[shift:]
            _, *kv = prefill.run(None, {"input": np.array([window], np.int64)})
        if temperature == 0:
            token = int(np.argmax(next_logits))
        else:
            z = next_logits / temperature
            if top_k:
                z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
            p = np.exp(z - z.max())
            token = int(rng.choice(len(p), p=p / p.sum()))
        out.append(token)
        feed = {"input": np.array([[token]], np.int64), "position": np.array(len(window), np.int64)}
        logits, *kv = step.run(None, {**feed, **dict(zip(past_names, kv))})
        window.append(token)
        next_logits = logits[0, 0]
    return out


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill", required=True)
    p.add_argument("--step", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--shift", type=int, default=None, help="as sample.py's (default block_size // 2)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    prefill, step = (
        ort.InferenceSession(f, providers=["CPUExecutionProvider"]) for f in (args.prefill, args.step)
    )
    chars = json.loads(prefill.get_modelmeta().custom_metadata_map["vocab"])
    prompt = args.prompt or "\n"
    unknown = sorted(set(prompt) - set(chars))
    if unknown:
        sys.exit(f"error: characters not in the vocabulary: {', '.join(map(repr, unknown))}")
    ids = generate(
        prefill,
        step,
        [chars.index(c) for c in prompt],
        args.max_new_tokens,
        args.shift,
        args.temperature,
        args.top_k,
        args.seed,
    )
    print(prompt + "".join(chars[i] for i in ids))


if __name__ == "__main__":
    main(sys.argv[1:])
