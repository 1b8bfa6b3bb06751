// pybind11 bindings: a thin layer over the plain C++ core. Long native work releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>

#include "errors.h"
#include "generator.h"
#include "gguf_file.h"
#include "log_capture.h"
#include "model.h"
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
    d["norm_inputs"] = r.norm_inputs.empty()
                           ? py::object(py::none())
                           : py::object(to_numpy(std::move(r.norm_inputs), {n, L, E}, py::dtype::of<float>()));
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
        .def("is_eog", &Model::is_eog);

    py::class_<ContextHandle>(m, "Context")
        .def(py::init([](std::shared_ptr<Model> model, int n_ctx, int n_batch, int n_seq_max, int n_threads,
                         bool kv_unified, bool flash_attn) {
            ContextParams p;
            p.n_ctx = n_ctx;
            p.n_batch = n_batch;
            p.n_seq_max = n_seq_max;
            p.n_threads = n_threads;
            p.kv_unified = kv_unified;
            p.flash_attn = flash_attn;
            auto c = std::make_unique<ContextHandle>();
            c->model = model;
            py::gil_scoped_release nogil;
            c->tc = std::make_unique<TappedContext>(model, p);
            return c;
        }), py::arg("model"), py::arg("n_ctx") = 4096, py::arg("n_batch") = 512, py::arg("n_seq_max") = 1,
            py::arg("n_threads") = 0, py::arg("kv_unified") = true, py::arg("flash_attn") = true)
        .def_property_readonly("n_ctx", [](const ContextHandle& c) { return c.tc->n_ctx(); })
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
                            bool tap, int capture, bool capture_norm, float active_threshold) {
            GenerateParams p;
            p.max_tokens = max_tokens;
            p.sampling = {temperature, top_p, top_k, min_p, seed};
            p.stop = std::move(stop);
            p.tap = tap;
            if (capture < 0 || capture > 2) throw ParamError("capture must be 0 (none), 1 (float32) or 2 (float16)");
            p.capture = static_cast<CaptureMode>(capture);
            p.capture_norm = capture_norm;
            p.active_threshold = active_threshold;
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
           py::arg("capture_norm") = false, py::arg("active_threshold") = 0.0f);
}
