// pybind11 bindings: a thin layer over the plain C++ core. Long native work releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>

#include "base/errors.h"
#include "base/gguf_file.h"
#include "base/log_capture.h"
#include "kernels/kernels.h"
#include "methods/neat.h"
#include "methods/neureasoner.h"
#include "reducers/contribution.h"
#include "reducers/jaccard.h"
#include "reducers/reducers.h"
#include "reducers/set_record.h"
#include "run/run.h"
#include "runtime/batcher.h"
#include "runtime/ffn_tap.h"
#include "runtime/model.h"
#include "runtime/tapped_context.h"
#include "weights/mapped_weights.h"

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

// Chunks start .. stop-1 of a record as dense bitsets [stop - start, words].
py::array dense_rows(const SetRecord& r, int64_t start, int64_t stop) {
    const int64_t W = r.n_words();
    std::vector<uint64_t> out(static_cast<size_t>((stop - start) * W), 0);
    {
        py::gil_scoped_release nogil;
        SetDecoder d(r);
        while (d.position() < start) d.skip();
        for (int64_t c = start; c < stop; ++c) d.next_or(out.data() + static_cast<size_t>((c - start) * W));
    }
    return to_numpy(std::move(out), {static_cast<py::ssize_t>(stop - start), static_cast<py::ssize_t>(W)},
                    py::dtype::of<uint64_t>());
}

// How many leading chunks `chunks` names: None for all, a negative count as in a slice.
int64_t prefix(const SetRecord& r, std::optional<int64_t> chunks) {
    const int64_t C = r.n_chunks();
    const int64_t k = chunks.value_or(C);
    return std::clamp<int64_t>(k < 0 ? C + k : k, 0, C);
}

// A record from outside the encoder is decoded once, so later reads cannot meet malformed bytes.
void decode_all_checked(const SetRecord& r) {
    SetDecoder d(r);
    std::vector<uint32_t> keys;
    while (d.position() < r.n_chunks()) d.next(keys);
}

py::dict info_dict(const ModelInfo& i) {
    py::dict d;
    d["path"] = i.path;
    d["architecture"] = i.architecture;
    d["description"] = i.description;
    d["act_name"] = i.act_name;
    d["n_layers"] = i.n_layers;
    d["n_ff"] = i.n_ff;
    d["n_embd"] = i.n_embd;
    d["n_vocab"] = i.n_vocab;
    d["n_ctx_train"] = i.n_ctx_train;
    d["n_params"] = i.n_params;
    d["size_bytes"] = i.size_bytes;
    d["has_chat_template"] = i.has_chat_template;
    d["kv_bytes_per_cell"] = i.kv_bytes_per_cell;
    d["repackable_weights"] = i.repackable_weights;
    d["n_head"] = i.n_head;
    d["head_dim_v"] = i.head_dim_v > 0 ? i.head_dim_v : (i.n_head > 0 ? i.n_embd / i.n_head : 0);
    d["n_expert"] = i.moe.n_expert;
    d["n_expert_used"] = i.moe.n_used;
    d["n_ff_exp"] = i.moe.n_ff_exp;
    d["n_ff_shexp"] = i.moe.n_ff_shexp;
    return d;
}

struct ContextHandle {
    std::shared_ptr<Model> model;
    std::unique_ptr<TappedContext> tc;
};

const char* neat_action_name(int a) {
    static const char* names[] = {"continue", "ban", "exit"};
    return a >= 0 && a < 3 ? names[a] : "";
}
const char* nr_action_name(int a) {
    static const char* names[] = {"none", "resample", "redirect", "exit"};
    return a >= 0 && a < 4 ? names[a] : "";
}
const char* nr_level_name(int l) {
    static const char* names[] = {"intra", "inter", "instance"};
    return l >= 0 && l < kNrLevels ? names[l] : "";
}

// An event record also reads as the tuple of its fields, in order (e[1], unpacking, ==), as the
// bare tuples it replaces did.
template <typename E>
void tuple_like(py::class_<E>& c, py::tuple (*fields)(const E&)) {
    c.def("__len__", [fields](const E& e) { return py::len(fields(e)); })
        .def("__getitem__", [fields](const E& e, py::object i) {
            const py::tuple t = fields(e);
            return py::object(t[i]);  // an object, not an accessor into the temporary tuple
        })
        .def("__iter__", [fields](const E& e) { return py::iter(fields(e)); })
        .def("__eq__", [fields](const E& e, py::object o) {
            if (py::isinstance<E>(o)) return fields(e).equal(fields(o.cast<const E&>()));
            return py::isinstance<py::tuple>(o) && fields(e).equal(o);
        })
        .def("__hash__", [fields](const E& e) { return py::hash(fields(e)); });
}
py::tuple neat_fields(const NeatEvent& e) { return py::make_tuple(e.token, e.action, e.similarity, e.magnitude); }
py::tuple nr_fields(const NrEvent& e) {
    return py::make_tuple(e.token, e.level, e.action, e.probability, e.rollback_to, e.seed);
}

// A run and the context it decodes in (kept alive while the run lives).
struct RunHandle {
    py::object context_owner;
    std::unique_ptr<Run> run;
    Progress progress;
};

// A batcher, its context and its member runs (kept alive while they are members).
struct BatcherHandle {
    py::object context_owner;
    std::vector<std::pair<py::object, RunHandle*>> members;
    std::unique_ptr<Batcher> batcher;  // last: gone before the members it points into
    Progress progress;
};

