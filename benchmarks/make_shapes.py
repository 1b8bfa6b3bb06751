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


#: Mixture-of-experts shapes users run: arch, layers, n_embd, heads, kv heads, head size, experts,
#: used, expert width, shared expert width, expert weights. The layer counts are the models'; pass
#: --layers to write fewer layers of the same shape (what fits a machine's memory and disk).
MOE_SHAPES = {
    "olmoe-1b-7b": ("olmoe", 16, 2048, 16, 16, 128, 64, 8, 1024, 0, "q4_k"),
    "gpt-oss-20b": ("gpt-oss", 24, 2880, 64, 8, 64, 32, 4, 2880, 0, "mxfp4"),
    "qwen3-30b-a3b": ("qwen3moe", 48, 2048, 32, 4, 128, 128, 8, 768, 0, "q4_k"),
}


def write_moe(out: Path, arch: str = "qwen3moe", layers: int = 2, n_embd: int = 64, n_ff_exp: int = 32,
              n_expert: int = 8, n_used: int = 2, n_ff_shexp: int = 0, weight_type: str = "f32", seed: int = 0,
              heads: int = 4, kv_heads: int = 2, ctx: int = 2048, tamper: Optional[dict] = None,
              head_dim: Optional[int] = None, blocks: bool = False) -> Path:
    """A random mixture-of-experts GGUF of `arch` with the default model's tokenizer.

    weight_type: the experts' tensors (ffn_{gate,up,down}_exps): "f32", "q8_0", "q4_k" (n_embd and
    n_ff_exp multiples of 256) or "mxfp4" (gpt-oss). Embeddings and the output are Q8_0, the rest
    f32. qwen2moe gets a shared expert of n_ff_shexp units (and its sigmoid gate); gpt-oss gets
    its biases, attention sinks and sliding-window keys. tamper (tests): {"expert_count": n} writes
    that metadata value instead, {"down_exps_width": n} an expert tensor of another width,
    {"arch": name} another architecture name over the same keys, {"nan_router_layer": l} NaN router weights,
    {"kv_heads": n} olmoe with n key/value heads (which llama.cpp cannot run), {"f64": name} that tensor
    stored as F64.
    blocks=True (the large shapes): every quantized tensor is random blocks of its type with the
    deviation asked for, generated and written one tensor at a time (never the whole file in memory),
    and the attention weights are Q8_0.
    """
    import gguf
    from gguf.quants import quantize

    import neurotap

    if arch not in MOE_ARCHS:
        raise ValueError(f"arch must be one of {MOE_ARCHS}")
    tamper = dict(tamper or {})
    if arch == "olmoe":
        kv_heads = tamper.get("kv_heads", heads)  # its K norm spans n_embd: no grouped-query attention
    src = gguf.GGUFReader(str(neurotap.resolve("smollm2-135m")))
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), tamper.get("arch", arch))
    E, hd = n_embd, head_dim or n_embd // heads
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
    if arch == "gpt-oss" or head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if arch == "gpt-oss":
        w.add_sliding_window(128)
    V = copy_tokenizer(w, src)
    F32, Q8 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
    types = {"f32": F32, "q8_0": Q8, "q4_k": gguf.GGMLQuantizationType.Q4_K, "mxfp4": gguf.GGMLQuantizationType.MXFP4}
    qt = types[weight_type]
    attn_t = Q8 if blocks else F32
    pending = []  # blocks=True: (name, shape, std, qtype), generated when written

    def add(name: str, shape: tuple, std: Optional[float], qtype=F32, fill: Optional[float] = None) -> None:
        """A tensor of numpy `shape` (ggml's reversed): random with deviation std, or ones (std None)."""
        if blocks and qtype != F32:
            nbytes = int(np.prod(shape[:-1])) * random_blocks(qtype, shape[-1:], 1.0, None, nbytes_only=True)
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            pending.append((name, shape, std, qtype))
            return
        arr = np.ones(shape, np.float32) if std is None else (rng.standard_normal(shape) * std).astype(np.float32)
        if fill is not None:
            arr[:] = fill
        if blocks:
            w.add_tensor_info(name, shape, np.dtype(np.float32), arr.nbytes)
            pending.append((name, arr, None, F32))
        elif qtype == F32:
            w.add_tensor(name, arr.astype(np.float64) if tamper.get("f64") == name else arr)
        elif qtype == gguf.GGMLQuantizationType.Q4_K:
            w.add_tensor(name, q4_k(rng, arr.shape, float(arr.std())), raw_dtype=qtype)
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)

    add("token_embd.weight", (V, E), 1.0, Q8)
    add("output_norm.weight", (E,), None)
    add("output.weight", (V, E), 1.0 / np.sqrt(E), Q8)
    for il in range(layers):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", (E,), None)
        add(p + "attn_q.weight", (heads * hd, E), 1 / np.sqrt(E), attn_t)
        add(p + "attn_k.weight", (kv_heads * hd, E), 1 / np.sqrt(E), attn_t)
        add(p + "attn_v.weight", (kv_heads * hd, E), 1 / np.sqrt(E), attn_t)
        add(p + "attn_output.weight", (E, heads * hd), 0.5 / np.sqrt(heads * hd), attn_t)
        if arch == "qwen3moe":
            add(p + "attn_q_norm.weight", (hd,), None)
            add(p + "attn_k_norm.weight", (hd,), None)
        if arch == "olmoe":
            add(p + "attn_q_norm.weight", (heads * hd,), None)
            add(p + "attn_k_norm.weight", (heads * hd,), None)  # n_embd wide, as llama.cpp's loader reads it
        if arch in ("qwen2moe", "gpt-oss"):
            for t, n in (("q", heads * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)):
                add(p + f"attn_{t}.bias", (n,), 0.1)
        if arch == "gpt-oss":
            add(p + "attn_output.bias", (E,), 0.1)
            add(p + "attn_sinks.weight", (heads,), 0.5)
            add(p + "post_attention_norm.weight", (E,), None)
        else:
            add(p + "ffn_norm.weight", (E,), None)
        add(p + "ffn_gate_inp.weight", (n_expert, E), 2.0 / np.sqrt(E),
            fill=np.nan if tamper.get("nan_router_layer") == il else None)
        Fd = tamper.get("down_exps_width", n_ff_exp)
        add(p + "ffn_gate_exps.weight", (n_expert, n_ff_exp, E), 1 / np.sqrt(E), qt)
        add(p + "ffn_up_exps.weight", (n_expert, n_ff_exp, E), 1 / np.sqrt(E), qt)
        add(p + "ffn_down_exps.weight", (n_expert, E, Fd), 0.5 / np.sqrt(n_ff_exp), qt)
        if arch == "gpt-oss":
            add(p + "ffn_gate_inp.bias", (n_expert,), 0.1)
            add(p + "ffn_gate_exps.bias", (n_expert, n_ff_exp), 0.1)
            add(p + "ffn_up_exps.bias", (n_expert, n_ff_exp), 0.1)
            add(p + "ffn_down_exps.bias", (n_expert, E), 0.1)
        if n_ff_shexp:
            add(p + "ffn_gate_inp_shexp.weight", (E,), 1 / np.sqrt(E))
            add(p + "ffn_gate_shexp.weight", (n_ff_shexp, E), 1 / np.sqrt(E))
            add(p + "ffn_up_shexp.weight", (n_ff_shexp, E), 1 / np.sqrt(E))
            add(p + "ffn_down_shexp.weight", (E, n_ff_shexp), 0.5 / np.sqrt(n_ff_shexp))
    if not blocks:
        return finish(w, tmp, out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, std, qtype in pending:
        if qtype == F32:
            w.write_tensor_data(shape)  # a small f32 array made at add()
        else:
            w.write_tensor_data(random_blocks(qtype, shape, std, rng))
    w.close()
    os.replace(tmp, out)
    return out


def random_blocks(qtype, shape: tuple, std: float, rng, nbytes_only: bool = False):
    """Random blocks of quantization `qtype` for a weight of numpy `shape` whose values have about
    `std` deviation: random quant bytes under one scale chosen for that deviation (measured by
    dequantizing a sample), written fast and in bounded memory for the multi-GB shapes. With
    nbytes_only, the byte size of one row of shape[-1] values."""
    import gguf
    from gguf.quants import dequantize

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    *lead, cols = shape
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block} values, got {cols}")
    if nbytes_only:
        return cols // block * size
    n = int(np.prod(lead)) * cols // block
    out = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    T = gguf.GGMLQuantizationType
    if qtype == T.MXFP4:  # one E8M0 exponent byte, then 16 bytes of e2m1 pairs
        out[:, 0] = 127
        probe = dequantize(out[:64].reshape(-1), qtype).std()
        out[:, 0] = np.clip(127 + np.round(np.log2(std / probe)), 1, 254)
    elif qtype == T.Q8_0:  # f16 d, then 32 int8 values
        out[:, 0:2] = np.full(n, 1.0, np.float16).view(np.uint8).reshape(n, 2)
        probe = dequantize(out[:64].reshape(-1), qtype).std()
        out[:, 0:2] = np.full(n, std / probe, np.float16).view(np.uint8).reshape(n, 2)
    elif qtype == T.Q4_K:
        return q4_k(rng, shape, std)
    else:
        raise ValueError(f"no random-block writer for {qtype.name}")
    return out.reshape(*lead, cols // block * size)


def write_moe_shape(name: str, out: Path, layers: Optional[int] = None, seed: int = 0) -> Path:
    """A GGUF with the MoE shape `name` (MOE_SHAPES), random blocks, `layers` of them (default: the model's)."""
    arch, L, E, H, KV, hd, X, U, F, S, wt = MOE_SHAPES[name]
    return write_moe(out, arch=arch, layers=layers or L, n_embd=E, heads=H, kv_heads=KV, head_dim=hd, n_expert=X,
                     n_used=U, n_ff_exp=F, n_ff_shexp=S, weight_type=wt, seed=seed, ctx=8192, blocks=True)


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
    ap.add_argument("--shape", default="1b", choices=[*SHAPES, *MOE_SHAPES, "all"],
                    help="a dense shape, an MoE shape, or all the dense ones")
    ap.add_argument("--layers", type=int, default=None, help="MoE shapes: write this many layers of the shape")
    ap.add_argument("--out", default=None, help="output .gguf (one shape)")
    ap.add_argument("--out-dir", default="build/shapes", help="folder for --shape all (or when --out is not given)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for shape in (SHAPES if a.shape == "all" else [a.shape]):
        if shape in MOE_SHAPES:
            tag = f"-{a.layers}l" if a.layers else ""
            out = Path(a.out) if a.out else Path(a.out_dir) / f"{shape}{tag}-{MOE_SHAPES[shape][-1]}.gguf"
            path = write_moe_shape(shape, out, a.layers, a.seed)
        else:
            out = Path(a.out) if a.out and a.shape != "all" else Path(a.out_dir) / f"llama-{shape}-q4_0.gguf"
            path = write(shape, out, a.seed)
        print(f"{shape}: {path} ({path.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
