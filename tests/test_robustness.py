"""Robustness: bad inputs, signals, lifetimes and concurrency never crash, corrupt a run or lose
finished work. Every case runs in its own Python process, so a crash (SIGSEGV, SIGABRT, a hang)
fails that case instead of killing the suite; each asserts a clear exception type and message, or
correct output."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import neurotap

NEEDS_MODEL = True  # every test here runs the real model (see conftest.py)

gguf = pytest.importorskip("gguf")

MODEL = str(neurotap.resolve("smollm2-135m"))
HEADER = f"""
import os, sys, time, json, threading, types
import numpy as np
import neurotap
MODEL = {MODEL!r}
def expect(exc, needle, fn, *a, **k):
    try:
        fn(*a, **k)
    except exc as e:
        assert needle in str(e), f"{{type(e).__name__}}: {{e}} (expected {{needle!r}})"
        return e
    raise AssertionError(f"no {{exc.__name__}} ({{needle!r}})")
"""


def run_case(body: str, timeout: float = 240, env: dict = None) -> subprocess.CompletedProcess:
    """Runs `body` in a fresh interpreter; it must end normally (no signal) and print OK."""
    code = HEADER + textwrap.dedent(body) + "\nprint('OK')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_WAIT_POLICY": "passive", **(env or {})})
    assert r.returncode == 0, f"exit {r.returncode} ({'signal ' + str(-r.returncode) if r.returncode < 0 else ''})\n" \
                              f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.rstrip().endswith("OK"), r.stdout[-2000:]
    return r


def patched_copy(tmp_path: Path, name: str, patch) -> str:
    """A copy of the default model with `patch(bytearray_view, reader)` applied."""
    src = Path(MODEL)
    reader = gguf.GGUFReader(str(src))
    data = bytearray(src.read_bytes())
    patch(data, reader)
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return str(out)


def kv_offset(reader, key: str) -> int:
    f = reader.fields[key]
    return f.parts[f.data[0]].ctypes.data - reader.data.ctypes.data


def set_f32(data: bytearray, offset: int, value: float) -> None:
    data[offset:offset + 4] = np.float32(value).tobytes()


# -- crashes that used to take the process down -------------------------------------------------

def test_tiny_context_and_a_long_prompt():
    """n_ctx=32 is padded to 256 by llama.cpp, its batch is not: a longer prompt decoded in
    batches of what llama.cpp accepts, and one beyond the context refused."""
    run_case("""
        m = neurotap.load(MODEL, n_ctx=32, n_threads=2)
        prompt = "one two three four five six seven eight nine ten " * 8   # ~80 tokens, > 32
        g = m.generate(prompt, max_tokens=4, temperature=0)
        assert g.n_tokens == 4, g
        expect(neurotap.ContextError, "exceeds the context", m.generate, "word " * 400, max_tokens=4)
        expect(neurotap.ContextError, "exceeds the context", m.sample, "word " * 400, n=2, max_tokens=4)
    """)


@pytest.mark.parametrize("bar", [False, True])
def test_ctrl_c_stops_the_native_work_at_once(bar):
    """SIGINT during a long sampling run: KeyboardInterrupt within a fraction of a second, with
    or without a progress bar, the native loop stopped before it returns, and the same model
    then generates exactly what a fresh one does."""
    child = subprocess.Popen([sys.executable, "-c", HEADER + textwrap.dedent(f"""
        m = neurotap.load(MODEL, n_ctx=1024, n_threads=2)
        ref = m.generate("The capital of France is", max_tokens=12, temperature=0).tokens
        print("READY", flush=True)
        try:
            m.sample("Tell me a long story.", n=8, max_tokens=900, ignore_eos=True, progress={bar})
            print("NOT INTERRUPTED", flush=True)
        except KeyboardInterrupt:
            print("INTERRUPTED", time.time(), flush=True)
        again = m.generate("The capital of France is", max_tokens=12, temperature=0).tokens
        assert again == ref, (again, ref)
        s = m.sample("Hi", n=2, max_tokens=8, seed=1)
        assert all(x.n_tokens > 0 for x in s)
        print("OK", flush=True)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_WAIT_POLICY": "passive"})
    try:
        assert child.stdout.readline().strip() == "READY"
        time.sleep(1.5)
        sent = time.time()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith(("INTERRUPTED", "NOT")))
    assert line.startswith("INTERRUPTED"), out
    latency = float(line.split()[1]) - sent
    assert latency < 1.0, f"KeyboardInterrupt came {latency:.2f} s after SIGINT"
    assert out.rstrip().endswith("OK")


