"""NeuReasoner (arXiv 2604.02972): detect reasoning failures from neuron fluctuations, and correct
them while generating, without training the model.

Calibration (`calibrate`, once per model): sampled reasoning traces on tasks with checkable
answers record, per token, every middle-layer component's direct contribution to the emitted
token's logit (FFN neurons: a_i (W_U[y] . W_down[:, i]); attention heads: z_h . W_O[:, h]^T W_U[y]).
A labeller (scoring/failures.py) marks each token's failures per level. Per level the Mixture of
Neurons (MoN) is the set of components in the top-K contributors of at least `min_share` of the
failing tokens (min_share=1 is the paper's intersection over timesteps), ranked by how much more
often they are there on failing than on other tokens. The level's signal is the MoN's summed
contribution; the spectral features of its last `window` tokens (computed natively, the same code
as at run time) train a small scikit-learn MLPClassifier, evaluated on held-out traces.

Run time is native (cpp/methods/neureasoner.h, cpp/methods/neureasoner.cpp): per token, per sequence, the MoN
signals, features and MLPs; a detection rolls the step back and resamples it (intra-step), rolls
back and inserts a redirecting phrase (inter-step), or ends the reasoning (instance level).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _native
from ..core.defaults import CALIBRATE
from ..core.io import write_atomic
from ..runtime.model import Model
from ..scoring.failures import LEVELS, get_labeller, token_ends
from ..scoring.tasks import REASONING_PROMPT, Task, format_prompt
from .neat import check_calibrated_for, fingerprint, read_calibration_json, termination_marker

VERSION = 1
FEATURES = ("high_ratio", "low_ratio", "dominant_ratio", "spectral_entropy", "tv_energy")  # cpp SpectralFeature
# The paper's features per level.
LEVEL_FEATURES = {"intra": (0, 3, 4), "inter": (2, 3), "instance": (1, 3)}
ACTIONS = ("none", "resample", "redirect", "exit")
DEFAULT_ACTIONS = {"intra": "resample", "inter": "redirect", "instance": "exit"}
CALIBRATION_PROMPT = REASONING_PROMPT
FINISHED_THINKING = "Okay, I have finished thinking."  # the paper's training-free instance-level repair
REDIRECT_TEXT = "Let me redo this step carefully.\n"


@dataclass
class LevelDetector:
    enabled: bool = False
    components: List[int] = field(default_factory=list)  # i < n_ff: FFN neuron; n_ff + h: head h
    features: List[int] = field(default_factory=list)
    mlp: Dict[str, Any] = field(default_factory=dict)  # mean, scale, weights [per layer [n_in][n_out]], biases
    threshold: float = 0.5
    action: str = "none"
    scores: Dict[str, Any] = field(default_factory=dict)  # held-out precision, recall, AUROC; training counts
    reason: str = ""  # why a level is disabled


@dataclass
class NeuReasonerCalibration:
    layer: int
    window: int
    levels: Dict[str, LevelDetector]
    top_k: int = 32
    exit_text: str = ""
    redirect_text: str = REDIRECT_TEXT
    max_retries: int = 2
    max_actions: int = 8
    cooldown: int = 16
    model: Dict[str, Any] = field(default_factory=dict)
    details: Dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def with_actions(self, **actions: str) -> "NeuReasonerCalibration":
        """A copy whose levels take these actions ("none" detects and records only)."""
        levels = dict(self.levels)
        for level, action in actions.items():
            if level not in LEVELS:
                raise ValueError(f"unknown level {level!r}; levels: {', '.join(LEVELS)}")
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r} for {level}; actions: {', '.join(ACTIONS)}")
            levels[level] = replace(levels[level], action=action)
        return replace(self, levels=levels)

    def native_config(self, model: Model) -> Any:
        cfg = _native.NeuReasonerConfig()
        cfg.layer = int(self.layer)
        cfg.window = int(self.window)
        cfg.max_retries, cfg.max_actions, cfg.cooldown = int(self.max_retries), int(self.max_actions), int(self.cooldown)
        cfg.exit_tokens = model.tokenize(self.exit_text, add_special=False, parse_special=True) if self.exit_text else []
        # Without an end-of-thinking marker the exit asks for the answer line: the sample ends with it.
        cfg.exit_line = termination_marker(model) is None
        cfg.redirect_tokens = model.tokenize(self.redirect_text, add_special=False) if self.redirect_text else []
        info = model.info
        if not 0 <= cfg.layer < info.n_layers:
            raise ValueError(f"NeuReasoner layer {cfg.layer} is outside this model's {info.n_layers} layers")
        _native.spectral_features(np.zeros(cfg.window, np.float32), cfg.window)  # the window's bounds
        levels = []
        for name in LEVELS:
            d = self.levels[name]
            lv = _native.NeuReasonerLevel()
            lv.enabled = bool(d.enabled)
            if d.enabled:
                lv.components = [int(c) for c in d.components]
                lv.features = [int(f) for f in d.features]
                n_comp = info.n_ff + info.n_head
                if not lv.components or not all(0 <= c < n_comp for c in lv.components):
                    raise ValueError(f"NeuReasoner {name} components must be in [0, {n_comp}): outside this model's "
                                     f"{info.n_ff} neurons + {info.n_head} heads")
                if not lv.features or not all(0 <= f < len(FEATURES) for f in lv.features):
                    raise ValueError(f"NeuReasoner {name} features must be indices into {FEATURES}")
                lv.mlp = native_mlp(d.mlp)
                try:
                    lv.mlp.probability(np.zeros((1, len(lv.features)), np.float32))  # shapes checked natively
                except ValueError as e:
                    raise ValueError(f"NeuReasoner {name} detector: {e}") from None
                lv.threshold = float(d.threshold)
                lv.action = ACTIONS.index(d.action)
            levels.append(lv)
        cfg.levels = levels
        return cfg


def native_mlp(d: Dict[str, Any]) -> Any:
    m = _native.Mlp()
    m.mean = [float(x) for x in d["mean"]]
    m.scale = [float(x) for x in d["scale"]]
    m.weights = [[float(x) for x in np.asarray(w, dtype=np.float64).ravel()] for w in d["weights"]]
    m.biases = [[float(x) for x in b] for b in d["biases"]]
    return m


def exit_text_for(model: Model) -> str:
    """The paper's closing sentence, then the model's end-of-thinking marker where it has one
    (`</think>`), else the answer line the calibration prompt asks for."""
    marker = termination_marker(model)
    if marker is not None:
        return f"\n{FINISHED_THINKING}\n{marker[0]}\n\n"
    return f"\n{FINISHED_THINKING}\nAnswer:"


def record_config(model: Model, layer: Optional[int] = None) -> Any:
    """A native configuration that records every middle-layer component's contribution per token
    and detects nothing (what calibration traces are generated with)."""
    cfg = _native.NeuReasonerConfig()
    cfg.layer = model.info.n_layers // 2 if layer is None else int(layer)
    cfg.record = True
    cfg.levels = [_native.NeuReasonerLevel() for _ in LEVELS]
    return cfg


def save_calibration(cal: NeuReasonerCalibration, path: Union[str, os.PathLike]) -> None:
    write_atomic(path, json.dumps(asdict(cal), indent=1).encode())


def load_calibration(source: Any, model: Model) -> NeuReasonerCalibration:
    """A calibration object or a JSON path; refuses one made for another model file."""
    if isinstance(source, NeuReasonerCalibration):
        cal, where = source, "the given calibration"
    else:
        path = Path(str(source))
        where = str(path)
        cal = _from_dict(read_calibration_json(path, "NeuReasoner"), path)
    check_calibrated_for(cal.model, model, where, "neurotap neureasoner calibrate")
    cal.native_config(model)  # shapes, components and MLPs checked against this model now
    return cal


def _from_dict(d: Any, path: Path) -> NeuReasonerCalibration:
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: not a valid NeuReasoner calibration ({what})")

    if not isinstance(d, dict):
        raise bad("top level is not an object")
    if d.get("version") != VERSION:
        raise bad(f"version {d.get('version')!r}, this neurotap reads version {VERSION}")
    try:
        levels = {}
        for name in LEVELS:
            lv = d["levels"][name]
            levels[name] = LevelDetector(
                enabled=bool(lv["enabled"]), components=[int(c) for c in lv["components"]],
                features=[int(f) for f in lv["features"]], mlp=dict(lv["mlp"]), threshold=float(lv["threshold"]),
                action=str(lv["action"]), scores=dict(lv.get("scores", {})), reason=str(lv.get("reason", "")))
            if levels[name].action not in ACTIONS:
                raise ValueError(f"unknown action {levels[name].action!r}")
            if not math.isfinite(levels[name].threshold):
                raise ValueError("non-finite threshold")
        cal = NeuReasonerCalibration(
            layer=int(d["layer"]), window=int(d["window"]), levels=levels, top_k=int(d["top_k"]),
            exit_text=str(d["exit_text"]), redirect_text=str(d["redirect_text"]), max_retries=int(d["max_retries"]),
            max_actions=int(d["max_actions"]), cooldown=int(d["cooldown"]), model=dict(d["model"]),
            details=dict(d.get("details", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"missing or malformed field: {e}") from None
    return cal


# -- calibration -------------------------------------------------------------------------
@dataclass
class Trace:
    task: str
    contributions: np.ndarray  # float32 [n_tokens, n_ff + n_head]
    labels: Dict[str, np.ndarray]  # level -> bool [n_tokens]
    text: str


def record_traces(model: Model, tasks: Sequence[Task], *, n: int = 4, max_tokens: int = 256, seed: int = 0,
                  temperature: float = CALIBRATE.temperature, template: str = CALIBRATION_PROMPT, labeller: str = "arith",
                  layer: Optional[int] = None, progress: bool = True) -> List[Trace]:
    """n sampled traces per task with every middle-layer contribution per token, labelled."""
    from tqdm.auto import tqdm

    label = get_labeller(labeller)
    cfg = record_config(model, layer)
    traces: List[Trace] = []
    for i, task in enumerate(tqdm(tasks, desc="NeuReasoner traces", unit="task", disable=not progress)):
        prompt = [{"role": "user", "content": format_prompt(task, template)}]
        for s in model.sample(prompt, n=n, max_tokens=max_tokens, seed=seed * 1_000_003 + i, temperature=temperature,
                              reducers=(), neureasoner=cfg):
            text, ends = token_ends([model.token_piece(t) for t in s.tokens])
            traces.append(Trace(task=task.id, contributions=s.neureasoner_contributions,
                                labels=label(text, ends, task.answer), text=text))
    return traces


def mixture_of_neurons(traces: Sequence[Trace], level: str, *, top_k: int = 32, min_share: float = 0.5,
                       max_size: int = 32, min_size: int = 4) -> Tuple[List[int], Dict[str, Any]]:
    """The level's MoN: components among the top-K contributors of at least `min_share` of its
    failing tokens, the most failure-specific first (share on failing minus share on the others);
    at least `min_size` of them even when fewer reach the share."""
    C = traces[0].contributions.shape[1]
    fail, other = np.zeros(C), np.zeros(C)
    n_fail = n_other = 0
    for tr in traces:
        c = tr.contributions
        if len(c) == 0:
            continue
        k = min(top_k, C)
        top = np.argpartition(-c, k - 1, axis=1)[:, :k]
        y = tr.labels[level][: len(c)]
        np.add.at(fail, top[y].ravel(), 1)
        np.add.at(other, top[~y].ravel(), 1)
        n_fail += int(y.sum())
        n_other += int((~y).sum())
    if n_fail == 0:
        return [], {"failing_tokens": 0}
    share_fail = fail / n_fail
    share_other = other / max(n_other, 1)
    gap = share_fail - share_other
    order = np.argsort(-gap, kind="stable")
    chosen = [int(i) for i in order if share_fail[i] >= min_share][:max_size]
    if len(chosen) < min_size:
        chosen = [int(i) for i in order if share_fail[i] > 0][:min_size]
    return chosen, {"failing_tokens": n_fail, "other_tokens": n_other,
                    "share_failing": [round(float(share_fail[i]), 4) for i in chosen],
                    "share_other": [round(float(share_other[i]), 4) for i in chosen]}


def level_features(traces: Sequence[Trace], level: str, components: Sequence[int], features: Sequence[int],
                   window: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per token with a full window: the level's features (native, as at run time) and its label."""
    X, y = [], []
    for tr in traces:
        if len(tr.contributions) < window:
            continue
        signal = tr.contributions[:, list(components)].astype(np.float64).sum(axis=1).astype(np.float32)
        f = _native.spectral_features(signal, window)[window - 1:, list(features)]
        X.append(f)
        y.append(tr.labels[level][window - 1: len(signal)])
    if not X:
        return np.zeros((0, len(features)), np.float32), np.zeros(0, bool)
    return np.concatenate(X), np.concatenate(y)


