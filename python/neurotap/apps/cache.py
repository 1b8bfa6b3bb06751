"""The authors' sparse activation cache, both ways: `export_cache` writes sampled responses in the
layout NAD's and NEX's reference tools read, `load_cache` reads such a cache (one they wrote too)
into what neurotap's NEX and NAD selectors take.

The layout is NAD_Next's cache v4.1 with its row bank (github.com/Chi-Shan0707/NAD_Next at
bf0fafa2: nad/core/storage/cache_paths.py, written by nad/pipeline/build_cache_fast.py, read by
nad/core/views/reader.py); NEX's reference (anonymous-research-artifacts/nex at f9033d35,
nex_core/scoring.py) reads its rows/ and base/. All little-endian, no headers:

    manifest.json              NAD_Next's Manifest v4.0, exactly its fields (its loader takes no others)
    meta.json                  {"samples": [{"problem_id", "run_index", ...}, ...]}: one entry per
                               response; NAD_Next groups responses by problem_id for selection
    base/row_ptr.int64         [responses + 1]: each response's keys in base/keys
    base/keys.uint32           neuron keys (layer << 16) | neuron, ascending within a response
    base/w_sum.float16         per key, the response's total mass; base/w_max.float16 its largest
    index/perm_{max,sum}.int32 per response, absolute positions of its keys by descending weight
    index/prefix_{max,sum}.float16  the cumulative weight share along that order (NAD's cuts)
    rows/sample_row_ptr.int64  [responses + 1]: each response's rows
    rows/row_ptr.int64         [rows + 1]: each row's keys in rows/keys
    rows/token_row_ptr.int64   [rows + 1]: tokens before each row, counted over the whole cache
    rows/keys.uint32, rows/w_sum.float16, rows/w_max.float16, rows/slice_ids.int32 (row number)
    token_data/token_row_ptr.int64, token_data/token_ids.int32   the generated tokens

What neurotap writes: a row is `row_tokens` consecutive generated tokens (32 by default, the
position size of both tools and NEX's row; 1 for per-token rows); a row holds the neurons
activated (NAD's contribution sets) on any of its tokens, w_sum = on how many of them (NEX's mass,
as neurotap.methods.selection.nex_input computes it) and w_max = 1 (activation is 0/1 here);
base/ holds the same over the whole response. Keys need layer < 255 (255 is reserved) and
n_ff <= 65536. Masses are float16, exact for counts up to 2048.

What `load_cache` gives: the cache's neurons as columns (every key it holds, ascending), per
response NEX's input (rows/ masses, dense [rows, neurons] float32, and token counts) and its base/
masses and key sets, from which NAD's Jaccard similarity and NEX's GMF come. Like the NEX
reference it ignores keys of the reserved layer 255 (in NAD's sets too, where NAD_Next's reader
keeps them), takes non-finite or negative masses as 0 and leaves out rows of no tokens. Differences: keys of layers >= 64 are kept (the NEX reference drops
rows holding one, its key table being 2^22 long), and a key stored with mass 0 counts as not
activated (the reference's novelty counts it as seen). The sets are whole: NAD_Next's `analyze`
defaults to weighted Jaccard on the keys holding 98% of the weight; `--distance ja --cut mass:1.0`
makes it compare the sets neurotap compares. Dense rows need rows x neurons floats per response:
meant for caches of a few thousand neurons or a few hundred rows, not a whole benchmark at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.io import write_atomic
from ..runtime.sampling import Sample
from ..scoring.nex import good_mass_fraction, neuron_weights

RESERVED_LAYER = 255
MANIFEST_VERSION = "4.0"  # NAD_Next's nad/core/schema/manifest.py
ROW_FILES = ("sample_row_ptr.int64", "row_ptr.int64", "token_row_ptr.int64", "keys.uint32", "w_sum.float16")
BASE_FILES = ("row_ptr.int64", "keys.uint32", "w_sum.float16")

PathLike = Union[str, "os.PathLike[str]"]


def pack_keys(bits: np.ndarray, n_ff: int) -> np.ndarray:
    """Neuron keys (layer << 16) | neuron of neurotap's bit indices layer * n_ff + neuron."""
    bits = np.asarray(bits, dtype=np.int64)
    if not 0 < n_ff <= 1 << 16:
        raise ValueError(f"the cache's keys hold a neuron index in 16 bits: n_ff must be 1..65536, got {n_ff}")
    layer, neuron = np.divmod(bits, n_ff)
    if bits.size and (bits.min() < 0 or layer.max() >= RESERVED_LAYER):
        raise ValueError(f"the cache's keys hold layers 0..{RESERVED_LAYER - 1} ({RESERVED_LAYER} is reserved)")
    return ((layer << 16) | neuron).astype(np.uint32)