def test_tapped_llama_closed_under_the_model():
    run_case("""
        import llama_cpp
        llm = llama_cpp.Llama(MODEL, n_ctx=256, verbose=False)
        m = neurotap.tap(llm, n_threads=2)
        assert m.generate("Hi", max_tokens=3, temperature=0).n_tokens == 3
        run = m.start_sampling("Hi", n=2, max_tokens=32)
        run.advance(2)
        llm.close()
        assert m.closed
        expect(RuntimeError, "llama_cpp.Llama was closed", m.generate, "Hi", max_tokens=3)
        expect(RuntimeError, "was closed", m.tokenize, "Hi")
        expect(RuntimeError, "was closed", run.advance)
        assert [s.n_tokens for s in run.samples()] == [2, 2]  # finished records stay readable
        expect(TypeError, "takes a llama_cpp.Llama", neurotap.tap, None)
        expect(ValueError, "no loaded model", neurotap.tap, llm)
    """)


def test_closed_and_deleted_models():
    run_case("""
        with neurotap.load(MODEL, n_threads=2, n_ctx=256) as m:
            s = m.sample("Hi", n=2, max_tokens=4, seed=1)
        expect(RuntimeError, "was closed", m.generate, "Hi", max_tokens=2)
        expect(RuntimeError, "was closed", m.start_sampling, "Hi", n=2, max_tokens=2)
        m.close()  # twice is fine
        m2 = neurotap.load(MODEL, n_threads=2, n_ctx=256)
        run = m2.start_sampling("Hi", n=2, max_tokens=16, seed=1)
        del m2  # the run keeps what it needs alive
        run.advance()
        assert all(x.n_tokens > 0 for x in run.samples())
    """)


@pytest.mark.parametrize("key,value", [
    ("llama.attention.layer_norm_rms_epsilon", float("nan")),
    ("llama.attention.layer_norm_rms_epsilon", -1e-5),
    ("llama.rope.freq_base", float("nan")),
    ("llama.rope.freq_base", 0.0),
    ("llama.rope.freq_base", float("inf")),
])
def test_bad_float_metadata_is_refused_at_load(tmp_path, key, value):
    path = patched_copy(tmp_path, "bad.gguf", lambda d, r: set_f32(d, kv_offset(r, key), value))
    run_case(f"""
        e = expect(neurotap.ModelError, {key!r}, neurotap.load, {path!r}, n_threads=2)
        assert "finite positive" in str(e)
    """)


def test_nan_weights_stop_the_run_naming_the_layer(tmp_path):
    def patch(d, r):
        t = next(t for t in r.tensors if t.name == "blk.5.ffn_norm.weight")
        set_f32(d, int(t.data_offset), float("nan"))
    path = patched_copy(tmp_path, "nan.gguf", patch)
    run_case(f"""
        m = neurotap.load({path!r}, n_threads=2, n_ctx=256)
        expect(RuntimeError, "non-finite activations from layer 5", m.generate, "Hi", max_tokens=4, temperature=0)
        expect(RuntimeError, "non-finite", m.sample, "Hi", n=4, max_tokens=8)
        expect(RuntimeError, "non-finite", m.generate, "Hi", max_tokens=4, tap=False)  # the logits guard
        run = m.start_sampling("Hi", n=2, max_tokens=8, reducers=("contributions",))
        expect(RuntimeError, "non-finite", run.advance)
        expect(RuntimeError, "failed earlier", run.advance)
        expect(RuntimeError, "non-finite", neurotap.nad.best_of_n, m, "Hi", n=4, early_stop=4, max_tokens=8)
    """)


