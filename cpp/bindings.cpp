// pybind11 bindings: a thin layer over the plain C++ core. Long native work releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "contribution.h"
#include "errors.h"
#include "generator.h"
#include "gguf_file.h"
#include "log_capture.h"
#include "model.h"
#include "neat.h"
#include "parallel_sampler.h"
#include "reducers.h"
#include "tapped_context.h"

namespace py = pybind11;
using namespace neurotap;

namespace {

// Hands a std::vector to numpy without copying.
template <typename T>
py::array to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape, py::dtype dtype) {
    auto* heap = new std::vector<T>(std::move(v));
    py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
    return py::array(dtype, shape, {}, heap->data(), owner);
}

py::dict info_dict(const ModelInfo& i) {
    py::dict d;
    d["path"] = i.path;
    d["architecture"] = i.architecture;
    d["description"] = i.description;
    d["act_name"] = i.act_name;
    d["n_layer"] = i.n_layer;
    d["n_ff"] = i.n_ff;
    d["n_embd"] = i.n_embd;
    d["n_vocab"] = i.n_vocab;
    d["n_ctx_train"] = i.n_ctx_train;
    d["n_params"] = i.n_params;
    d["size_bytes"] = i.size_bytes;
    d["has_chat_template"] = i.has_chat_template;
    return d;
}

struct ContextHandle {
    std::shared_ptr<Model> model;
    std::unique_ptr<TappedContext> tc;
    Progress progress;
};

py::list neat_events(const std::vector<NeatEvent>& ev) {
    py::list out;
    for (const NeatEvent& e : ev) out.append(py::make_tuple(e.token, e.action, e.similarity, e.magnitude));
    return out;
}

py::dict result_dict(GenerateResult&& r, CaptureMode capture) {
    const auto n = static_cast<py::ssize_t>(r.tokens.size());
    const py::ssize_t L = r.n_layer, F = r.n_ff, E = r.n_embd;
    py::dict d;
    d["prompt_tokens"] = r.prompt_tokens;
    d["tokens"] = r.tokens;
    d["text"] = py::bytes(r.text);
    d["finish_reason"] = r.finish_reason;
    d["prompt_seconds"] = r.prompt_seconds;
    d["decode_seconds"] = r.decode_seconds;
    d["active_counts"] = r.active_counts.empty() && n > 0
                             ? py::object(py::none())
                             : py::object(to_numpy(std::move(r.active_counts), {n, L}, py::dtype::of<int32_t>()));
    d["activations"] = py::none();
    if (capture == CaptureMode::Float32)
        d["activations"] = to_numpy(std::move(r.acts_f32), {n, L, F}, py::dtype::of<float>());
    else if (capture == CaptureMode::Float16)
        d["activations"] = to_numpy(std::move(r.acts_f16), {n, L, F}, py::dtype("float16"));
    d["residuals"] = r.residuals.empty()
                         ? py::object(py::none())
                         : py::object(to_numpy(std::move(r.residuals), {n, L, E}, py::dtype::of<float>()));
    d["neat_events"] = neat_events(r.neat_events);
    d["neat_exit_at"] = r.neat_exit_at;
    d["eog_token"] = r.eog_token;
    d["norm_inputs"] = r.norm_inputs.empty()
                           ? py::object(py::none())
                           : py::object(to_numpy(std::move(r.norm_inputs), {n, L, E}, py::dtype::of<float>()));
    return d;
}

// A parallel sampling run with its reducers; keeps its context alive and to itself.
struct SamplingRun {
    py::object context_owner;
    std::unique_ptr<ActiveCountReducer> counts;
    std::unique_ptr<ChunkBitsetReducer> bitsets;
    std::unique_ptr<WatchReducer> watch;
    std::unique_ptr<FullRowReducer> rows;
    std::unique_ptr<ContributionReducer> contrib;
    std::unique_ptr<NeatMonitor> neat;
    std::unique_ptr<ParallelSampler> sampler;
    Progress progress;
};

