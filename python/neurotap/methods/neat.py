"""NEAT (arXiv 2602.02010): neuron-based early exit.

Calibration (once per model): greedy traces on problems with verifiable answers; at the position
that predicts the termination marker, every neuron of the upper layers is scored by how much
adding its output a_i * W_down[:, i] to the final residual stream raises log p(marker), computed
through the final RMSNorm and the unembedding. A first-order estimate (the gradient of
log p(marker) at the residual) ranks all neurons; the best candidates are then scored exactly,
through the whole vocabulary (numpy's BLAS). The 300 best positive, then the top 100, are
filtered by their temporal pattern over the traces (late activation: relative center of mass;
agreement: the share of traces where they vote for termination), and the best few kept with
their reference activation pattern at termination.

Run time is native (cpp/methods/neat.h): the watched neurons' cosine similarity and norm ratio to the
reference, at line starts, end the reasoning or ban reflection words for one token.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _native
from ..core.io import write_atomic
from ..core.resources import shipped_file
from ..runtime.model import Model
from ..scoring.tasks import DEFAULT_PROMPT, Task, format_prompt

VERSION = 1
REFLECTION_WORDS = ("Wait", "But", "Alternatively", "However", "Hmm")
SHIPPED = {"smollm2-135m": "neat-smollm2-135m.json"}
_FINGERPRINTS: "weakref.WeakKeyDictionary[Model, Dict[str, Any]]" = weakref.WeakKeyDictionary()


def fingerprint(model: Model) -> Dict[str, Any]:
    """What a calibration is bound to: the file's hash and the shapes the neurons index (hashed
    once per loaded model: every generate(neat=...) checks it)."""
    cached = _FINGERPRINTS.get(model)
    if cached is not None:
        return dict(cached)
    h = hashlib.sha256()
    with open(model.info.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    i = model.info
    fp = {"sha256": h.hexdigest(), "architecture": i.architecture, "n_layers": i.n_layers, "n_ff": i.n_ff,
          "n_embd": i.n_embd, "n_vocab": i.n_vocab, "file": Path(i.path).name}
    _FINGERPRINTS[model] = dict(fp)
    return fp


def read_calibration_json(path: Path, method: str) -> Any:
    """The JSON of a method's calibration file; FileNotFoundError or ValueError naming the method."""
    if not path.is_file():
        raise FileNotFoundError(f"{method} calibration file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a {method} calibration file (corrupt or truncated JSON: {e})") from None


def check_calibrated_for(made_for: Dict[str, Any], model: Model, where: str, command: str) -> None:
    """ValueError naming both files when a calibration was made for another model file (its
    neurons would mean nothing here)."""
    fp = fingerprint(model)
    if made_for.get("sha256") != fp["sha256"]:
        raise ValueError(f"{where} was calibrated for another model ({made_for.get('file')}, "
                         f"{made_for.get('architecture')}, sha256 {str(made_for.get('sha256'))[:12]}...), not "
                         f"{fp['file']} (sha256 {fp['sha256'][:12]}...); calibrate this model with `{command}`")


def termination_marker(model: Model) -> Optional[Tuple[str, int]]:
    """`</think>` where the vocabulary has it as one token; None otherwise: calibration then uses
    the end-of-generation token the model itself ends its answers with (end of turn or end of
    sequence; GGUF metadata does not reliably say which one a chat model emits)."""
    ids = model.tokenize("</think>", add_special=False, parse_special=True)
    if len(ids) == 1 and model.token_text(ids[0]) == "</think>":
        return "</think>", ids[0]
    return None