py::dict sample_dict(const Run& run, int i) {
    const SampleState& st = run.loop().sample(i);
    const ModelInfo& info = run.model_info();
    const auto n = static_cast<py::ssize_t>(st.tokens.size());
    const py::ssize_t L = info.n_layers, F = info.n_ff;
    py::dict d;
    d["index"] = i;
    d["tokens"] = st.tokens;
    d["text"] = py::bytes(st.text);
    d["finish_reason"] = st.finish_reason();
    d["live"] = st.live;
    d["eog_token"] = st.eog_token;
    d["piece_end"] = to_numpy(std::vector<uint32_t>(st.piece_end.begin(), st.piece_end.begin() + std::min<size_t>(st.piece_end.size(), st.tokens.size())),
                              {static_cast<py::ssize_t>(std::min<size_t>(st.piece_end.size(), st.tokens.size()))}, py::dtype::of<uint32_t>());
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
    // Committed tokens fill ceil(n / chunk) chunks.
    auto chunks = [&](int64_t chunk) { return (static_cast<int64_t>(n) + chunk - 1) / chunk; };
    auto hidden = [&](const HiddenRowReducer* h) {
        if (!h) return py::object(py::none());
        const py::ssize_t E = info.n_embd;
        return py::object(to_numpy(first(h->rows(i), n * L * E), {n, L, E}, py::dtype::of<float>()));
    };
    d["active_counts"] = run.counts() ? py::object(copy(run.counts()->counts(i), {n, L}, py::dtype::of<int32_t>()))
                                      : py::object(py::none());
    d["active_sets"] = run.active_sets()
                           ? py::cast(run.active_sets()->record(i, chunks(run.active_sets()->chunk())))
                           : py::object(py::none());
    d["watched"] = run.watch() ? py::object(copy(run.watch()->values(i),
                                                 {n, static_cast<py::ssize_t>(run.watch()->n_watched())},
                                                 py::dtype::of<float>()))
                               : py::object(py::none());
    d["activations"] = py::none();
    if (run.mlp_post()) {
        if (run.mlp_post()->half()) d["activations"] = copy(run.mlp_post()->rows_f16(i), {n, L, F}, py::dtype("float16"));
        else d["activations"] = copy(run.mlp_post()->rows_f32(i), {n, L, F}, py::dtype::of<float>());
    }
    d["norm_inputs"] = hidden(run.ln2_normalized());
    d["residuals"] = hidden(run.resid_post());
    if (const ContributionReducer* c = run.contributions()) {
        d["contribution_sets"] = py::cast(c->record(i, chunks(c->params().chunk)));
        d["contribution_eta"] = to_numpy(first(c->eta(i), n), {n}, py::dtype::of<float>());
        d["contribution_counts"] = to_numpy(first(c->n_active(i), n), {n}, py::dtype::of<int32_t>());
        if (c->params().keep_top) {
            const py::ssize_t K = c->params().top_per_layer;
            d["contribution_top_values"] = to_numpy(first(c->top_values(i), n * L * K), {n, L, K}, py::dtype::of<float>());
            d["contribution_top_index"] = to_numpy(first(c->top_index(i), n * L * K), {n, L, K}, py::dtype::of<int32_t>());
        }
    }
    if (const MoeRouteReducer* rt = run.routing()) {
        const py::ssize_t U = rt->layout().n_used, X = rt->layout().n_expert;
        d["routing_ids"] = to_numpy(first(rt->ids(i), n * L * U), {n, L, U}, py::dtype::of<int32_t>());
        d["routing_weights"] = to_numpy(first(rt->weights(i), n * L * U), {n, L, U}, py::dtype::of<float>());
        d["shexp_gate"] = rt->layout().n_ff_shexp > 0
                              ? py::object(to_numpy(first(rt->shexp_gate(i), n * L), {n, L}, py::dtype::of<float>()))
                              : py::object(py::none());
        if (rt->probs())
            d["router_probs"] = to_numpy(first(rt->router_probs(i), n * L * X), {n, L, X}, py::dtype::of<float>());
    }
    if (const NeatMonitor* neat = run.neat()) {
        d["neat_events"] = py::cast(neat->events(i));
        d["neat_exit_at"] = neat->exit_at(i);
    }
    if (const NeuReasonerMonitor* nr = run.neureasoner()) {
        d["neureasoner_events"] = py::cast(nr->events(i));
        d["neureasoner_exit_at"] = nr->exit_at(i);
        d["neureasoner_signals"] = to_numpy(first(nr->signals(i), n * kNrLevels), {n, kNrLevels}, py::dtype::of<float>());
        d["neureasoner_probs"] = to_numpy(first(nr->probs(i), n * kNrLevels), {n, kNrLevels}, py::dtype::of<float>());
        if (nr->config().record) {
            const py::ssize_t C = nr->n_components();
            d["neureasoner_contributions"] = to_numpy(first(nr->recorded(i), n * C), {n, C}, py::dtype::of<float>());
        }
    }
    if (run.options().sampling.top_logprobs > 0) {
        // Rows of the positions this run sampled: a handed-off sample's earlier tokens were
        // recorded by the race it came from, so there are fewer rows than tokens.
        const py::ssize_t m = static_cast<py::ssize_t>(st.token_logprob.size());
        const py::ssize_t k = m ? static_cast<py::ssize_t>(st.top_ids.size()) / m
                                : static_cast<py::ssize_t>(run.options().sampling.top_logprobs);  // no rows yet
        d["token_logprob"] = copy(st.token_logprob, {m}, py::dtype::of<float>());
        d["mean_logprob"] = copy(st.mean_logprob, {static_cast<py::ssize_t>(st.mean_logprob.size())}, py::dtype::of<float>());
        d["top_ids"] = copy(st.top_ids, {m, k}, py::dtype::of<int32_t>());
        d["top_logprobs"] = copy(st.top_logprobs, {m, k}, py::dtype::of<float>());
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

    m.def("devices", [] {
        py::list out;
        for (const DeviceInfo& d : list_devices()) {
            py::dict e;
            e["name"] = d.name;
            e["description"] = d.description;
            e["type"] = d.type;
            e["memory_free"] = d.memory_free;
            e["memory_total"] = d.memory_total;
            out.append(e);
        }
        return out;
    }, "The devices of the loaded llama.cpp build (name, description, type, memory_free, memory_total).");
    m.def("tap_reads", [] {
        const TapReads r = tap_reads();
        return py::make_tuple(r.host, r.device);
    }, "Tapped tensors read so far in this process: (from host memory, copied from device buffers).");

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
        .def_static("load", [](const std::string& path, int n_gpu_layers, const std::string& device) {
            py::gil_scoped_release nogil;
            return Model::load(path, n_gpu_layers, device);
        }, py::arg("path"), py::arg("n_gpu_layers") = 0, py::arg("device") = "")
        .def_static("borrow", [](uintptr_t ptr, const std::string& path) {
            return Model::borrow(reinterpret_cast<llama_model*>(ptr), path);
        }, py::arg("llama_model_address"), py::arg("path"))
        .def_property_readonly("info", [](const Model& mo) { return info_dict(mo.info()); })
        .def("close", [](Model& mo) {
            py::gil_scoped_release nogil;  // waits for a decode in flight on another thread
            mo.close();
        }, "Free the contexts made on this model, then its weights if it owns them; later use raises.")
        .def_property_readonly("closed", &Model::closed)
        .def_property_readonly("contribution_weights_mapped", [](const Model& mo) { return mo.contribution_weights_loaded(); },
                               "Bytes of the model file mapped for contributions (0 until the first contribution run).")
        .def("check_file_unchanged", &Model::check_file_unchanged,
             "RuntimeError when the file was replaced or changed on disk since it was loaded.")
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
        })
        .def("token_piece", [](const Model& mo, llama_token t) {
            if (t < 0 || t >= mo.info().n_vocab) throw ParamError("token id out of range: " + std::to_string(t));
            return py::bytes(mo.token_piece(t));
        }, "The bytes a token adds to generated text (as the decode loop appends them).");

    py::class_<SavedSeq>(m, "SavedSeq", "A sequence's KV cells saved aside (Context.save_seq), in host memory")
        .def_property_readonly("nbytes", &SavedSeq::bytes, "host memory it holds")
        .def_property_readonly("tokens", [](const SavedSeq& v) { return v.tokens; },
                               "the tokens whose cells it holds (positions 0..)");

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
        .def_property_readonly("kv_unified", [](const ContextHandle& c) { return c.tc->params().kv_unified; },
                               "one KV stream shared by the sequences (else a stream per sequence)")
        .def_property_readonly("joint_prompts", [](const ContextHandle& c) { return c.tc->joint_prompts(); },
                               "whether joining runs' prompts may be decoded together, every row as alone")
        .def_property_readonly("reused_cells", [](const ContextHandle& c) { return c.tc->reused_cells(); },
                               "prompt cells reused instead of decoded, over this context's life")
        .def("seq_tokens", [](const ContextHandle& c, int s) { return c.tc->seq_tokens(s); }, py::arg("seq"),
             "the tokens whose KV cells sequence `seq` holds (positions 0..), as far as they are known")
        .def("reusable_prefix", [](const ContextHandle& c, int s, const std::vector<llama_token>& prompt,
                                   const std::string& mode) {
                 return c.tc->reusable_prefix(s, prompt, parse_prompt_reuse(mode));
             }, py::arg("seq"), py::arg("prompt"), py::arg("mode") = "exact",
             "cells of sequence `seq` a run of `prompt` would reuse with prompt_reuse `mode`")
        .def("saved_reusable_prefix", [](const ContextHandle& c, const SavedSeq& saved,
                                         const std::vector<llama_token>& prompt, const std::string& mode) {
                 return c.tc->reusable_prefix(saved, prompt, parse_prompt_reuse(mode));
             }, py::arg("saved"), py::arg("prompt"), py::arg("mode") = "exact",
             "saved cells a run of `prompt` would reuse with prompt_reuse `mode`, were they restored")
        .def("save_seq", [](ContextHandle& c, int s) {
                 py::gil_scoped_release nogil;
                 return c.tc->save_seq(s);
             }, py::arg("seq"), "sequence `seq`'s KV cells and their record, copied out (the cells stay)")
        .def("restore_seq", [](ContextHandle& c, int s, const SavedSeq& saved) {
                 py::gil_scoped_release nogil;
                 c.tc->restore_seq(s, saved);
             }, py::arg("seq"), py::arg("saved"), "sequence `seq` holds exactly the saved cells afterwards")
        .def_property_readonly("reuse_by_token", [](const ContextHandle& c) { return c.tc->reuse_by_token(); },
                               "exact prompt reuse at token granularity (CPU-only build, flash attention), "
                               "else in whole n_batch chunks")
        .def_property_readonly("tapped_tensors", [](ContextHandle& c) {
            std::vector<std::string> names;
            for (int il = 0; il < c.tc->tap().n_layers(); ++il)
                names.push_back(c.tc->tap().act_name() + "-" + std::to_string(il));
            return names;
        })
        ;

    // NEAT's decisions and NeuReasoner's detections, one record each (read-only).
    py::class_<NeatEvent> neat_event(m, "NeatEvent", "One NEAT decision at a line start");
    neat_event.def_readonly("token", &NeatEvent::token, "index of the token the decision applied to")
        .def_readonly("action", &NeatEvent::action, "0 continue, 1 ban, 2 exit (action_name)")
        .def_property_readonly("action_name", [](const NeatEvent& e) { return neat_action_name(e.action); })
        .def_readonly("similarity", &NeatEvent::similarity)
        .def_readonly("magnitude", &NeatEvent::magnitude)
        .def("__repr__", [](const NeatEvent& e) {
            return "NeatEvent(token=" + std::to_string(e.token) + ", action='" + neat_action_name(e.action) +
                   "', similarity=" + std::to_string(e.similarity) + ", magnitude=" + std::to_string(e.magnitude) + ")";
        });
    tuple_like(neat_event, &neat_fields);
    py::class_<NrEvent> nr_event(m, "NeuReasonerEvent", "One NeuReasoner detection and what was done");
    nr_event.def_readonly("token", &NrEvent::token, "tokens the sample held when it was detected")
        .def_readonly("level", &NrEvent::level, "0 intra, 1 inter, 2 instance (level_name)")
        .def_property_readonly("level_name", [](const NrEvent& e) { return nr_level_name(e.level); })
        .def_readonly("action", &NrEvent::action, "0 none, 1 resample, 2 redirect, 3 exit (action_name)")
        .def_property_readonly("action_name", [](const NrEvent& e) { return nr_action_name(e.action); })
        .def_readonly("probability", &NrEvent::probability)
        .def_readonly("rollback_to", &NrEvent::rollback_to, "tokens kept by the rollback, -1 for none")
        .def_readonly("seed", &NrEvent::seed, "the sampler's new seed after a rollback, 0 for none")
        .def("__repr__", [](const NrEvent& e) {
            return "NeuReasonerEvent(token=" + std::to_string(e.token) + ", level='" + nr_level_name(e.level) +
                   "', action='" + nr_action_name(e.action) + "', probability=" + std::to_string(e.probability) +
                   ", rollback_to=" + std::to_string(e.rollback_to) + ", seed=" + std::to_string(e.seed) + ")";
        });
    tuple_like(nr_event, &nr_fields);

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

    py::class_<Mlp>(m, "Mlp", "scikit-learn's MLPClassifier (ReLU, one logistic output) behind a StandardScaler")
        .def(py::init<>())
        .def_readwrite("mean", &Mlp::mean)
        .def_readwrite("scale", &Mlp::scale)
        .def_readwrite("weights", &Mlp::weights)
        .def_readwrite("biases", &Mlp::biases)
        .def("probability", [](const Mlp& mlp, py::array_t<float, py::array::c_style | py::array::forcecast> x) {
            mlp.validate();
            if (x.ndim() != 2 || x.shape(1) != mlp.n_inputs())
                throw ParamError("probability expects [n, " + std::to_string(mlp.n_inputs()) + "] features");
            std::vector<float> out(static_cast<size_t>(x.shape(0)));
            for (py::ssize_t r = 0; r < x.shape(0); ++r) out[static_cast<size_t>(r)] = mlp.probability(x.data(r, 0));
            return to_numpy(std::move(out), {x.shape(0)}, py::dtype::of<float>());
        }, py::arg("features"), "P(failure) per row, as the run computes it.");

    py::class_<NrLevelConfig>(m, "NeuReasonerLevel")
        .def(py::init<>())
        .def_readwrite("enabled", &NrLevelConfig::enabled)
        .def_readwrite("components", &NrLevelConfig::components)
        .def_readwrite("features", &NrLevelConfig::features)
        .def_readwrite("mlp", &NrLevelConfig::mlp)
        .def_readwrite("threshold", &NrLevelConfig::threshold)
        .def_readwrite("action", &NrLevelConfig::action);

    py::class_<NeuReasonerConfig>(m, "NeuReasonerConfig")
        .def(py::init<>())
        .def_readwrite("layer", &NeuReasonerConfig::layer)
        .def_readwrite("window", &NeuReasonerConfig::window)
        .def_readwrite("levels", &NeuReasonerConfig::levels)
        .def_readwrite("record", &NeuReasonerConfig::record)
        .def_readwrite("max_retries", &NeuReasonerConfig::max_retries)
        .def_readwrite("max_actions", &NeuReasonerConfig::max_actions)
        .def_readwrite("cooldown", &NeuReasonerConfig::cooldown)
        .def_readwrite("exit_tokens", &NeuReasonerConfig::exit_tokens)
        .def_readwrite("exit_line", &NeuReasonerConfig::exit_line)
        .def_readwrite("redirect_tokens", &NeuReasonerConfig::redirect_tokens);

    m.def("spectral_features", [](py::array_t<float, py::array::c_style | py::array::forcecast> signal, int window) {
        if (signal.ndim() != 1) throw ParamError("spectral_features expects a 1-D signal");
        const SpectralWindow spec(window);
        const py::ssize_t T = signal.shape(0);
        // Row t: the window ending at token t; NaN where fewer than `window` tokens precede it.
        std::vector<float> out(static_cast<size_t>(T) * kNumSpectral, std::numeric_limits<float>::quiet_NaN());
        for (py::ssize_t t = window - 1; t < T; ++t)
            spec.features(signal.data(t - window + 1), out.data() + static_cast<size_t>(t) * kNumSpectral);
        return to_numpy(std::move(out), {T, kNumSpectral}, py::dtype::of<float>());
    }, py::arg("signal"), py::arg("window"),
       "NeuReasoner's spectral features [T, 5] (high, low, dominant ratio, entropy, TV energy) of the "
       "window ending at each token, exactly as a run computes them.");

    m.def("sample_seed", &sample_seed, py::arg("seed"), py::arg("index"));
    m.def("contribution_budget", &ContributionReducer::auto_budget, py::arg("file_bytes"), py::arg("n_samples"),
          py::arg("n_layers"), py::arg("n_ff"),
          "Bytes of the contribution reducer's projection cache, and of its queue, for n samples: 5% of "
          "the file, less where the samples' activation rows in flight take much of it.");

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

    // A sample's chunk sets, kept encoded (cpp/reducers/set_record.h); dense rows are decoded on demand.
    py::class_<SetRecord>(m, "ChunkSets",
        "Per-chunk neuron sets of one sample, kept compact (cpp/reducers/set_record.h). Indexing and numpy "
        "conversion give dense uint64 bitsets as before (bit layer * n_ff + i, little-endian words); "
        "keys() and union() read the compact form directly.")
        .def(py::init([](int64_t n_bits, py::bytes data, std::vector<int64_t> offsets, std::vector<int32_t> counts,
                         std::vector<int32_t> fresh) {
            SetRecord r;
            r.n_bits = n_bits;
            const std::string s = data;
            r.data.assign(s.begin(), s.end());
            r.offsets = std::move(offsets);
            r.counts = std::move(counts);
            r.fresh = std::move(fresh);
            r.validate();
            decode_all_checked(r);
            return r;
        }), py::arg("n_bits"), py::arg("data"), py::arg("offsets"), py::arg("counts"), py::arg("fresh"),
           "A record from its parts (as state() gives them); ValueError unless they are consistent.")
        .def_static("from_dense", [](py::array_t<uint64_t, py::array::c_style | py::array::forcecast> sets, int64_t n_bits) {
            if (sets.ndim() != 2) throw ParamError("from_dense expects a 2-D array of bitsets [chunks, words]");
            const int64_t W = sets.shape(1);
            if (n_bits < 0) n_bits = 64 * W;
            if ((n_bits + 63) / 64 != W)
                throw ParamError(std::to_string(W) + " words per set do not hold n_bits = " + std::to_string(n_bits));
            SetRecord r;
            r.n_bits = n_bits;
            {
                py::gil_scoped_release nogil;
                SetEncoder enc(n_bits);
                for (py::ssize_t c = 0; c < sets.shape(0); ++c) enc.append(sets.data(c, 0), r);
            }
            return r;
        }, py::arg("sets"), py::arg("n_bits") = -1, "Encode dense bitsets [chunks, words] (n_bits: 64 * words by default).")
        .def_property_readonly("n_bits", [](const SetRecord& r) { return r.n_bits; }, "keys per set: n_layers * n_ff")
        .def_property_readonly("n_words", &SetRecord::n_words, "uint64 words of a dense row")
        .def_property_readonly("shape", [](const SetRecord& r) { return py::make_tuple(r.n_chunks(), r.n_words()); },
                               "(chunks, words): the shape of the dense form")
        .def_property_readonly("nbytes", [](const SetRecord& r) { return r.bytes(); }, "bytes the record holds")
        .def_property_readonly("counts", [](const SetRecord& r) {
            return to_numpy(std::vector<int32_t>(r.counts), {static_cast<py::ssize_t>(r.counts.size())}, py::dtype::of<int32_t>());
        }, "keys per chunk")
        .def("__len__", [](const SetRecord& r) { return r.n_chunks(); })
        .def("__getitem__", [](const SetRecord& r, int64_t c) {
            if (c < 0) c += r.n_chunks();
            if (c < 0 || c >= r.n_chunks()) throw py::index_error("chunk index out of range");
            return py::array(dense_rows(r, c, c + 1).attr("reshape")(r.n_words()));
        }, py::arg("chunk"), "Chunk c as a dense bitset (decodes chunks 0 .. c: iterate with a slice or keys()).")
        .def("__getitem__", [](const SetRecord& r, const py::slice& sl) {
            py::ssize_t start, stop, step, len;
            if (!sl.compute(static_cast<py::ssize_t>(r.n_chunks()), &start, &stop, &step, &len)) throw py::error_already_set();
            if (step == 1) return dense_rows(r, start, start + len);
            py::object all = dense_rows(r, 0, r.n_chunks());
            return py::array(all[py::object(sl)]);
        }, py::arg("chunks"), "Dense bitsets [k, words] of a slice of chunks (decoded in one pass).")
        .def("__array__", [](const SetRecord& r, py::object dtype, py::object copy) {
            if (!copy.is_none() && !copy.cast<bool>()) throw ParamError("chunk sets are encoded: a dense array is always a copy");
            py::array a = dense_rows(r, 0, r.n_chunks());
            return dtype.is_none() ? a : py::array(a.attr("astype")(dtype));
        }, py::arg("dtype") = py::none(), py::arg("copy") = py::none())
        .def("to_dense", [](const SetRecord& r) { return dense_rows(r, 0, r.n_chunks()); },
             "Every chunk as dense bitsets: uint64 [chunks, words].")
        .def("keys", [](const SetRecord& r, int64_t start, std::optional<int64_t> stop) {
            const int64_t C = r.n_chunks();
            const int64_t e = std::clamp<int64_t>(stop.value_or(C), 0, C), b = std::clamp<int64_t>(start, 0, e);
            std::vector<std::vector<uint32_t>> keys(static_cast<size_t>(e - b));
            {
                py::gil_scoped_release nogil;
                SetDecoder d(r);
                while (d.position() < b) d.skip();
                for (auto& k : keys) d.next(k);
            }
            py::list out;
            for (auto& k : keys) {
                const auto len = static_cast<py::ssize_t>(k.size());
                out.append(to_numpy(std::move(k), {len}, py::dtype::of<uint32_t>()));
            }
            return out;
        }, py::arg("start") = 0, py::arg("stop") = py::none(),
           "The keys (layer * n_ff + i) of chunks start .. stop-1, ascending, one uint32 array per chunk.")
        .def("union", [](const SetRecord& r, std::optional<int64_t> chunks) {
            std::vector<uint64_t> words;
            {
                py::gil_scoped_release nogil;
                SetDecoder d(r);
                for (int64_t c = prefix(r, chunks); c > 0; --c) d.skip();
                words = d.seen();
            }
            const auto W = static_cast<py::ssize_t>(words.size());
            return to_numpy(std::move(words), {W}, py::dtype::of<uint64_t>());
        }, py::arg("chunks") = py::none(),
           "The union of the first `chunks` chunks (all by default; a negative count as in a slice) as "
           "dense uint64 words; read from the neurons each chunk adds, not from the chunks' own sets.")
        .def("union_size", [](const SetRecord& r, std::optional<int64_t> chunks) { return r.union_size(prefix(r, chunks)); },
             py::arg("chunks") = py::none(), "Keys in the union of the first `chunks` chunks, without decoding.")
        .def("state", [](const SetRecord& r) {
            auto arr = [](const auto& v) {
                using T = typename std::decay_t<decltype(v)>::value_type;
                return to_numpy(std::vector<T>(v), {static_cast<py::ssize_t>(v.size())}, py::dtype::of<T>());
            };
            return py::make_tuple(r.n_bits, py::bytes(reinterpret_cast<const char*>(r.data.data()), r.data.size()),
                                  arr(r.offsets), arr(r.counts), arr(r.fresh));
        }, "(n_bits, data, offsets, counts, fresh): the encoded parts (layout in cpp/reducers/set_record.h).")
        .def("__eq__", [](const SetRecord& a, const SetRecord& b) { return a == b; }, py::is_operator())
        .def("__repr__", [](const SetRecord& r) {
            return "ChunkSets(" + std::to_string(r.n_chunks()) + " chunks of " + std::to_string(r.n_bits) + " keys, " +
                   std::to_string(r.bytes()) + " bytes)";
        })
        .def(py::pickle(
            [](const SetRecord& r) {
                return py::make_tuple(r.n_bits, py::bytes(reinterpret_cast<const char*>(r.data.data()), r.data.size()),
                                      r.offsets, r.counts, r.fresh);
            },
            [](const py::tuple& t) {
                if (t.size() != 5) throw ParamError("ChunkSets state: expected 5 fields");
                SetRecord r;
                r.n_bits = t[0].cast<int64_t>();
                const std::string s = t[1].cast<std::string>();
                r.data.assign(s.begin(), s.end());
                r.offsets = t[2].cast<std::vector<int64_t>>();
                r.counts = t[3].cast<std::vector<int32_t>>();
                r.fresh = t[4].cast<std::vector<int32_t>>();
                r.validate();
                decode_all_checked(r);
                return r;
            }));

    // One struct with every option of a run (the C++ SampleParams, RecordOptions and NEAT).
    auto get_mlp_post = [](const RunOptions& o) { return static_cast<int>(o.record.mlp_post); };
    auto set_mlp_post = [](RunOptions& o, int v) {
        if (v < 0 || v > 2) throw ParamError("mlp_post (capture) must be 0 (none), 1 (float32) or 2 (float16)");
        o.record.mlp_post = static_cast<RowFormat>(v);
    };
    auto get_ln2 = [](const RunOptions& o) { return o.record.ln2_normalized; };
    auto set_ln2 = [](RunOptions& o, bool v) { o.record.ln2_normalized = v; };
    auto get_resid = [](const RunOptions& o) { return o.record.resid_post; };
    auto set_resid = [](RunOptions& o, bool v) { o.record.resid_post = v; };
    py::class_<RunOptions>(m, "RunOptions")
        .def("validate", &RunOptions::validate, "ValueError naming the first option out of range (Run checks it too)")
        .def(py::init<>())
        .def_property("n", [](const RunOptions& o) { return o.sampling.n; }, [](RunOptions& o, int v) { o.sampling.n = v; })
        .def_property("max_tokens", [](const RunOptions& o) { return o.sampling.max_tokens; },
                      [](RunOptions& o, int v) { o.sampling.max_tokens = v; })
        .def_property("temperature", [](const RunOptions& o) { return o.sampling.temperature; },
                      [](RunOptions& o, float v) { o.sampling.temperature = v; })
        .def_property("top_p", [](const RunOptions& o) { return o.sampling.top_p; },
                      [](RunOptions& o, float v) { o.sampling.top_p = v; })
        .def_property("top_k", [](const RunOptions& o) { return o.sampling.top_k; },
                      [](RunOptions& o, int v) { o.sampling.top_k = v; })
        .def_property("min_p", [](const RunOptions& o) { return o.sampling.min_p; },
                      [](RunOptions& o, float v) { o.sampling.min_p = v; })
        .def_property("seed", [](const RunOptions& o) { return o.sampling.seed; },
                      [](RunOptions& o, uint32_t v) { o.sampling.seed = v; })
        .def_property("ignore_eos", [](const RunOptions& o) { return o.sampling.ignore_eos; },
                      [](RunOptions& o, bool v) { o.sampling.ignore_eos = v; })
        .def_property("logit_bias",
                      [](const RunOptions& o) {
                          std::vector<std::pair<llama_token, float>> out;
                          for (const auto& b : o.sampling.logit_bias) out.emplace_back(b.token, b.bias);
                          return out;
                      },
                      [](RunOptions& o, const std::vector<std::pair<llama_token, float>>& v) {
                          o.sampling.logit_bias.clear();
                          for (const auto& [t, b] : v) o.sampling.logit_bias.push_back({t, b});
                      })
        .def_property("seed_per_sample", [](const RunOptions& o) { return o.sampling.seed_per_sample; },
                      [](RunOptions& o, bool v) { o.sampling.seed_per_sample = v; })
        .def_property("stop", [](const RunOptions& o) { return o.sampling.stop; },
                      [](RunOptions& o, std::vector<std::string> v) { o.sampling.stop = std::move(v); })
        .def_property("forced", [](const RunOptions& o) { return o.sampling.forced; },
                      [](RunOptions& o, std::vector<llama_token> v) { o.sampling.forced = std::move(v); })
        .def_property("forced_per_sample", [](const RunOptions& o) { return o.sampling.forced_per_sample; },
                      [](RunOptions& o, std::vector<std::vector<llama_token>> v) {
                          o.sampling.forced_per_sample = std::move(v);
                      })
        .def_property("tap", [](const RunOptions& o) { return o.sampling.tap; },
                      [](RunOptions& o, bool v) { o.sampling.tap = v; })
        .def_property("seqs", [](const RunOptions& o) { return o.sampling.seqs; },
                      [](RunOptions& o, std::vector<int> v) { o.sampling.seqs = std::move(v); })
        .def_property("reuse_prompt", [](const RunOptions& o) { return o.sampling.reuse_prompt != PromptReuse::Off; },
                      [](RunOptions& o, bool v) { o.sampling.reuse_prompt = v ? PromptReuse::Exact : PromptReuse::Off; },
                      "True: prompt_reuse 'exact'; False: 'off'")
        .def_property("prompt_reuse", [](const RunOptions& o) { return prompt_reuse_name(o.sampling.reuse_prompt); },
                      [](RunOptions& o, const std::string& v) { o.sampling.reuse_prompt = parse_prompt_reuse(v); },
                      "'exact' (the tokens of a run without reuse), 'prefix' (the whole common prefix) or 'off'")
        .def_property("kv_tokens", [](const RunOptions& o) { return o.sampling.kv_tokens; },
                      [](RunOptions& o, int v) { o.sampling.kv_tokens = v; })
        .def_property("top_logprobs", [](const RunOptions& o) { return o.sampling.top_logprobs; },
                      [](RunOptions& o, int v) { o.sampling.top_logprobs = v; })
        .def_property("counts", [](const RunOptions& o) { return o.record.counts; },
                      [](RunOptions& o, bool v) { o.record.counts = v; })
        .def_property("active_threshold", [](const RunOptions& o) { return o.record.active_threshold; },
                      [](RunOptions& o, float v) { o.record.active_threshold = v; })
        .def_property("active_chunk", [](const RunOptions& o) { return o.record.active_chunk; },
                      [](RunOptions& o, int v) { o.record.active_chunk = v; })
        .def_property("watch", [](const RunOptions& o) { return o.record.watch; },
                      [](RunOptions& o, std::vector<std::pair<int, int>> v) { o.record.watch = std::move(v); })
        // Rows by TransformerLens hook name; rows / norm_inputs / residuals: the same, by their old names.
        .def_property("mlp_post", get_mlp_post, set_mlp_post)
        .def_property("ln2_normalized", get_ln2, set_ln2)
        .def_property("resid_post", get_resid, set_resid)
        .def_property("rows", get_mlp_post, set_mlp_post)
        .def_property("norm_inputs", get_ln2, set_ln2)
        .def_property("residuals", get_resid, set_resid)
        .def_property("contribution_chunk", [](const RunOptions& o) { return o.record.contribution_chunk; },
                      [](RunOptions& o, int v) { o.record.contribution_chunk = v; })
        .def_property("contribution_variant", [](const RunOptions& o) { return o.record.contribution_variant; },
                      [](RunOptions& o, std::string v) { o.record.contribution_variant = std::move(v); })
        .def_property("contribution_top", [](const RunOptions& o) { return o.record.contribution_top; },
                      [](RunOptions& o, int v) { o.record.contribution_top = v; })
        .def_property("eta_rank", [](const RunOptions& o) { return o.record.eta_rank; },
                      [](RunOptions& o, int v) { o.record.eta_rank = v; })
        .def_property("keep_top", [](const RunOptions& o) { return o.record.keep_top; },
                      [](RunOptions& o, bool v) { o.record.keep_top = v; })
        .def_property("routing", [](const RunOptions& o) { return o.record.routing; },
                      [](RunOptions& o, bool v) { o.record.routing = v; })
        .def_property("router_probs", [](const RunOptions& o) { return o.record.router_probs; },
                      [](RunOptions& o, bool v) { o.record.router_probs = v; })
        .def_readwrite("neat", &RunOptions::neat)
        .def_readwrite("neureasoner", &RunOptions::neureasoner);

    py::class_<Handoff>(m, "Handoff", "A live sample moved out of a run, to continue in another context.")
        .def_property_readonly("n_tokens", [](const Handoff& h) { return h.tokens.size(); })
        .def_property_readonly("index", [](const Handoff& h) { return h.index; })
        .def_property_readonly("kv_bytes", [](const Handoff& h) { return h.kv.size(); });

    py::class_<RunHandle>(m, "Run")
        .def(py::init([](py::object ctx_obj, const std::vector<llama_token>& prompt, const RunOptions& options) {
            auto& c = ctx_obj.cast<ContextHandle&>();
            auto h = std::make_unique<RunHandle>();
            h->context_owner = ctx_obj;
            py::gil_scoped_release nogil;  // the first run of a model reads the contribution weights
            h->run = std::make_unique<Run>(*c.tc, prompt, options);
            return h;
        }), py::arg("context"), py::arg("prompt"), py::arg("options"))
        .def_static("continue_from", [](py::object ctx_obj, Handoff& from, const RunOptions& options) {
            auto& c = ctx_obj.cast<ContextHandle&>();
            auto h = std::make_unique<RunHandle>();
            h->context_owner = ctx_obj;
            py::gil_scoped_release nogil;
            h->run = std::make_unique<Run>(*c.tc, std::move(from), options);
            return h;
        }, py::arg("context"), py::arg("handoff"), py::arg("options"),
           "A run of one continuing a handed-off sample in `context` (its cells: prompt + max_tokens).")
        .def("hand_off", [](RunHandle& h, int i) {
            py::gil_scoped_release nogil;
            return h.run->hand_off(i);
        }, py::arg("index"), "Move live sample `index` out of this run (it ends here as 'stopped').")
        .def("advance", [](RunHandle& h, int until) {
            h.progress.cancel = false;
            h.progress.live = h.run->loop().n_live();
            // A Ctrl-C (SIGINT) pending for the main thread stops the loop at the next step; the
            // KeyboardInterrupt it raised is kept and re-raised once the loop has stopped.
            h.progress.should_stop = [] {
                py::gil_scoped_acquire gil;
                return PyErr_CheckSignals() != 0;
            };
            int live;
            {
                py::gil_scoped_release nogil;
                live = h.run->advance(until, &h.progress);
            }
            h.progress.should_stop = nullptr;
            if (PyErr_Occurred()) throw py::error_already_set();
            return live;
        }, py::arg("until"))
        .def("stop", [](RunHandle& h, const std::vector<int>& which) { h.run->stop(which); })
        .def("finish_live", [](RunHandle& h, const std::string& why) {
            if (why != "cancelled") throw ParamError("finish_live: only 'cancelled' ends live samples");
            h.run->finish_live(Finish::Cancelled);
        }, py::arg("why"))
        .def("cancel", [](RunHandle& h) { h.progress.cancel.store(true); })
        .def("progress_tokens", [](const RunHandle& h) { return h.progress.tokens.load(); })
        .def("progress_live", [](const RunHandle& h) { return h.progress.live.load(); })
        .def_property_readonly("n", [](const RunHandle& h) { return h.run->loop().n(); })
        .def_property_readonly("n_live", [](const RunHandle& h) { return h.run->loop().n_live(); })
        .def_property_readonly("n_prompt", [](const RunHandle& h) { return h.run->loop().n_prompt(); })
        .def_property_readonly("n_reused", [](const RunHandle& h) { return h.run->loop().n_reused(); },
                               "prompt tokens whose KV cells were reused instead of decoded")
        .def_property_readonly("started", [](const RunHandle& h) { return h.run->loop().started(); })
        .def_property_readonly("failed", [](const RunHandle& h) { return h.run->loop().failed(); },
                               "why the run cannot go on ('' while it can)")
        .def("untap", [](RunHandle& h) { h.run->decode_loop().untap(); },
             "stop feeding the records: the live samples go on untapped (a decided race's winner)")
        .def_property_readonly("tokens_sampled", [](const RunHandle& h) { return h.run->loop().tokens_sampled(); })
        .def_property_readonly("decode_steps", [](const RunHandle& h) { return h.run->loop().decode_steps(); })
        .def_property_readonly("prompt_seconds", [](const RunHandle& h) { return h.run->loop().prompt_seconds(); })
        .def_property_readonly("decode_seconds", [](const RunHandle& h) { return h.run->loop().decode_seconds(); })
        .def_property_readonly("sample_seconds", [](const RunHandle& h) { return h.run->loop().sample_seconds(); })
        .def_property_readonly("contribution_stats", [](const RunHandle& h) {
            py::dict d;
            const ContributionReducer* c = h.run->contributions();
            d["tokens"] = c ? c->tokens_processed() : 0;
            d["cache_hits"] = c ? c->cache_hits() : 0;
            d["cache_misses"] = c ? c->cache_misses() : 0;
            d["expert_projections"] = c ? c->expert_projections() : 0;
            d["expert_projections_cached"] = c ? c->expert_projections_cached() : 0;
            d["seconds"] = c ? c->seconds() : 0.0;
            d["dot_seconds"] = c ? c->dot_seconds() : 0.0;
            return d;
        }, "the contribution pass: tokens processed, token ids whose projection was cached or computed, "
           "seconds in the pass and in its dot products; MoE: (token id, layer, expert) projections computed, and "
           "those added to an id already cached")
        .def("sample", [](const RunHandle& h, int i) {
            if (i < 0 || i >= h.run->loop().n()) throw ParamError("sample index out of range: " + std::to_string(i));
            return sample_dict(*h.run, i);
        })
        // What a stream reads each step: the text and where the sample stands, not its records
        // (sample() copies every array, each step).
        .def("stream_view", [](const RunHandle& h, int i) {
            if (i < 0 || i >= h.run->loop().n()) throw ParamError("sample index out of range: " + std::to_string(i));
            const SampleState& st = h.run->loop().sample(i);
            return py::make_tuple(py::bytes(st.text), st.tokens.size(), st.tokens.empty() ? -1 : st.tokens.back(),
                                  st.finish_reason(), h.run->options().sampling.top_logprobs > 0);
        }, py::arg("index"), "(text bytes, tokens, last token or -1, finish reason, whether it records logprobs)");

    // Continuous batching: runs on slots of one context, decoded together (runtime/batcher.h).
    py::class_<BatcherHandle>(m, "Batcher")
        .def(py::init([](py::object ctx_obj) {
            auto& c = ctx_obj.cast<ContextHandle&>();
            auto b = std::make_unique<BatcherHandle>();
            b->context_owner = ctx_obj;
            b->batcher = std::make_unique<Batcher>(*c.tc);
            return b;
        }), py::arg("context"))
        .def("add", [](BatcherHandle& b, py::object run_obj, int until) {
            auto& h = run_obj.cast<RunHandle&>();
            if (h.context_owner.ptr() != b.context_owner.ptr())
                throw ParamError("the run decodes in another context than the batcher's");
            b.batcher->add(&h.run->decode_loop(), until);
            b.members.emplace_back(run_obj, &h);
        }, py::arg("run"), py::arg("until"))
        .def("set_until", [](BatcherHandle& b, py::object run_obj, int until) {
            b.batcher->set_until(&run_obj.cast<RunHandle&>().run->decode_loop(), until);
        }, py::arg("run"), py::arg("until"))
        .def("remove", [](BatcherHandle& b, py::object run_obj) {
            auto& h = run_obj.cast<RunHandle&>();
            b.batcher->remove(&h.run->decode_loop());
            b.members.erase(std::remove_if(b.members.begin(), b.members.end(),
                                           [&](const auto& m) { return m.second == &h; }),
                            b.members.end());
        }, py::arg("run"))
        .def("run", [](BatcherHandle& b, int max_steps) {
            std::vector<DecodeLoop*> ready;
            {
                py::gil_scoped_release nogil;
                ready = b.batcher->run(max_steps, &b.progress);
            }
            py::list out;
            for (DecodeLoop* l : ready)
                for (auto& m : b.members)
                    if (&m.second->run->decode_loop() == l) out.append(m.first);
            return out;
        }, py::arg("max_steps"),
           "Decode (prompts of joining runs, then shared steps) until a run needs its owner (it reached its "
           "target or ended), max_steps steps, or wake(); returns the runs that need their owner.")
        .def("wake", [](BatcherHandle& b) { b.progress.cancel.store(true); },
             "make run() return after its current step (safe from any thread); the flag stays set until clear_wake()")
        .def("clear_wake", [](BatcherHandle& b) { b.progress.cancel.store(false); })
        .def_property_readonly("size", [](const BatcherHandle& b) { return b.batcher->size(); })
        .def_property_readonly("steps", [](const BatcherHandle& b) { return b.batcher->steps(); })
        .def_property_readonly("rows", [](const BatcherHandle& b) { return b.batcher->rows(); })
        .def_property_readonly("joint_prompt_decodes",
                               [](const BatcherHandle& b) { return b.batcher->joint_prompt_decodes(); });
}