def test_model_file_replaced_after_loading(tmp_path):
    copy = tmp_path / "m.gguf"
    copy.write_bytes(Path(MODEL).read_bytes())
    run_case(f"""
        import shutil
        m = neurotap.load({str(copy)!r}, n_threads=2, n_ctx=256)
        tmp = {str(copy)!r} + ".new"
        shutil.copy({str(copy)!r}, tmp)
        os.replace(tmp, {str(copy)!r})  # another file under the same name
        expect(RuntimeError, "changed on disk", m.sample, "Hi", n=2, max_tokens=4, reducers=("contributions",))
        assert m.generate("Hi", max_tokens=2).n_tokens == 2  # the loaded weights themselves are fine
    """)


def test_truncated_and_flipped_files_at_many_offsets(tmp_path):
    data = Path(MODEL).read_bytes()
    rng = np.random.default_rng(0)
    cuts = sorted(set([0, 4, 8, 16, 24, 100, 777, 5000, 100_000] + list(rng.integers(0, len(data), 12))))
    paths = []
    for c in cuts:
        p = tmp_path / f"cut{c}.gguf"
        p.write_bytes(data[:c])
        paths.append(str(p))
    for i in range(12):
        b = bytearray(data[:1_000_000])
        for off in rng.integers(0, 20_000, 4):
            b[off] ^= 0xFF
        p = tmp_path / f"flip{i}.gguf"
        p.write_bytes(bytes(b) + data[1_000_000:])
        paths.append(str(p))
    run_case(f"""
        ok = 0
        for p in {paths!r}:
            try:
                m = neurotap.load(p, n_threads=2, n_ctx=64)
                m.generate("Hi", max_tokens=2)  # a flip that loads must still not crash
                ok += 1
            except (neurotap.ModelError, neurotap.ContextError, RuntimeError, ValueError):
                pass
    """, timeout=600)


# -- parameters at and past their limits --------------------------------------------------------

def test_parameters_past_their_limits(tmp_path):
    run_case("""
        m = neurotap.load(MODEL, n_threads=2, n_ctx=256)
        for kw, needle in [(dict(max_tokens=2**40), "at most"), (dict(max_tokens=-1), "positive"),
                           (dict(max_tokens=True), "positive"), (dict(seed=2**40), "seed"),
                           (dict(temperature=float("nan")), "temperature"), (dict(top_k=-1), "top_k")]:
            expect(ValueError, needle, m.generate, "Hi", **kw)
        expect(ValueError, "out of range", m.generate, [2**40], max_tokens=2)
        expect(ValueError, "at most", m.sample, "Hi", n=2**33, max_tokens=2)
        expect(ValueError, "chunk", m.sample, "Hi", n=2, max_tokens=2, chunk=0, reducers=("active_sets",))
        expect(ValueError, "unknown hook", m.generate, "Hi", max_tokens=2, hooks=["blocks.0.attn.hook_z"])
        expect(TypeError, "prompt must be", m.generate, 3.5)
        cal = neurotap.neat.load_calibration("default", m)
        cal.neurons = [(2**40, 0)] + cal.neurons[1:]
        expect(ValueError, "outside", m.generate, "Hi", max_tokens=2, neat=cal)
        d = json.load(open(neurotap.core.resources.shipped_file("neat-smollm2-135m.json")))
        d["neurons"][0] = [2**40, 3]
        p = os.path.join(os.environ["TMP_CASE"], "n.json")
        json.dump(d, open(p, "w"))
        expect(ValueError, "beyond 2**31", neurotap.neat.load_calibration, p, m)
    """, env={"TMP_CASE": str(tmp_path)})


def test_task_files_that_cannot_be_checked(tmp_path):
    words = tmp_path / "words.jsonl"
    words.write_text('{"id": "a", "question": "Capital of France?", "answer": "Paris"}\n')
    run_case(f"""
        from neurotap.scoring.tasks import load_jsonl
        expect(ValueError, "words.jsonl:1: answer 'Paris' holds no number", load_jsonl, {str(words)!r})
        expect(IsADirectoryError, "is a directory", load_jsonl, {str(tmp_path)!r})
    """)