py::dict sample_dict(const SamplingRun& run, int i, const ModelInfo& info) {
    const SampleState& st = run.sampler->sample(i);
    const auto n = static_cast<py::ssize_t>(st.tokens.size());
    const py::ssize_t L = info.n_layer, F = info.n_ff;
    py::dict d;
    d["index"] = i;
    d["tokens"] = st.tokens;
    d["text"] = py::bytes(st.text);
    d["finish_reason"] = st.finish_reason;
    d["live"] = st.live;
    auto copy = [](const auto& v, std::vector<py::ssize_t> shape, py::dtype dt) {
        using T = typename std::decay_t<decltype(v)>::value_type;
        return to_numpy(std::vector<T>(v), std::move(shape), dt);
    };
    // The first `count` values (zero-padded): a live sample's buffers run ahead of its committed
    // tokens (the token in flight), and chunks past the last committed token do not exist yet.
    auto first = [](const auto& src, py::ssize_t count) {
        using T = typename std::decay_t<decltype(src)>::value_type;
        std::vector<T> v(static_cast<size_t>(count), T{});
        std::copy_n(src.begin(), std::min(src.size(), v.size()), v.begin());
        return v;
    };
    // Committed tokens fill ceil(n / chunk) chunks of `words` words.
    auto chunked = [&](const std::vector<uint64_t>& bits, py::ssize_t chunk, py::ssize_t words) {
        const py::ssize_t chunks = (n + chunk - 1) / chunk;
        return to_numpy(first(bits, chunks * words), {chunks, words}, py::dtype::of<uint64_t>());
    };
    d["active_counts"] = run.counts ? py::object(copy(run.counts->counts(i), {n, L}, py::dtype::of<int32_t>()))
                                    : py::object(py::none());
    d["chunk_bitsets"] = run.bitsets ? py::object(chunked(run.bitsets->bits(i), run.bitsets->chunk(), run.bitsets->n_words()))
                                     : py::object(py::none());
    d["watched"] = run.watch ? py::object(copy(run.watch->values(i), {n, static_cast<py::ssize_t>(run.watch->n_watched())},
                                               py::dtype::of<float>()))
                             : py::object(py::none());
    d["activations"] = py::none();
    if (run.rows) {
        if (run.rows->half()) d["activations"] = copy(run.rows->rows_f16(i), {n, L, F}, py::dtype("float16"));
        else d["activations"] = copy(run.rows->rows_f32(i), {n, L, F}, py::dtype::of<float>());
    }
    if (run.contrib) {
        d["contrib_bitsets"] = chunked(run.contrib->bits(i), run.contrib->params().chunk, run.contrib->n_words());
        d["contrib_eta"] = to_numpy(first(run.contrib->eta(i), n), {n}, py::dtype::of<float>());
        d["contrib_active"] = to_numpy(first(run.contrib->n_active(i), n), {n}, py::dtype::of<int32_t>());
        if (run.contrib->params().keep_top) {
            const py::ssize_t K = static_cast<py::ssize_t>(run.contrib->top_values(i).size()) / std::max<py::ssize_t>(n, 1) / L;
            d["contrib_top_values"] = copy(run.contrib->top_values(i), {n, L, K}, py::dtype::of<float>());
            d["contrib_top_index"] = copy(run.contrib->top_index(i), {n, L, K}, py::dtype::of<int32_t>());
        }
    }
    if (run.neat) {
        d["neat_events"] = neat_events(st.neat.events);
        d["neat_exit_at"] = st.neat.exit_at;
    }
    if (!st.token_logprob.empty() || st.tokens.empty()) {
        const py::ssize_t k = n ? static_cast<py::ssize_t>(st.top_ids.size()) / n : 0;
        d["token_logprob"] = copy(st.token_logprob, {static_cast<py::ssize_t>(st.token_logprob.size())}, py::dtype::of<float>());
        d["mean_logprob"] = copy(st.mean_logprob, {static_cast<py::ssize_t>(st.mean_logprob.size())}, py::dtype::of<float>());
        d["top_ids"] = copy(st.top_ids, {n, k}, py::dtype::of<int32_t>());
        d["top_logprobs"] = copy(st.top_logprobs, {n, k}, py::dtype::of<float>());
    }
    return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "neurotap native core: FFN tap on llama.cpp";

    // Python classes for the core's errors (the Python layer re-exports them).
    static py::exception<ModelError> model_error(m, "ModelError", PyExc_ValueError);
    static py::exception<ContextError> context_error(m, "ContextError", PyExc_ValueError);
    static py::exception<RuntimeError> native_error(m, "NativeError", PyExc_RuntimeError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ModelError& e) {
            py::set_error(model_error, e.what());
        } catch (const ContextError& e) {
            py::set_error(context_error, e.what());
        } catch (const ParamError& e) {
            py::set_error(PyExc_ValueError, e.what());
        } catch (const RuntimeError& e) {
            py::set_error(native_error, e.what());
        }
    });

    install_log_capture(false);
    m.def("set_verbose", &install_log_capture, py::arg("verbose"),
          "Forward llama.cpp's log to stderr (True) or keep only errors for exception messages.");
    m.def("system_info", [] { return std::string(llama_print_system_info()); });

    m.def("gguf_summary", [](const std::string& path) {
        GgufFile f(path);
        py::dict d;
        d["architecture"] = f.architecture();
        d["n_tensors"] = f.tensors().size();
        d["file_size"] = f.file_size();
        return d;
    }, py::arg("path"), "Validate a GGUF file (magic, header, tensor bounds) and summarize it.");

    m.def("gguf_float", [](const std::string& path, const std::string& key) { return GgufFile(path).get_float(key); },
          py::arg("path"), py::arg("key"), "A float metadata value of a GGUF file.");
    m.def("gguf_tensor_shape", [](const std::string& path, const std::string& name) {
        GgufFile f(path);
        const TensorInfo* t = f.find_tensor(name);
        if (!t) throw ModelError("tensor '" + name + "' not found in " + path);
        return std::vector<int64_t>(t->ne, t->ne + 4);
    }, py::arg("path"), py::arg("name"));

    m.def("read_tensor_rows", [](const std::string& path, const std::string& name, int64_t row0, int64_t n_rows) {
        std::vector<float> v;
        int64_t ne0;
        {
            py::gil_scoped_release nogil;
            GgufFile f(path);
            const TensorInfo* t = f.find_tensor(name);
            if (!t) throw ModelError("tensor '" + name + "' not found in " + path);
            ne0 = t->ne[0];
            v = f.read_rows(name, row0, n_rows);
        }
        return to_numpy(std::move(v), {static_cast<py::ssize_t>(n_rows), static_cast<py::ssize_t>(ne0)},
                        py::dtype::of<float>());
    }, py::arg("path"), py::arg("name"), py::arg("row0"), py::arg("n_rows"),
       "Dequantized rows of a GGUF tensor (row r holds ne[0] values), read natively.");

    py::class_<Model, std::shared_ptr<Model>>(m, "Model")
        .def_static("load", [](const std::string& path, int n_gpu_layers) {
            py::gil_scoped_release nogil;
            return Model::load(path, n_gpu_layers);
        }, py::arg("path"), py::arg("n_gpu_layers") = 0)
        .def_static("borrow", [](uintptr_t ptr, const std::string& path) {
            return Model::borrow(reinterpret_cast<llama_model*>(ptr), path);
        }, py::arg("llama_model_address"), py::arg("path"))
        .def_property_readonly("info", [](const Model& mo) { return info_dict(mo.info()); })
        .def("tokenize", [](const Model& mo, const std::string& text, bool add_special, bool parse_special) {
            return mo.tokenize(text, add_special, parse_special);
        }, py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = true)
        .def("detokenize", [](const Model& mo, const std::vector<llama_token>& toks) {
            for (llama_token t : toks)
                if (t < 0 || t >= mo.info().n_vocab) throw ParamError("token id out of range: " + std::to_string(t));
            return py::bytes(mo.detokenize(toks));
        })
        .def("apply_chat_template", &Model::apply_chat_template, py::arg("messages"), py::arg("add_assistant") = true)
        .def("is_eog", &Model::is_eog)
        .def("special_tokens", [](const Model& mo) {
            py::dict d;
            d["eos"] = llama_vocab_eos(mo.vocab());
            d["eot"] = llama_vocab_eot(mo.vocab());
            return d;
        })
        .def("neat_attribution", [](const Model& mo, std::vector<float> norm_weight, float eps, std::vector<float> h,
                                    std::vector<float> a, std::vector<float> cols, int32_t token, int n_threads) {
            py::gil_scoped_release nogil;
            return neat_attribution(*mo.contribution_weights(), norm_weight, eps, h, a, cols, token, n_threads);
        }, py::arg("norm_weight"), py::arg("eps"), py::arg("h"), py::arg("a"), py::arg("cols"), py::arg("token"),
           py::arg("n_threads") = 1,
           "NEAT's exact scores: log p(token | h + a_c cols[c]) - log p(token | h), final RMSNorm + unembedding.")
        .def("token_text", [](const Model& mo, llama_token t) {
            if (t < 0 || t >= mo.info().n_vocab) throw ParamError("token id out of range: " + std::to_string(t));
            return py::bytes(llama_vocab_get_text(mo.vocab(), t));
        });

    py::class_<ContextHandle>(m, "Context")
        .def(py::init([](std::shared_ptr<Model> model, int n_ctx, int n_batch, int n_seq_max, int n_threads,
                         bool kv_unified, bool flash_attn, bool install_tap) {
            ContextParams p;
            p.n_ctx = n_ctx;
            p.n_batch = n_batch;
            p.n_seq_max = n_seq_max;
            p.n_threads = n_threads;
            p.kv_unified = kv_unified;
            p.flash_attn = flash_attn;
            p.install_tap = install_tap;
            auto c = std::make_unique<ContextHandle>();
            c->model = model;
            py::gil_scoped_release nogil;
            c->tc = std::make_unique<TappedContext>(model, p);
            return c;
        }), py::arg("model"), py::arg("n_ctx") = 4096, py::arg("n_batch") = 512, py::arg("n_seq_max") = 1,
            py::arg("n_threads") = 0, py::arg("kv_unified") = true, py::arg("flash_attn") = true,
            py::arg("install_tap") = true)
        .def_property_readonly("n_ctx", [](const ContextHandle& c) { return c.tc->n_ctx(); })
        .def_property_readonly("n_ctx_seq", [](const ContextHandle& c) { return static_cast<int>(llama_n_ctx_seq(c.tc->ctx())); })
        .def_property_readonly("n_seq_max", [](const ContextHandle& c) { return c.tc->params().n_seq_max; })
        .def_property_readonly("tapped_tensors", [](ContextHandle& c) {
            std::vector<std::string> names;
            for (int il = 0; il < c.tc->tap().n_layer(); ++il)
                names.push_back(c.tc->tap().act_name() + "-" + std::to_string(il));
            return names;
        })
        .def("progress_tokens", [](const ContextHandle& c) { return c.progress.tokens.load(); })
        .def("cancel", [](ContextHandle& c) { c.progress.cancel.store(true); })
        .def("generate", [](ContextHandle& c, const std::vector<llama_token>& prompt, int max_tokens, float temperature,
                            float top_p, int top_k, float min_p, uint32_t seed, std::vector<std::string> stop,
                            bool tap, int capture, bool capture_norm, float active_threshold,
                            std::vector<llama_token> forced, std::optional<NeatConfig> neat, bool capture_residual) {
            GenerateParams p;
            p.capture_residual = capture_residual;
            if (neat) p.neat = &*neat;
            p.max_tokens = max_tokens;
            p.sampling = {temperature, top_p, top_k, min_p, seed};
            p.stop = std::move(stop);
            p.tap = tap;
            if (capture < 0 || capture > 2) throw ParamError("capture must be 0 (none), 1 (float32) or 2 (float16)");
            p.capture = static_cast<CaptureMode>(capture);
            p.capture_norm = capture_norm;
            p.active_threshold = active_threshold;
            p.forced = std::move(forced);
            GenerateResult r;
            {
                py::gil_scoped_release nogil;
                c.progress.tokens = 0;
                c.progress.cancel = false;
                r = generate(*c.tc, prompt, p, &c.progress);
            }
            return result_dict(std::move(r), p.capture);
        }, py::arg("prompt"), py::arg("max_tokens"), py::arg("temperature"), py::arg("top_p"), py::arg("top_k"),
           py::arg("min_p"), py::arg("seed"), py::arg("stop"), py::arg("tap") = true, py::arg("capture") = 0,
           py::arg("capture_norm") = false, py::arg("active_threshold") = 0.0f,
           py::arg("forced") = std::vector<llama_token>{}, py::arg("neat") = std::nullopt,
           py::arg("capture_residual") = false);

    py::class_<NeatConfig>(m, "NeatConfig")
        .def(py::init<>())
        .def_readwrite("neurons", &NeatConfig::neurons)
        .def_readwrite("reference", &NeatConfig::reference)
        .def_readwrite("exit_similarity", &NeatConfig::exit_similarity)
        .def_readwrite("ban_similarity", &NeatConfig::ban_similarity)
        .def_readwrite("magnitude", &NeatConfig::magnitude)
        .def_readwrite("line_starts_only", &NeatConfig::line_starts_only)
        .def_readwrite("ban_tokens", &NeatConfig::ban_tokens)
        .def_readwrite("exit_tokens", &NeatConfig::exit_tokens);

    m.def("sample_seed", &sample_seed, py::arg("seed"), py::arg("index"));

    m.def("jaccard", [](py::array_t<uint64_t, py::array::c_style | py::array::forcecast> sets) {
        if (sets.ndim() != 2) throw ParamError("jaccard expects a 2-D array of bitsets [n, words]");
        const int n = static_cast<int>(sets.shape(0));
        const int64_t words = sets.shape(1);
        std::vector<double> s;
        {
            py::gil_scoped_release nogil;
            s = jaccard_matrix(sets.data(), n, words);
        }
        return to_numpy(std::move(s), {n, n}, py::dtype::of<double>());
    }, py::arg("sets"), "Jaccard similarity matrix of bitsets (rows of uint64 words), by popcount.");
    m.def("popcount", [](py::array_t<uint64_t, py::array::c_style | py::array::forcecast> sets) {
        if (sets.ndim() != 2) throw ParamError("popcount expects a 2-D array of bitsets [n, words]");
        std::vector<int64_t> out(static_cast<size_t>(sets.shape(0)));
        for (py::ssize_t i = 0; i < sets.shape(0); ++i) out[static_cast<size_t>(i)] = popcount(sets.data(i, 0), sets.shape(1));
        return to_numpy(std::move(out), {sets.shape(0)}, py::dtype::of<int64_t>());
    }, py::arg("sets"), "Set bits per row.");

    py::class_<SamplingRun>(m, "SamplingRun")
        .def(py::init([](py::object ctx_obj, const std::vector<llama_token>& prompt, int n, int max_tokens,
                         float temperature, float top_p, int top_k, float min_p, uint32_t seed,
                         std::vector<std::string> stop, bool tap, bool counts, int chunk, float threshold,
                         std::vector<std::pair<int, int>> watch, int rows, int top_logprobs, bool ignore_eos,
                         int contrib_chunk, const std::string& contrib_variant, bool contrib_keep_top,
                         int contrib_top, int contrib_eta_rank, std::optional<NeatConfig> neat) {
            auto& c = ctx_obj.cast<ContextHandle&>();
            auto run = std::make_unique<SamplingRun>();
            run->context_owner = ctx_obj;
            std::vector<Reducer*> reds;
            if (tap && counts) reds.push_back((run->counts = std::make_unique<ActiveCountReducer>(threshold)).get());
            if (tap && chunk > 0) reds.push_back((run->bitsets = std::make_unique<ChunkBitsetReducer>(chunk, threshold)).get());
            if (tap && !watch.empty()) reds.push_back((run->watch = std::make_unique<WatchReducer>(std::move(watch))).get());
            if (rows < 0 || rows > 2) throw ParamError("rows must be 0 (none), 1 (float32) or 2 (float16)");
            if (tap && rows > 0) reds.push_back((run->rows = std::make_unique<FullRowReducer>(rows == 2)).get());
            if (contrib_variant != "down" && contrib_variant != "gate")
                throw ParamError("contribution variant must be 'down' (the down projection's input) or 'gate' "
                                 "(act(gate), as in the paper's code), got '" + contrib_variant + "'");
            const bool gate = tap && contrib_chunk > 0 && contrib_variant == "gate";
            if (tap && contrib_chunk > 0) {
                ContributionParams cp;
                cp.chunk = contrib_chunk;
                cp.top_per_layer = contrib_top;
                cp.eta_rank = contrib_eta_rank;
                cp.gate_variant = gate;
                cp.gelu = c.tc->model().info().act_name == "ffn_geglu";
                cp.keep_top = contrib_keep_top;
                cp.n_threads = c.tc->params().n_threads;
                std::shared_ptr<const ContributionWeights> w;
                {
                    py::gil_scoped_release nogil;
                    w = c.tc->model().contribution_weights();
                }
                reds.push_back((run->contrib = std::make_unique<ContributionReducer>(std::move(w), cp)).get());
            }
            if (neat) {
                if (!tap) throw ParamError("NEAT watches neurons: it needs the tap on");
                const ModelInfo& mi = c.tc->model().info();
                run->neat = std::make_unique<NeatMonitor>(*neat, mi.n_layer, mi.n_ff, mi.n_vocab);
                reds.push_back(run->neat.get());
            }
            SampleParams p;
            p.neat = run->neat.get();
            p.n = n;
            p.max_tokens = max_tokens;
            p.sampling = {temperature, top_p, top_k, min_p, seed, ignore_eos};
            p.stop = std::move(stop);
            p.tap = tap;
            p.top_logprobs = top_logprobs;
            c.tc->tap().set_capture_norm(false);
            c.tc->tap().set_capture_gate(gate);
            c.tc->tap().set_capture_residual(false);
            run->sampler = std::make_unique<ParallelSampler>(*c.tc, prompt, std::move(p), std::move(reds));
            return run;
        }), py::arg("context"), py::arg("prompt"), py::arg("n"), py::arg("max_tokens"), py::arg("temperature"),
            py::arg("top_p"), py::arg("top_k"), py::arg("min_p"), py::arg("seed"), py::arg("stop"), py::arg("tap"),
            py::arg("counts"), py::arg("chunk"), py::arg("threshold"), py::arg("watch"), py::arg("rows"),
            py::arg("top_logprobs"), py::arg("ignore_eos") = false, py::arg("contrib_chunk") = 0,
            py::arg("contrib_variant") = "down", py::arg("contrib_keep_top") = false, py::arg("contrib_top") = 64,
            py::arg("contrib_eta_rank") = 500, py::arg("neat") = std::nullopt)
        .def("advance", [](SamplingRun& r, int until) {
            py::gil_scoped_release nogil;
            r.progress.cancel = false;
            r.progress.live = r.sampler->n_live();
            return r.sampler->advance(until, &r.progress);
        }, py::arg("until"))
        .def("stop", [](SamplingRun& r, const std::vector<int>& which) { r.sampler->stop(which); })
        .def("cancel", [](SamplingRun& r) { r.progress.cancel.store(true); })
        .def("progress_tokens", [](const SamplingRun& r) { return r.progress.tokens.load(); })
        .def("progress_live", [](const SamplingRun& r) { return r.progress.live.load(); })
        .def_property_readonly("n", [](const SamplingRun& r) { return r.sampler->n(); })
        .def_property_readonly("n_live", [](const SamplingRun& r) { return r.sampler->n_live(); })
        .def_property_readonly("n_prompt", [](const SamplingRun& r) { return r.sampler->n_prompt(); })
        .def_property_readonly("tokens_sampled", [](const SamplingRun& r) { return r.sampler->tokens_sampled(); })
        .def_property_readonly("decode_steps", [](const SamplingRun& r) { return r.sampler->decode_steps(); })
        .def_property_readonly("prompt_seconds", [](const SamplingRun& r) { return r.sampler->prompt_seconds(); })
        .def_property_readonly("decode_seconds", [](const SamplingRun& r) { return r.sampler->decode_seconds(); })
        .def_property_readonly("sample_seconds", [](const SamplingRun& r) { return r.sampler->sample_seconds(); })
        .def_property_readonly("contrib_tokens", [](const SamplingRun& r) {
            return r.contrib ? r.contrib->tokens_processed() : int64_t{0};
        })
        .def_property_readonly("contrib_cache", [](const SamplingRun& r) {
            return r.contrib ? std::make_pair(r.contrib->cache_hits(), r.contrib->cache_misses())
                             : std::make_pair(int64_t{0}, int64_t{0});
        }, "(token ids whose projection was cached, computed)")
        .def_property_readonly("contrib_seconds", [](const SamplingRun& r) {
            return r.contrib ? std::make_pair(r.contrib->seconds(), r.contrib->dot_seconds()) : std::make_pair(0.0, 0.0);
        }, "(seconds in the contribution pass, of which dot products)")
        .def("sample", [](const SamplingRun& r, int i) {
            if (i < 0 || i >= r.sampler->n()) throw ParamError("sample index out of range: " + std::to_string(i));
            auto& c = r.context_owner.cast<ContextHandle&>();
            return sample_dict(r, i, c.tc->model().info());
        });
}