def _scores(p: np.ndarray, y: np.ndarray, threshold: float) -> Dict[str, Any]:
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    pred = p >= threshold
    both = 0 < y.sum() < len(y)
    return {"tokens": int(len(y)), "positives": int(y.sum()),
            "precision": round(float(precision_score(y, pred, zero_division=0)), 4),
            "recall": round(float(recall_score(y, pred, zero_division=0)), 4),
            "auroc": round(float(roc_auc_score(y, p)), 4) if both else None}


def train_detector(X: np.ndarray, y: np.ndarray, *, hidden: Tuple[int, ...] = (16,), seed: int = 0,
                   min_positives: int = 20) -> Tuple[Optional[Dict[str, Any]], float, str]:
    """(MLP parameters, threshold, why not) for one level: a StandardScaler and an MLPClassifier
    trained on positives oversampled to balance the classes; the threshold maximizes F1 on the
    training tokens."""
    try:
        from sklearn.metrics import precision_recall_curve
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise ImportError("NeuReasoner calibration needs scikit-learn: pip install 'neurotap[eval]'") from e
    pos, neg = int(y.sum()), int((~y).sum())
    if pos < min_positives or neg < min_positives:
        return None, 0.5, f"too few labelled tokens to train ({pos} failing, {neg} other; need {min_positives} each)"
    scaler = StandardScaler().fit(X)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    Xs = (X - scaler.mean_) / scale
    rng = np.random.default_rng(seed)
    minority = np.flatnonzero(y if pos < neg else ~y)
    extra = rng.choice(minority, size=abs(neg - pos), replace=True)
    idx = np.concatenate([np.arange(len(y)), extra])
    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=600, random_state=seed)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(Xs[idx], y[idx])
    mlp = {"mean": scaler.mean_.tolist(), "scale": scale.tolist(),
           "weights": [w.tolist() for w in clf.coefs_], "biases": [b.tolist() for b in clf.intercepts_],
           "hidden": list(hidden)}
    p = native_mlp(mlp).probability(X.astype(np.float32))
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    threshold = float(thr[int(np.argmax(f1))]) if len(thr) else 0.5
    return mlp, float(min(max(threshold, 0.0), 1.0)), ""