@dataclass
class NeatCalibration:
    neurons: List[Tuple[int, int]]
    reference: List[float]
    exit_similarity: float = 0.6
    ban_similarity: float = 0.4
    magnitude: float = 0.0
    line_starts_only: bool = True
    marker: str = ""
    answer_prefix: str = ""  # appended after the marker on exit (e.g. "\nAnswer:")
    ban_words: List[str] = field(default_factory=lambda: list(REFLECTION_WORDS))
    model: Dict[str, Any] = field(default_factory=dict)
    details: Dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def native_config(self, model: Model) -> Any:
        L, F = model.info.n_layers, model.info.n_ff
        for layer, i in self.neurons:
            if not (0 <= int(layer) < L and 0 <= int(i) < F):
                raise ValueError(f"NEAT neuron ({layer}, {i}) is outside this model's {L} layers x {F} neurons")
        cfg = _native.NeatConfig()
        cfg.neurons = [(int(a), int(b)) for a, b in self.neurons]
        cfg.reference = [float(x) for x in self.reference]
        cfg.exit_similarity = float(self.exit_similarity)
        cfg.ban_similarity = float(self.ban_similarity)
        cfg.magnitude = float(self.magnitude)
        cfg.line_starts_only = bool(self.line_starts_only)
        cfg.ban_tokens = ban_tokens(model, self.ban_words)
        cfg.exit_tokens = model.tokenize(self.marker + self.answer_prefix, add_special=False, parse_special=True)
        return cfg


def ban_tokens(model: Model, words: Sequence[str]) -> List[int]:
    """Each word, with and without a leading space, where it is one whole token: banning the first
    piece of a multi-token word would also ban every other word starting with that piece."""
    out: List[int] = []
    for w in words:
        for form in (w, " " + w):
            ids = model.tokenize(form, add_special=False, parse_special=False)
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
    return out


class DownProjection:
    """W_down of one layer in the flat neuron order (a dense layer's ffn_down; an MoE layer's
    experts side by side, then the shared expert: ModelInfo.expert_of), read from the file per
    expert when needed, so a wide MoE layer (gpt-oss: 92,160 neurons) is never held whole."""

    def __init__(self, model: Model, layer: int):
        self.info, self.layer = model.info, layer
        self._parts: Dict[int, np.ndarray] = {}  # expert -> [n_embd, width] (dense: expert 0)

    def _part(self, expert: int) -> np.ndarray:
        if expert not in self._parts:
            i, p, E = self.info, f"blk.{self.layer}.", self.info.n_embd
            if not i.is_moe:
                self._parts[expert] = _native.read_tensor_rows(i.path, p + "ffn_down.weight", 0, E)
            elif expert == i.n_expert:
                self._parts[expert] = _native.read_tensor_rows(i.path, p + "ffn_down_shexp.weight", 0, E)
            else:  # ne = {n_ff_exp, n_embd, n_expert}: expert e is rows [e * n_embd, (e + 1) * n_embd)
                self._parts[expert] = _native.read_tensor_rows(i.path, p + "ffn_down_exps.weight", expert * E, E)
        return self._parts[expert]

    def _experts(self) -> List[Tuple[int, int, int]]:
        """(expert, first flat index, width) of each part."""
        i = self.info
        if not i.is_moe:
            return [(0, 0, i.n_ff)]
        out = [(e, e * i.n_ff_exp, i.n_ff_exp) for e in range(i.n_expert)]
        return out + ([(i.n_expert, i.n_expert * i.n_ff_exp, i.n_ff_shexp)] if i.n_ff_shexp else [])

    def project(self, v: np.ndarray, active: np.ndarray) -> np.ndarray:
        """W_down^T v for every flat neuron (float64 [n_ff]); only the parts holding a neuron of
        `active` (bool [n_ff]: the others' activations are 0 and their value is not read) are read."""
        out = np.zeros(self.info.n_ff)
        for e, a, w in self._experts():
            if active[a:a + w].any():
                out[a:a + w] = self._part(e).T.astype(np.float64) @ v
        return out

    def column(self, index: int) -> np.ndarray:
        """W_down[:, index]: the neuron's output direction, float64 [n_embd]."""
        e, u = self.info.expert_of(int(index))
        return self._part(int(e))[:, int(u)].astype(np.float64)


def neuron_name(model: Model, index: int) -> Dict[str, int]:
    """{"expert", "unit"} of a flat neuron index on a mixture-of-experts model (the shared expert is
    expert n_expert); {} on a dense model."""
    if not model.info.is_moe:
        return {}
    e, u = model.info.expert_of(int(index))
    return {"expert": int(e), "unit": int(u)}


