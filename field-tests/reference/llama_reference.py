#!/usr/bin/env python3
"""An independent reference implementation of the Llama family in NumPy.

Written from the math of Hugging Face transformers' modeling_llama.py (RMSNorm in
f32, rotate-half RoPE with the llama3 and linear rescalings, grouped-query
attention with a causal mask, SwiGLU MLP), sharing no code with lime. It reads the
safetensors shards with its own parser (NumPy has no bfloat16), recomputes the whole
sequence at every step (no KV cache), and decodes greedily.

    llama_reference.py --model DIR --prompt-ids 1,2,3 --max-tokens 16 --out ref.json

writes {"tokens": [...], "logits": [[...], ...]} (the logits each token was
chosen from). With --tokenize TEXT... it instead prints the ids that the
`tokenizers` package and transformers' AutoTokenizer give for each text.
"""

import argparse
import json
import math
import os
import struct

import numpy as np


def load_tensors(model_dir):
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        with open(os.path.join(model_dir, name), "rb") as f:
            data = f.read()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        base = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            raw = data[base + start : base + end]
            shape = info["shape"]
            if info["dtype"] == "F32":
                arr = np.frombuffer(raw, dtype="<f4")
            elif info["dtype"] == "F16":
                arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
            elif info["dtype"] == "BF16":
                arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                raise SystemExit(f"unsupported dtype {info['dtype']} for {key}")
            tensors[key] = arr.reshape(shape).astype(np.float32)
    return tensors


def inv_frequencies(cfg, head_dim):
    base = np.float32(cfg.get("rope_theta", 10000.0))
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (base ** exps)).astype(np.float32)
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise SystemExit(f"unsupported rope scaling {kind}")


def rms_norm(x, w, eps):
    var = np.mean(x * x, axis=-1, keepdims=True)
    return w * (x / np.sqrt(var + np.float32(eps)))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def linear(t, prefix, x):
    y = x @ t[prefix + ".weight"].T
    bias = t.get(prefix + ".bias")
    return y if bias is None else y + bias


def forward(cfg, t, ids):
    """Next-token logits of the last position of `ids`."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    eps = cfg["rms_norm_eps"]
    n = len(ids)
    x = t["model.embed_tokens.weight"][np.array(ids)]
    freqs = np.arange(n, dtype=np.float32)[:, None] * inv_frequencies(cfg, hd)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        a = rms_norm(x, t[p + ".input_layernorm.weight"], eps)
        q = linear(t, p + ".self_attn.q_proj", a).reshape(n, heads, hd)
        k = linear(t, p + ".self_attn.k_proj", a).reshape(n, kv_heads, hd)
        v = linear(t, p + ".self_attn.v_proj", a).reshape(n, kv_heads, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = heads // kv_heads
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.float32(math.sqrt(hd)) + mask
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * hd)
        x = x + linear(t, p + ".self_attn.o_proj", attn)
        m = rms_norm(x, t[p + ".post_attention_layernorm.weight"], eps)
        gate = linear(t, p + ".mlp.gate_proj", m)
        up = linear(t, p + ".mlp.up_proj", m)
        x = x + linear(t, p + ".mlp.down_proj", gate / (1 + np.exp(-gate)) * up)
    x = rms_norm(x[-1:], t["model.norm.weight"], eps)
    head = t.get("lm_head.weight")
    if head is None:
        head = t["model.embed_tokens.weight"]
    return (x @ head.T)[0].astype(np.float32)


def tokenize(model_dir, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    out = {"tokenizers": [tok.encode(t).ids for t in texts]}
    try:
        from transformers import AutoTokenizer
    except ImportError:
        out["transformers"] = None
    else:
        auto = AutoTokenizer.from_pretrained(model_dir)
        out["transformers"] = [auto(t)["input_ids"] for t in texts]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--tokenize", nargs="*")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.tokenize is not None:
        result = tokenize(args.model, args.tokenize)
    else:
        with open(os.path.join(args.model, "config.json")) as f:
            cfg = json.load(f)
        if cfg.get("architectures", ["LlamaForCausalLM"])[0] not in ("LlamaForCausalLM",):
            raise SystemExit("the reference implements LlamaForCausalLM only")
        t = load_tensors(args.model)
        ids = [int(i) for i in args.prompt_ids.replace(" ", ",").split(",") if i]
        tokens, logits = [], []
        for _ in range(args.max_tokens):
            step = forward(cfg, t, ids + tokens)
            logits.append(step.tolist())
            tokens.append(int(np.argmax(step)))
        result = {"tokens": tokens, "logits": logits}
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
