"""Write llama-architecture GGUFs with the shapes of 1-8B models and random Q4_0 weights, offline.

Speed and memory are measured at the scale users run without downloading a model: the layer
count, widths and head layout are those of the named model, the tokenizer (vocabulary, merges,
chat template) is the default model's, and the weights are random Q4_0 blocks. Scales are chosen
so that activations stay finite through every layer and the logits are flat enough that sampling
gives varied tokens (the output projection is small).

    .venv/bin/python benchmarks/make_shapes.py --shape 1b --out build/shapes/llama-1b-q4_0.gguf
    .venv/bin/python benchmarks/make_shapes.py --shape all --out-dir build/shapes

Needs the `gguf` package (a test dependency of neurotap).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import numpy as np

#: name -> (layers, n_embd, n_ff, heads, kv heads, context): the shapes users run.
SHAPES = {
    "1b": (16, 2048, 8192, 32, 8, 8192),    # Llama-3.2-1B
    "4b": (36, 2560, 9728, 20, 4, 8192),    # Qwen3-4B's layers and widths (head size 128)
    "8b": (32, 4096, 14336, 32, 8, 8192),   # Llama-3.1-8B
}
QK = 32  # values per Q4_0 block: an f16 scale then 16 bytes of 4-bit values (value = d * (q - 8))


def q4_0(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q4_0 data for a [rows, cols] weight whose values have about `std` deviation."""
    blocks = rows * cols // QK
    out = np.empty((blocks, 18), np.uint8)
    # q - 8 is uniform on [-8, 7]: standard deviation ~4.6, so d = std / 4.6.
    d = np.full(blocks, std / 4.6, np.float16)
    out[:, :2] = d.view(np.uint8).reshape(blocks, 2)
    out[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return out.reshape(rows, cols // QK * 18)


def q4_k(rng: np.random.Generator, shape: tuple, std: float) -> np.ndarray:
    """Random Q4_K data (gguf-py cannot quantize K-quants) for a weight of `shape` (last axis a
    multiple of 256) whose values have about `std` deviation. A block: f16 d and dmin, 12 bytes of
    6-bit sub-block scales and mins, 128 bytes of 4-bit values (value = d * sc * q - dmin * m)."""
    *lead, cols = shape
    blocks = int(np.prod(lead)) * cols // 256
    out = np.empty((blocks, 144), np.uint8)
    d = np.full(blocks, std / 300.0, np.float16)
    out[:, 0:2] = d.view(np.uint8).reshape(blocks, 2)
    out[:, 2:4] = (d * np.float16(7.5)).view(np.uint8).reshape(blocks, 2)  # mins centre the values
    out[:, 4:] = rng.integers(0, 256, size=(blocks, 140), dtype=np.uint8)
    return out.reshape(*lead, cols // 256 * 144)


def finish(w, tmp: Path, out: Path) -> Path:
    """Writes the file of writer `w` at `tmp` and moves it to `out` (never a half-written out)."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def copy_tokenizer(w, src) -> int:
    """The default model's tokenizer, key by key, into writer `w`; returns the vocabulary size."""
    import gguf

    for key, field in src.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            vals = [field.parts[i] for i in field.data]
            if sub == gguf.GGUFValueType.STRING:
                w.add_array(key, [bytes(v).decode("utf-8") for v in vals])
            else:
                w.add_array(key, [v.tolist()[0] for v in vals])
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(key, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            w.add_key_value(key, field.parts[field.data[0]].tolist()[0], vtype)
    return len(src.fields["tokenizer.ggml.tokens"].data)


#: Mixture-of-experts architectures write_moe writes (GGUF architecture names).
MOE_ARCHS = ("qwen3moe", "qwen2moe", "olmoe", "llama", "gpt-oss")


def write_moe(out: Path, arch: str = "qwen3moe", layers: int = 2, n_embd: int = 64, n_ff_exp: int = 32,
              n_expert: int = 8, n_used: int = 2, n_ff_shexp: int = 0, weight_type: str = "f32", seed: int = 0,
              heads: int = 4, kv_heads: int = 2, ctx: int = 2048, tamper: Optional[dict] = None) -> Path:
    """A random mixture-of-experts GGUF of `arch` with the default model's tokenizer.

    weight_type: the experts' tensors (ffn_{gate,up,down}_exps): "f32", "q8_0", "q4_k" (n_embd and
    n_ff_exp multiples of 256) or "mxfp4" (gpt-oss). Embeddings and the output are Q8_0, the rest
    f32. qwen2moe gets a shared expert of n_ff_shexp units (and its sigmoid gate); gpt-oss gets
    its biases, attention sinks and sliding-window keys. tamper (tests): {"expert_count": n} writes
    that metadata value instead, {"down_exps_width": n} an expert tensor of another width,
    {"arch": name} another architecture name over the same keys, {"nan_router_layer": l} NaN router weights.
    """
    import gguf
    from gguf.quants import quantize

    import neurotap

    if arch not in MOE_ARCHS:
        raise ValueError(f"arch must be one of {MOE_ARCHS}")
    tamper = dict(tamper or {})
    if arch == "olmoe":
        kv_heads = heads  # its K norm spans n_embd: no grouped-query attention
    src = gguf.GGUFReader(str(neurotap.resolve("smollm2-135m")))
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), tamper.get("arch", arch))
    E, hd = n_embd, n_embd // heads
    w.add_name(f"neurotap random {arch} moe")
    w.add_block_count(layers)
    w.add_context_length(ctx)
    w.add_embedding_length(E)
    w.add_feed_forward_length(n_ff_exp if arch in ("olmoe", "llama") else n_ff_exp * n_used)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(tamper.get("expert_count", n_expert))
    w.add_expert_used_count(n_used)
    if arch not in ("olmoe", "llama"):
        w.add_expert_feed_forward_length(n_ff_exp)
    if n_ff_shexp:
        w.add_expert_shared_feed_forward_length(n_ff_shexp)
    if arch == "gpt-oss":
        w.add_sliding_window(128)
        w.add_key_length(hd)
        w.add_value_length(hd)
    V = copy_tokenizer(w, src)
    types = {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_k": gguf.GGMLQuantizationType.Q4_K, "mxfp4": gguf.GGMLQuantizationType.MXFP4}
    qt = types[weight_type]

    def add(name: str, arr: np.ndarray, qtype=gguf.GGMLQuantizationType.F32) -> None:
        arr = arr.astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif qtype == gguf.GGMLQuantizationType.Q4_K:
            w.add_tensor(name, q4_k(rng, arr.shape, float(arr.std())), raw_dtype=qtype)
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)

    def rnd(*shape: int, std: float) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * std

    q8 = gguf.GGMLQuantizationType.Q8_0
    add("token_embd.weight", rnd(V, E, std=1.0), q8)
    add("output_norm.weight", np.ones(E))
    add("output.weight", rnd(V, E, std=1.0 / np.sqrt(E)), q8)
    for il in range(layers):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", np.ones(E))
        add(p + "attn_q.weight", rnd(heads * hd, E, std=1 / np.sqrt(E)))
        add(p + "attn_k.weight", rnd(kv_heads * hd, E, std=1 / np.sqrt(E)))
        add(p + "attn_v.weight", rnd(kv_heads * hd, E, std=1 / np.sqrt(E)))
        add(p + "attn_output.weight", rnd(E, heads * hd, std=0.5 / np.sqrt(heads * hd)))
        if arch == "qwen3moe":
            add(p + "attn_q_norm.weight", np.ones(hd))
            add(p + "attn_k_norm.weight", np.ones(hd))
        if arch == "olmoe":
            add(p + "attn_q_norm.weight", np.ones(E))
            add(p + "attn_k_norm.weight", np.ones(E))
        if arch == "qwen2moe":
            for t, n in (("q", heads * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)):
                add(p + f"attn_{t}.bias", rnd(n, std=0.1))
        if arch == "gpt-oss":
            for t, n in (("q", heads * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)):
                add(p + f"attn_{t}.bias", rnd(n, std=0.1))
            add(p + "attn_output.bias", rnd(E, std=0.1))
            add(p + "attn_sinks.weight", rnd(heads, std=0.5))
            add(p + "post_attention_norm.weight", np.ones(E))
        else:
            add(p + "ffn_norm.weight", np.ones(E))
        router = rnd(n_expert, E, std=2.0 / np.sqrt(E))
        if tamper.get("nan_router_layer") == il:
            router[:] = np.nan
        add(p + "ffn_gate_inp.weight", router)
        Fd = tamper.get("down_exps_width", n_ff_exp)
        add(p + "ffn_gate_exps.weight", rnd(n_expert, n_ff_exp, E, std=1 / np.sqrt(E)), qt)
        add(p + "ffn_up_exps.weight", rnd(n_expert, n_ff_exp, E, std=1 / np.sqrt(E)), qt)
        add(p + "ffn_down_exps.weight", rnd(n_expert, E, Fd, std=0.5 / np.sqrt(n_ff_exp)), qt)
        if arch == "gpt-oss":
            add(p + "ffn_gate_inp.bias", rnd(n_expert, std=0.1))
            add(p + "ffn_gate_exps.bias", rnd(n_expert, n_ff_exp, std=0.1))
            add(p + "ffn_up_exps.bias", rnd(n_expert, n_ff_exp, std=0.1))
            add(p + "ffn_down_exps.bias", rnd(n_expert, E, std=0.1))
        if n_ff_shexp:
            add(p + "ffn_gate_inp_shexp.weight", rnd(E, std=1 / np.sqrt(E)))
            add(p + "ffn_gate_shexp.weight", rnd(n_ff_shexp, E, std=1 / np.sqrt(E)))
            add(p + "ffn_up_shexp.weight", rnd(n_ff_shexp, E, std=1 / np.sqrt(E)))
            add(p + "ffn_down_shexp.weight", rnd(E, n_ff_shexp, std=0.5 / np.sqrt(n_ff_shexp)))
    return finish(w, tmp, out)


def write(shape: str, out: Path, seed: int = 0) -> Path:
    import gguf

    import neurotap

    L, E, F, H, KV, ctx = SHAPES[shape]
    src = gguf.GGUFReader(str(neurotap.resolve("smollm2-135m")))
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"neurotap random {shape} shape")
    w.add_block_count(L)
    w.add_context_length(ctx)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(E // H)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    V = copy_tokenizer(w, src)
    q4 = gguf.GGMLQuantizationType.Q4_0
    ones = lambda n: np.ones(n, np.float32)  # noqa: E731  (RMSNorm gains)

    def add_q(name: str, rows: int, cols: int, std: float) -> None:
        w.add_tensor(name, q4_0(rng, rows, cols, std), raw_dtype=q4)  # shape from the byte rows

    add_q("token_embd.weight", V, E, 1.0)
    w.add_tensor("output_norm.weight", ones(E))
    add_q("output.weight", V, E, 0.05 / np.sqrt(E))  # flat logits: sampling gives varied tokens
    hd = E // H
    for il in range(L):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", ones(E))
        add_q(p + "attn_q.weight", H * hd, E, 1 / np.sqrt(E))
        add_q(p + "attn_k.weight", KV * hd, E, 1 / np.sqrt(E))
        add_q(p + "attn_v.weight", KV * hd, E, 1 / np.sqrt(E))
        add_q(p + "attn_output.weight", E, H * hd, 0.5 / np.sqrt(H * hd))
        w.add_tensor(p + "ffn_norm.weight", ones(E))
        add_q(p + "ffn_gate.weight", F, E, 1 / np.sqrt(E))
        add_q(p + "ffn_up.weight", F, E, 1 / np.sqrt(E))
        add_q(p + "ffn_down.weight", E, F, 0.5 / np.sqrt(F))
    return finish(w, tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=[*SHAPES, "all"])
    ap.add_argument("--out", default=None, help="output .gguf (one shape)")
    ap.add_argument("--out-dir", default="build/shapes", help="folder for --shape all (or when --out is not given)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for shape in (SHAPES if a.shape == "all" else [a.shape]):
        out = Path(a.out) if a.out and a.shape != "all" else Path(a.out_dir) / f"llama-{shape}-q4_0.gguf"
        path = write(shape, out, a.seed)
        print(f"{shape}: {path} ({path.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