def save_calibration(cal: NeatCalibration, path: Union[str, os.PathLike]) -> None:
    write_atomic(path, json.dumps(asdict(cal), indent=1).encode())


def _shipped_for(model: Model) -> Path:
    """The shipped calibration of a model known by name, or loaded by path from the same file."""
    name = SHIPPED.get(model.info.name)
    if name is not None:
        return shipped_file(name)
    sha = fingerprint(model)["sha256"]
    for name in SHIPPED.values():
        try:
            if json.loads(shipped_file(name).read_text())["model"]["sha256"] == sha:
                return shipped_file(name)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise ValueError(f"no shipped NEAT calibration for {model.info.name!r} (shipped: {', '.join(SHIPPED)}); "
                     "make one with `neurotap neat calibrate`")


def load_calibration(source: Any, model: Model) -> NeatCalibration:
    """A calibration object, a JSON path, or "default" (the shipped one for the model). Refuses a
    calibration made for another model file (its neurons would mean nothing here)."""
    if isinstance(source, NeatCalibration):
        cal, where = source, "the given calibration"
    else:
        path = Path(str(source))
        if str(source) == "default":
            path = _shipped_for(model)
        where = str(path)
        cal = _from_dict(read_calibration_json(path, "NEAT"), path)
    check_calibrated_for(cal.model, model, where, "neurotap neat calibrate")
    return cal