def calibrate(model: Model, tasks: Sequence[Task], *, n: int = 4, max_tokens: int = 256, seed: int = 0,
              temperature: float = CALIBRATE.temperature, template: str = CALIBRATION_PROMPT, labeller: str = "arith",
              layer: Optional[int] = None, top_k: int = 32, min_share: float = 0.5, max_components: int = 32,
              window: int = 32, hidden: Tuple[int, ...] = (16,), held_out: float = 0.3,
              actions: Optional[Dict[str, str]] = None, min_auroc: float = 0.6,
              progress: bool = True) -> NeuReasonerCalibration:
    """Traces, labels, MoN and detectors for every level, scored on held-out tasks' traces. A
    level whose held-out AUROC is below `min_auroc` (or cannot be measured) keeps detecting and
    recording but takes no action: a detector no better than chance must not rewrite answers."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    if len(tasks) < 2:
        raise ValueError("NeuReasoner calibration needs at least 2 tasks (training and held-out traces)")
    _native.spectral_features(np.zeros(window, np.float32), window)  # an impossible window fails now
    traces = record_traces(model, tasks, n=n, max_tokens=max_tokens, seed=seed, temperature=temperature,
                           template=template, labeller=labeller, layer=layer, progress=progress)
    ids = sorted({t.task for t in traces})
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_held = max(1, int(round(held_out * len(ids))))
    held = set(ids[:n_held])
    train = [t for t in traces if t.task not in held]
    test = [t for t in traces if t.task in held]
    acts = {**DEFAULT_ACTIONS, **(actions or {})}
    levels: Dict[str, LevelDetector] = {}
    for level in LEVELS:
        feats = list(LEVEL_FEATURES[level])
        comps, mon = mixture_of_neurons(train, level, top_k=top_k, min_share=min_share, max_size=max_components)
        if not comps:
            levels[level] = LevelDetector(features=feats, action=acts[level],
                                          reason="no failing tokens of this level in the training traces")
            continue
        X, y = level_features(train, level, comps, feats, window)
        mlp, thr, why = train_detector(X, y, hidden=hidden, seed=seed)
        if mlp is None:
            levels[level] = LevelDetector(components=comps, features=feats, action=acts[level], reason=why,
                                          scores={"mon": mon})
            continue
        native = native_mlp(mlp)
        Xt, yt = level_features(test, level, comps, feats, window)
        scores = {"train": _scores(native.probability(X.astype(np.float32)), y, thr),
                  "held_out": _scores(native.probability(Xt.astype(np.float32)), yt, thr) if len(yt) else None,
                  "mon": mon}
        auroc = (scores["held_out"] or {}).get("auroc")
        action, reason = acts[level], ""
        if action != "none" and (auroc is None or auroc < min_auroc):
            action = "none"
            reason = (f"acts only when asked (--actions): held-out AUROC "
                      f"{'unmeasured' if auroc is None else f'{auroc:.3f}'} < {min_auroc}")
        levels[level] = LevelDetector(enabled=True, components=comps, features=feats, mlp=mlp, threshold=thr,
                                      action=action, scores=scores, reason=reason)
    cfg = record_config(model, layer)
    details = {"tasks": len(ids), "held_out_tasks": sorted(held), "traces": len(traces),
               "tokens": int(sum(len(t.contributions) for t in traces)), "n": n, "max_tokens": max_tokens,
               "temperature": temperature, "seed": seed, "labeller": labeller, "min_share": min_share,
               "template": template, "hidden": list(hidden), "components": "i < n_ff: FFN neuron i; n_ff + h: head h",
               "n_ff": model.info.n_ff, "n_head": model.info.n_head,
               "failing_tokens": {lv: int(sum(t.labels[lv].sum() for t in traces)) for lv in LEVELS}}
    if model.info.is_moe:  # name the experts of the monitored neurons (the shared expert is expert n_expert)
        details["components"] += "; an MoE neuron i is unit u of expert e (component_names)"
        details["component_names"] = {lv: [component_name(model, c) for c in levels[lv].components] for lv in levels}
    return NeuReasonerCalibration(layer=cfg.layer, window=window, levels=levels, top_k=top_k,
                                  exit_text=exit_text_for(model), model=fingerprint(model), details=details)


def component_name(model: Model, c: int) -> Dict[str, int]:
    """A monitored component by name: {"head"} for an attention head, {"neuron"} on a dense model,
    {"neuron", "expert", "unit"} on a mixture-of-experts model."""
    i = model.info
    if c >= i.n_ff:
        return {"head": int(c - i.n_ff)}
    if not i.is_moe:
        return {"neuron": int(c)}
    e, u = i.expert_of(int(c))
    return {"neuron": int(c), "expert": int(e), "unit": int(u)}


def summary(cal: NeuReasonerCalibration) -> str:
    """A table of the levels: MoN size and kind, held-out precision, recall and AUROC."""
    lines = ["| level | MoN (neurons + heads) | threshold | held-out tokens (failing) | precision | recall | AUROC | action |",
             "|---|---|---|---|---|---|---|---|"]
    n_ff = int(cal.details.get("n_ff", 0))
    for name in LEVELS:
        d = cal.levels[name]
        if not d.enabled:
            lines.append(f"| {name} | - | - | - | - | - | - | disabled: {d.reason} |")
            continue
        heads = sum(1 for c in d.components if c >= n_ff)
        h = d.scores.get("held_out") or {}
        auroc = h.get("auroc")
        lines.append(f"| {name} | {len(d.components) - heads} + {heads} | {d.threshold:.3f} | "
                     f"{h.get('tokens', 0)} ({h.get('positives', 0)}) | {h.get('precision', float('nan')):.3f} | "
                     f"{h.get('recall', float('nan')):.3f} | {'-' if auroc is None else f'{auroc:.3f}'} | {d.action}"
                     + (f" ({d.reason})" if d.reason else "") + " |")
    return "\n".join(lines)


__all__ = ["NeuReasonerCalibration", "LevelDetector", "calibrate", "load_calibration", "save_calibration",
           "record_traces", "record_config", "mixture_of_neurons", "level_features", "train_detector", "summary",
           "LEVELS", "FEATURES", "LEVEL_FEATURES", "ACTIONS", "DEFAULT_ACTIONS", "CALIBRATION_PROMPT"]