def unpack_keys(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(layer, neuron) of each key."""
    k = np.asarray(keys, dtype=np.uint32)
    return (k >> 16).astype(np.int64), (k & 0xFFFF).astype(np.int64)


def _response_rows(sample: Sample, row_tokens: int) -> List[Tuple[np.ndarray, np.ndarray, int]]:
    """Per row of a sample: (bit indices of the neurons activated on its tokens, on how many, tokens)."""
    if sample.contribution_sets is None or sample.chunk != 1:
        raise ValueError("a cache needs per-token activated sets: sample with reducers=('contributions',), chunk=1")
    T = sample.n_tokens
    keys = sample.contribution_sets.keys(0, T)  # per token, its sorted neuron keys
    width = 64 * sample.contribution_sets.n_words
    out = []
    for a in range(0, T, row_tokens):
        row = keys[a:a + row_tokens]
        count = np.bincount(np.concatenate(row), minlength=width).astype(np.int64) if row else np.zeros(width, np.int64)
        nz = np.flatnonzero(count)
        out.append((nz, count[nz], min(row_tokens, T - a)))
    return out


def _index(start: int, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """NAD_Next's index of one response: positions by descending weight (stable) and the
    cumulative weight share, as build_cache_fast computes them."""
    order = np.argsort(-w, kind="mergesort")
    cdf = np.cumsum(w[order], dtype=np.float32)
    prefix = (cdf / cdf[-1]).astype(np.float16) if w.size and cdf[-1] > 0 else np.zeros(w.size, np.float16)
    return (start + order).astype(np.int32), prefix


def _le(a: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def check_cache_folder(out: PathLike, overwrite: bool, flag: str = "overwrite=True") -> None:
    """`out` may be new, or, with overwrite, a cache or an empty folder: never other data.
    FileExistsError otherwise, naming `flag` (the option that allows overwriting)."""
    out = Path(out)
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists ({flag} replaces a cache folder)")
    if not out.is_dir() or not ((out / "base" / "row_ptr.int64").is_file() or not any(out.iterdir())):
        raise FileExistsError(f"{out} is not a cache folder: {flag} replaces only a cache (or an empty folder)")


def export_cache(samples: Sequence[Sample], out_dir: PathLike, *, n_ff: int, row_tokens: int = 32,
                 problem_ids: Optional[Sequence[str]] = None, extra: Optional[Sequence[Dict[str, Any]]] = None,
                 model_id: str = "", dataset_id: str = "neurotap", overwrite: bool = False) -> Path:
    """Write the samples' activated sets as a cache in the authors' layout at `out_dir`.

    samples: sampled with reducers=("contributions",), chunk=1 (per-token sets). n_ff: the model's
    FFN width (model.info.n_ff), to turn bit indices into (layer, neuron) keys. problem_ids: per
    sample, the problem it answers (default: all "0"); extra: per sample, more fields for its
    meta.json entry. The cache is built in a temporary folder beside `out_dir` and renamed into
    place, so a reader never sees half of one; an existing `out_dir` is replaced only with overwrite.
    """
    out = Path(out_dir)
    if row_tokens < 1:
        raise ValueError(f"row_tokens must be >= 1, got {row_tokens}")
    n = len(samples)
    pids = ["0"] * n if problem_ids is None else [str(p) for p in problem_ids]
    extras = [{}] * n if extra is None else list(extra)
    if len(pids) != n or len(extras) != n:
        raise ValueError(f"problem_ids and extra need one entry per sample ({n})")
    check_cache_folder(out, overwrite)

    rows_srp, rows_rp, rows_trp = [0], [0], [0]
    rows_keys, rows_w, slice_ids = [], [], []
    base_rp, base_keys, base_w = [0], [], []
    perm: Dict[str, list] = {"max": [], "sum": []}
    prefix: Dict[str, list] = {"max": [], "sum": []}
    tok_rp, tok_ids, meta = [0], [], []
    runs: Dict[str, int] = {}
    for s, pid, more in zip(samples, pids, extras):
        total = np.zeros(64 * (s.contribution_sets.shape[1] if s.contribution_sets is not None else 0), np.int64)
        for r, (bits, count, t) in enumerate(_response_rows(s, row_tokens)):
            rows_keys.append(pack_keys(bits, n_ff))  # ascending: keys order as bit indices do
            rows_w.append(count)
            slice_ids.append(r)
            rows_rp.append(rows_rp[-1] + bits.size)
            rows_trp.append(rows_trp[-1] + t)
            total[bits] += count
        rows_srp.append(len(rows_rp) - 1)
        bits = np.flatnonzero(total)
        w = total[bits].astype(np.float32)
        base_keys.append(pack_keys(bits, n_ff))
        base_w.append(w)
        for agg, weight in (("max", np.ones_like(w)), ("sum", w)):
            p, q = _index(base_rp[-1], weight)
            perm[agg].append(p), prefix[agg].append(q)
        base_rp.append(base_rp[-1] + bits.size)
        tok_ids.append(np.asarray(s.tokens, dtype=np.int64))
        tok_rp.append(tok_rp[-1] + s.n_tokens)
        runs[pid] = runs.get(pid, -1) + 1
        meta.append({"problem_id": pid, "run_index": runs[pid], "sample_index": s.index, "n_tokens": s.n_tokens,
                     "finish_reason": s.finish_reason, "text": s.text, **more})

    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    w_sum, r_sum = cat(base_w), cat(rows_w)
    files = {
        "base/row_ptr.int64": _le(base_rp, "i8"),
        "base/keys.uint32": _le(cat(base_keys), "u4"),
        "base/w_max.float16": _le(np.ones(w_sum.size), "f2"),
        "base/w_sum.float16": _le(w_sum, "f2"),
        "index/perm_max.int32": _le(cat(perm["max"]), "i4"),
        "index/prefix_max.float16": _le(cat(prefix["max"]), "f2"),
        "index/perm_sum.int32": _le(cat(perm["sum"]), "i4"),
        "index/prefix_sum.float16": _le(cat(prefix["sum"]), "f2"),
        "rows/sample_row_ptr.int64": _le(rows_srp, "i8"),
        "rows/row_ptr.int64": _le(rows_rp, "i8"),
        "rows/token_row_ptr.int64": _le(rows_trp, "i8"),
        "rows/keys.uint32": _le(cat(rows_keys), "u4"),
        "rows/w_max.float16": _le(np.ones(r_sum.size), "f2"),
        "rows/w_sum.float16": _le(r_sum, "f2"),
        "rows/slice_ids.int32": _le(slice_ids, "i4"),
        "token_data/token_row_ptr.int64": _le(tok_rp, "i8"),
        "token_data/token_ids.int32": _le(cat(tok_ids), "i4"),
    }
    manifest = {  # NAD_Next's Manifest fields, as build_cache_fast fills them
        "version": MANIFEST_VERSION, "dataset_id": dataset_id, "model_id": model_id, "num_runs": n,
        "aggregations": ["max", "sum"],
        "dtypes": {"keys": "uint32", "w_max": "float16", "w_sum": "float16", "perm_*": "int32", "prefix_*": "float16"},
        "row_ptr_sum": int(base_rp[-1]), "token_row_ptr_sum": int(tok_rp[-1]),
        "token_metadata": {"enabled": True, "fields": ["token_ids"], "dtypes": {"token_ids": "int32"},
                           "description": "Token-level metadata: IDs"},
        "run_metadata": {"position_size": int(row_tokens), "has_row_bank": True},
        "global_key_dict_hash": "v4",
        "files_sha256": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()},
        "created_at": datetime.now().isoformat(), "endianness": "little",
    }
    about = {"format": "NAD_Next cache v4.1 with row bank, written by neurotap", "model": model_id,
             "dataset": dataset_id, "row_tokens": row_tokens, "n_ff": n_ff, "key": "(layer << 16) | neuron",
             "mass": "w_sum: tokens of the row (base: of the response) on which the neuron was activated",
             "samples": meta}
    files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    files["meta.json"] = json.dumps(about, indent=1).encode()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, data in files.items():
            write_atomic(tmp / rel, data)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():  # a directory cannot be renamed over another: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / out.name, out)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


@dataclass
class Cache:
    """A cache read by `load_cache`. Columns are neurons (their keys in `keys`); responses keep the
    cache's order."""

    path: Path
    keys: np.ndarray  # uint32 [N]: each column's key (layer << 16) | neuron, ascending
    responses: Optional[List[Tuple[np.ndarray, np.ndarray]]]  # NEX input per response; None without rows/
    mass: np.ndarray  # float32 [n, N]: base/ w_sum, each response's total mass per neuron
    present: np.ndarray  # bool [n, N]: base/ keys, each response's activated set
    samples: List[Dict[str, Any]] = field(default_factory=list)  # meta.json's entries ({} without one)
    manifest: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.present.shape[0]

    def groups(self) -> Dict[str, List[int]]:
        """Response indices per problem_id, in cache order (one group "0" when meta.json has none)."""
        out: Dict[str, List[int]] = {}
        for i in range(len(self)):
            pid = str(self.samples[i].get("problem_id", "0")) if i < len(self.samples) else "0"
            out.setdefault(pid, []).append(i)
        return out

    def _pick(self, indices: Optional[Sequence[int]]) -> np.ndarray:
        return np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)

    def set_sizes(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """Neurons in each response's set (NAD's MinAct)."""
        return self.present[self._pick(indices)].sum(axis=1).astype(np.int64)

    def similarity(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """Jaccard similarity of the responses' sets, as neurotap.methods.nad.similarity computes it
        (intersection / union, 1 for two empty sets)."""
        A = self.present[self._pick(indices)].astype(np.float64)
        inter = A @ A.T  # exact: integer counts
        size = A.sum(axis=1)
        union = size[:, None] + size[None, :] - inter
        S = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
        np.fill_diagonal(S, 1.0)
        return S

    def nex_scores(self, indices: Optional[Sequence[int]] = None, rho: float = 0.95, *,
                   reference_rounding: bool = False) -> np.ndarray:
        """NEX: neuron weights learned from these responses' rows, each one's GMF on its base/
        masses (what the NEX reference scores). reference_rounding: see neurotap.scoring.nex.credit;
        with it (and for responses with weighted mass) the reference's score_responses values."""
        if self.responses is None:
            raise ValueError(f"{self.path} has no row bank (rows/): NEX needs per-row masses")
        idx = self._pick(indices)
        w = neuron_weights([self.responses[i] for i in idx], rho=rho, reference_rounding=reference_rounding)
        return np.array([good_mass_fraction(self.mass[i][None, :], w) for i in idx])


def _read(path: Path, rel: str, dtype: str) -> np.ndarray:
    f = path / rel
    if not f.is_file():
        raise FileNotFoundError(f"cache {path} is missing {rel}")
    size = np.dtype(dtype).itemsize
    if f.stat().st_size % size:
        raise ValueError(f"{f}: size {f.stat().st_size} is not a multiple of {size} ({dtype})")
    return np.fromfile(f, dtype=np.dtype(dtype).newbyteorder("<"))


def _check_ptr(ptr: np.ndarray, n: int, what: str) -> None:
    if ptr.size == 0 or ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] != n:
        raise ValueError(f"{what} must rise from 0 to {n}")


def _clean(keys: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """As the NEX reference: reserved-layer keys out, non-finite or negative masses to 0."""
    keep = (keys >> 16) != RESERVED_LAYER
    w = w[keep].astype(np.float32)
    return keys[keep], np.clip(np.where(np.isfinite(w), w, 0.0), 0.0, None).astype(np.float32)


def load_cache(path: PathLike) -> Cache:
    """Read a cache in the authors' layout (written by export_cache or by their tools)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no cache at {path}")
    b_ptr, b_keys, b_w = (_read(path, f"base/{f}", f.split(".")[1]) for f in BASE_FILES)
    if not (b_keys.size == b_w.size):
        raise ValueError(f"{path}: base/keys and base/w_sum differ in length")
    _check_ptr(b_ptr, b_keys.size, "base/row_ptr")
    n = b_ptr.size - 1
    has_rows = (path / "rows" / ROW_FILES[0]).is_file()
    if has_rows:
        srp, rp, trp, r_keys, r_w = (_read(path, f"rows/{f}", f.split(".")[1]) for f in ROW_FILES)
        if r_keys.size != r_w.size or trp.size != rp.size:
            raise ValueError(f"{path}: rows/ files disagree in length")
        _check_ptr(rp, r_keys.size, "rows/row_ptr")
        _check_ptr(srp, rp.size - 1, "rows/sample_row_ptr")
        if srp.size != n + 1:
            raise ValueError(f"{path}: rows/ holds {srp.size - 1} responses, base/ {n}")
        all_keys = np.concatenate([b_keys, r_keys])
    else:
        all_keys = b_keys
    keys = np.unique(all_keys[(all_keys >> 16) != RESERVED_LAYER]).astype(np.uint32)
    col = lambda k: np.searchsorted(keys, k)  # noqa: E731

    mass = np.zeros((n, keys.size), np.float32)
    present = np.zeros((n, keys.size), bool)
    for i in range(n):
        k, w = _clean(b_keys[b_ptr[i]:b_ptr[i + 1]], b_w[b_ptr[i]:b_ptr[i + 1]])
        np.add.at(mass[i], col(k), w)
        present[i, col(k)] = True

    responses = None
    if has_rows:
        responses = []
        for i in range(n):
            rows = [r for r in range(srp[i], srp[i + 1]) if trp[r + 1] - trp[r] > 0]
            m = np.zeros((len(rows), keys.size), np.float32)
            for j, r in enumerate(rows):
                k, w = _clean(r_keys[rp[r]:rp[r + 1]], r_w[rp[r]:rp[r + 1]])
                np.add.at(m[j], col(k), w)
            responses.append((m, np.array([trp[r + 1] - trp[r] for r in rows], dtype=np.int64)))

    samples: List[Dict[str, Any]] = []
    if (path / "meta.json").is_file():
        samples = list(json.loads((path / "meta.json").read_text(encoding="utf-8")).get("samples", []))
    manifest_file = path / "manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
    return Cache(path=path, keys=keys, responses=responses, mass=mass, present=present, samples=samples,
                 manifest=manifest)


__all__ = ["export_cache", "load_cache", "Cache", "check_cache_folder", "pack_keys", "unpack_keys"]