def _from_dict(d: Any, path: Path) -> NeatCalibration:
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: not a valid NEAT calibration ({what})")

    if not isinstance(d, dict):
        raise bad("top level is not an object")
    if d.get("version") != VERSION:
        raise bad(f"version {d.get('version')!r}, this neurotap reads version {VERSION}")
    try:
        neurons = [(int(a), int(b)) for a, b in d["neurons"]]
        reference = [float(x) for x in d["reference"]]
        cal = NeatCalibration(
            neurons=neurons, reference=reference, exit_similarity=float(d["exit_similarity"]),
            ban_similarity=float(d["ban_similarity"]), magnitude=float(d["magnitude"]),
            line_starts_only=bool(d["line_starts_only"]), marker=str(d["marker"]),
            answer_prefix=str(d.get("answer_prefix", "")), ban_words=[str(w) for w in d["ban_words"]],
            model=dict(d["model"]), details=dict(d.get("details", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"missing or malformed field: {e}") from None
    if not neurons or len(neurons) != len(reference):
        raise bad("neurons and reference must be non-empty and of equal length")
    if any(not (0 <= x < 2**31) for pair in neurons for x in pair):
        raise bad("a neuron's layer or index is negative or beyond 2**31")
    if not all(math.isfinite(x) for x in reference + [cal.exit_similarity, cal.ban_similarity, cal.magnitude]):
        raise bad("non-finite values")
    return cal


# -- calibration -------------------------------------------------------------------------
class Scorer:
    """log p(marker) from the final residual stream h: RMSNorm (with the model's output_norm
    weight and epsilon), then the unembedding, in float64 where it matters."""

    def __init__(self, model: Model):
        path = model.info.path
        arch = model.info.architecture
        self.eps = float(_native.gguf_float(path, f"{arch}.attention.layer_norm_rms_epsilon"))
        self.g = _native.read_tensor_rows(path, "output_norm.weight", 0, 1)[0].astype(np.float64)
        name = "output.weight"
        try:
            _native.gguf_tensor_shape(path, name)
        except Exception:
            name = "token_embd.weight"
        self.W_U = _native.read_tensor_rows(path, name, 0, model.info.n_vocab)  # float32 [V, E]
        self.path = path
        self.model = model

    def norm(self, h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, np.float64)
        r = np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return h / r * self.g

    def logp(self, h: np.ndarray, token: int) -> np.ndarray:
        """log p(token) for each row of h ([..., E])."""
        y = self.norm(h).astype(np.float32)
        logits = (y @ self.W_U.T).astype(np.float64)
        mx = logits.max(axis=-1, keepdims=True)
        lse = mx[..., 0] + np.log(np.exp(logits - mx).sum(axis=-1))
        return logits[..., token] - lse

    def attribution(self, h: np.ndarray, a: np.ndarray, cols: np.ndarray, token: int) -> np.ndarray:
        """Per neuron, log p(token | h + a_i W_down[:, i]) - log p(token | h): NEAT's exact score,
        computed natively over the whole vocabulary (cpp/methods/neat.cpp)."""
        cols = np.ascontiguousarray(cols, dtype=np.float32)
        return np.asarray(self.model._native.neat_attribution(
            self.g.astype(np.float32).tolist(), self.eps, np.asarray(h, np.float32).tolist(),
            np.asarray(a, np.float32).tolist(), cols.ravel().tolist(), int(token), self.model.n_threads))

    def grad(self, h: np.ndarray, token: int) -> np.ndarray:
        """d log p(token) / d h at h (one row)."""
        h = np.asarray(h, np.float64)
        n = h.size
        r = math.sqrt(float(np.mean(h * h)) + self.eps)
        y = (h / r * self.g).astype(np.float32)
        logits = (self.W_U @ y).astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        p[token] -= 1.0
        dy = -(self.W_U.T.astype(np.float64) @ p)  # d log p / d y
        gy = dy * self.g
        return gy / r - h * (gy @ h) / (n * r ** 3)


def calibrate(model: Model, tasks: Sequence[Task], *, problems: int = 20, layers: Optional[Tuple[int, int]] = None,
              candidates: int = 400, keep_positive: int = 300, keep_top: int = 100, final: int = 10,
              min_vote: float = 0.6, min_com: float = 0.6, max_tokens: int = 256, marker: Optional[str] = None,
              answer_prefix: str = "", template: str = DEFAULT_PROMPT, progress: bool = True) -> NeatCalibration:
    from tqdm.auto import tqdm

    L, F = model.info.n_layers, model.info.n_ff
    lo, hi = layers if layers is not None else (L - L // 3, L)
    if not (0 <= lo < hi <= L):
        raise ValueError(f"layer range [{lo}, {hi}) is outside the model's {L} layers")
    marker_id: Optional[int] = None
    if marker is None:
        found = termination_marker(model)
        if found is not None:
            marker_text, marker_id = found
    else:
        ids = model.tokenize(marker, add_special=False, parse_special=True)
        if len(ids) != 1:
            raise ValueError(f"the termination marker {marker!r} must be a single token, got {len(ids)}")
        marker_text, marker_id = marker, ids[0]
    scorer = Scorer(model)
    W = [DownProjection(model, il) for il in range(lo, hi)]

    # Greedy traces; a trace counts when the model itself ends it (its own end token, or the marker).
    bar = tqdm(list(tasks)[:problems], desc="NEAT traces", unit="problem", disable=not progress, dynamic_ncols=True)
    ended = []
    # A marker that is text (</think>) ends the greedy trace as a stop string; an end-of-generation
    # marker ends it by itself.
    stop = [marker_text] if marker_id is not None and not model.is_eog(marker_id) else None
    for task in bar:
        prompt = [{"role": "user", "content": format_prompt(task, template)}]
        g = model.generate(prompt, temperature=0, max_tokens=max_tokens, stop=stop)
        end = g.eog_token if g.finish_reason == "eos" else (marker_id if g.finish_reason == "stop" else None)
        if end is not None and g.tokens:
            ended.append((prompt, [t for t in g.tokens if t != marker_id], int(end)))
    if marker_id is None:
        if not ended:
            raise ValueError(f"none of the {min(problems, len(tasks))} calibration problems gave a greedy answer that "
                             f"ends within {max_tokens} tokens: NEAT has no termination to learn from")
        ends = [e for _, _, e in ended]
        marker_id = max(set(ends), key=ends.count)  # the end token the model uses
        marker_text = model.token_text(marker_id)
    traces = []  # (activations [T+1, hi-lo, F] up to the marker position, h [E])
    for prompt, toks, end in ended:
        if end != marker_id:
            continue
        tr = model.trace(prompt, toks + [marker_id], capture="float32", hooks=["hook_resid_post"])
        traces.append((tr.activations[:, lo:hi].copy(), tr.residuals[-1, L - 1].astype(np.float64)))
    skipped = min(problems, len(tasks)) - len(traces)
    if len(traces) < 2:
        raise ValueError(f"only {len(traces)} of {min(problems, len(tasks))} calibration problems gave a usable "
                         f"trace (greedy answers that end with the termination marker within {max_tokens} tokens): "
                         "NEAT needs at least 2; use more or other problems")

    # First-order estimate for every neuron of the range, averaged over traces.
    est = np.zeros((hi - lo, F))
    for acts, h in traces:
        gh = scorer.grad(h, marker_id)
        a = acts[-1].astype(np.float64)
        est += np.stack([a[k] * W[k].project(gh, a[k] != 0) for k in range(hi - lo)])
    est /= len(traces)
    flat = np.argsort(-est, axis=None, kind="stable")[:candidates]
    cand = [(int(f // F), int(f % F)) for f in flat]

    # Exact scores of the candidates: log p(marker | h + a_i W_down[:, i]) - log p(marker | h).
    exact = np.zeros((len(traces), len(cand)))
    cols = np.stack([W[k].column(i) for k, i in cand])  # [C, E]
    bar = tqdm(traces, desc="NEAT exact scores", unit="trace", disable=not progress, dynamic_ncols=True)
    for t, (acts, h) in enumerate(bar):
        a = np.array([acts[-1][k, i] for k, i in cand], np.float64)
        exact[t] = scorer.attribution(h, a, cols, marker_id)
    mean_exact = exact.mean(axis=0)
    order = [j for j in np.argsort(-mean_exact, kind="stable") if mean_exact[j] > 0][:keep_positive][:keep_top]
    if not order:
        raise ValueError("no neuron raises log p(marker) on these traces: nothing to calibrate on")

    # Temporal pattern over each trace: late activation (center of mass) and agreement across traces.
    rows = []
    for j in order:
        k, i = cand[j]
        coms, ents = [], []
        for acts, _ in traces:
            x = np.abs(acts[:, k, i].astype(np.float64))
            T = len(x)
            if x.sum() <= 0 or T < 2:
                coms.append(0.0), ents.append(1.0)
                continue
            q = x / x.sum()
            coms.append(float((q * np.arange(T)).sum() / (T - 1)))
            ents.append(float(-(q[q > 0] * np.log(q[q > 0])).sum() / math.log(T)))
        vote = float((exact[:, j] > 0).mean())
        rows.append({"layer": lo + k, "index": i, "score": float(mean_exact[j]), "estimate": float(est[k, i]),
                     "vote": vote, "com": float(np.mean(coms)), "entropy": float(np.mean(ents)),
                     **neuron_name(model, i)})
    passed = [r for r in rows if r["vote"] >= min_vote and r["com"] >= min_com][:final]
    if not passed:
        raise ValueError(f"none of the top {len(rows)} neurons passed the temporal filter (vote >= {min_vote}, "
                         f"center of mass >= {min_com}) on {len(traces)} traces")
    neurons = [(r["layer"], r["index"]) for r in passed]
    at_end = np.array([[acts[-1][n[0] - lo, n[1]] for n in neurons] for acts, _ in traces], np.float64)
    ref = at_end.mean(axis=0)
    ratios = np.linalg.norm(at_end, axis=1) / np.linalg.norm(ref)
    sims = at_end @ ref / (np.linalg.norm(at_end, axis=1) * np.linalg.norm(ref) + 1e-30)
    return NeatCalibration(
        neurons=neurons, reference=[float(x) for x in ref], magnitude=float(np.percentile(ratios, 10)),
        marker=marker_text, answer_prefix=answer_prefix, model=fingerprint(model),
        details={"layers": [lo, hi], "traces": len(traces), "skipped_problems": skipped, "candidates": len(cand),
                 "neurons": passed, "top": rows, "similarity_at_termination": [float(s) for s in sims],
                 "magnitude_at_termination": [float(r) for r in ratios],
                 "magnitude_rule": "10th percentile of the calibration traces' norm ratios at termination"})