# -- outputs: checked before work, written incrementally ----------------------------------------

def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "neurotap", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_WAIT_POLICY": "passive"})


@pytest.mark.parametrize("out,needle", [("{tmp}", "is a directory"), ("/dev/stdout", "not a regular file"),
                                        ("/dev/null", "not a regular file"),
                                        ("/proc/version/r.json", "cannot write")])
def test_bad_outputs_fail_before_any_work(tmp_path, out, needle):
    out = out.format(tmp=tmp_path)
    if out.startswith("/dev/") and os.path.isfile(out):
        pytest.skip(f"{out} is a regular file in this sandbox, not a device")
    for args in (["eval", "--tasks", "arith", "--limit", "1", "-n", "2", "--out", out],
                 ["eval", "--tasks", "arith", "--limit", "1", "-n", "2", "--out", str(tmp_path / "ok.json"),
                  "--plot", out],
                 ["neat", "calibrate", "--tasks", "arith", "--problems", "2", "--out", out],
                 ["rank-models", "smollm2-135m", "smollm2-135m", "--tasks", "arith", "--out", out],
                 ["quantize", "smollm2-135m", out, "Q8_0"]):
        t0 = time.perf_counter()
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert time.perf_counter() - t0 < 30  # refused up front, not after the run
    assert not (tmp_path / "ok.json").exists()


def test_a_failing_task_keeps_the_others_and_resume_finishes(tmp_path):
    tasks = tmp_path / "t.jsonl"
    rows = [{"id": "a", "question": "What is 2 + 3?", "answer": "5"},
            {"id": "long", "question": "word " * 900 + "What is 1 + 1?", "answer": "2"},
            {"id": "c", "question": "What is 10 - 4?", "answer": "6"}]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    base = ["eval", "--tasks", str(tasks), "-n", "2", "--max-tokens", "24", "--methods", "knn,avg", "--quiet",
            "--ctx", "512", "--threads", "2"]
    r = cli(*base, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["complete"] and [t["id"] for t in rep["tasks"]] == ["a", "long", "c"]
    assert [f["id"] for f in rep["failed_tasks"]] == ["long"] and "exceeds the context" in rep["failed_tasks"][0]["error"]
    assert rep["config"]["n_tasks"] == 2 and "task long failed" in r.stdout

    # Killed after the first task: the report holds it; --resume runs only the rest, same result.
    out2 = tmp_path / "r2.json"
    child = subprocess.Popen([sys.executable, "-m", "neurotap", *base, "--out", str(out2)],
                             env={**os.environ, "OMP_WAIT_POLICY": "passive"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not out2.exists() and time.time() < deadline:
        time.sleep(0.05)
    child.kill()
    child.wait()
    partial = json.loads(out2.read_text())  # atomic: never half a file
    assert 1 <= len(partial["tasks"]) <= 3 and partial["tasks"][0]["id"] == "a"
    r = cli(*base, "--out", str(out2), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    done = json.loads(out2.read_text())
    assert done["complete"]
    strip = lambda t: {k: v for k, v in t.items() if k != "cost"}  # noqa: E731 (seconds differ)
    assert [strip(t) for t in done["tasks"]] == [strip(t) for t in rep["tasks"]]
    # Another configuration is refused instead of mixed in.
    other = [a if a != "2" or base[i - 1] != "-n" else "3" for i, a in enumerate(base)]
    r = cli(*other, "--out", str(out2), "--resume")
    assert r.returncode == 2 and "another configuration" in r.stderr


# -- concurrency and memory ---------------------------------------------------------------------

def test_two_threads_share_one_model():
    run_case("""
        m = neurotap.load(MODEL, n_threads=2, n_ctx=512)
        want_s = [s.tokens for s in m.sample("Count to five.", n=3, max_tokens=24, seed=4)]
        want_g = m.generate("Name a color.", max_tokens=12, temperature=0).tokens
        got, errors = {}, []
        def sampler(i):
            try:
                got[("s", i)] = [s.tokens for s in m.sample("Count to five.", n=3, max_tokens=24, seed=4)]
            except Exception as e:
                errors.append(e)
        def generator(i):
            try:
                got[("g", i)] = m.generate("Name a color.", max_tokens=12, temperature=0).tokens
            except Exception as e:
                errors.append(e)
        ts = [threading.Thread(target=f, args=(i,)) for i in range(2) for f in (sampler, generator)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert not errors, errors
        assert all(v == (want_s if k[0] == "s" else want_g) for k, v in got.items()), got
    """)


def test_memory_stays_flat_over_repeated_calls():
    run_case("""
        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        m = neurotap.load(MODEL, n_threads=2, n_ctx=256)
        for _ in range(10):
            m.generate("Hi", max_tokens=8); m.sample("Hi", n=4, max_tokens=8, reducers=("contributions",))
        before = rss_mb()
        for i in range(100):
            m.generate("Hi", max_tokens=8, seed=i)
            m.sample("Hi", n=4, max_tokens=8, seed=i, reducers=("contributions",))
            try:
                m.generate("x " * 400, max_tokens=4)
            except neurotap.ContextError:
                pass
        grew = rss_mb() - before
        assert grew < 40, f"resident memory grew by {grew:.0f} MB over 300 calls"
    """, timeout=600)


def test_memory_accounting_and_a_run_that_cannot_fit():
    run_case("""
        m = neurotap.load(MODEL, n_threads=2, n_ctx=500)
        mem = m.memory()
        assert mem["weights"] == m.info.size_bytes and mem["contribution_weights_mapped"] == 0
        assert mem["kv"] == 0 and m.n_ctx == 512   # generate's context is made on first use
        assert m.info.tapped_tensors[0] == "ffn_swiglu-0" and len(m.info.tapped_tensors) == m.info.n_layers
        m.generate("Hi", max_tokens=2)
        assert m.memory()["kv"] == 512 * m.info.kv_bytes_per_cell > 0 and m.n_ctx == 512  # as llama.cpp padded it
        with m.start_sampling("Hi", n=4, max_tokens=8, reducers=("contributions",)) as run:
            run.advance()
            held = m.memory()
            assert held["kv"] == (512 + 4 * 256) * m.info.kv_bytes_per_cell  # the run's context, in use
        assert held["contribution_weights_mapped"] == os.path.getsize(m.info.path)
        # A full-row capture of long answers is refused before decoding, naming the part.
        m2 = neurotap.load(MODEL, n_threads=2, n_ctx=256, max_sample_cells=1 << 24)
        avail = neurotap.runtime.memory.available_bytes()
        n = int(avail // (240 * 46080 * 4)) + 8   # float32 rows of 240 tokens each: more than fits
        e = expect(neurotap.ContextError, "the largest part is records", m2.start_sampling, "Hi", n=n,
                   max_tokens=240, capture="float32")
        assert "at most n=" in str(e)
        # NAD's set records are accounted at their compact size (below the dense bitsets), and a real
        # run's records stay within that estimate.
        per_token = neurotap.runtime.memory.record_bytes_per_token(
            m.info, counts=False, active_chunk=0, contribution_chunk=32, keep_top=False, rows=0,
            norm_inputs=False, residuals=False, logprobs=0)
        shape_8b = types.SimpleNamespace(n_layers=32, n_ff=14336, n_embd=4096)
        est_8b = neurotap.runtime.memory.record_bytes_per_token(
            shape_8b, counts=False, active_chunk=0, contribution_chunk=32, keep_top=False, rows=0,
            norm_inputs=False, residuals=False, logprobs=0)
        assert est_8b < 300 < 8 * (32 * 14336 // 64) / 32  # compact estimate, not the 1,792 B dense bitsets
        for s in m.sample("Tell me about the sea.", n=2, max_tokens=256, reducers=("contributions",), ignore_eos=True):
            assert s.contribution_sets.nbytes / 256 + 8 <= per_token, s.contribution_sets.nbytes
    """)
