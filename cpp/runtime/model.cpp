#include "runtime/model.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>

#include "base/errors.h"
#include "base/gguf_file.h"
#include "base/log_capture.h"
#include "runtime/tapped_context.h"
#include "weights/mapped_weights.h"

namespace neurotap {

std::string activation_tensor_for(const std::string& arch) {
    // Dense SwiGLU / GeGLU architectures whose FFN is built by llm_graph_context::build_ffn
    // (llama.cpp names the down projection's input ffn_swiglu-<il> / ffn_geglu-<il>). The load
    // probe checks that every layer really has it before anything is generated.
    static const std::map<std::string, std::string> table = {
        {"llama", "ffn_swiglu"},  {"mistral3", "ffn_swiglu"}, {"qwen2", "ffn_swiglu"},
        {"qwen3", "ffn_swiglu"},  {"granite", "ffn_swiglu"},  {"smollm3", "ffn_swiglu"},
        {"gemma", "ffn_geglu"},   {"gemma2", "ffn_geglu"},    {"gemma3", "ffn_geglu"},
    };
    auto it = table.find(arch);
    if (it == table.end()) {
        std::string known;
        for (auto& kv : table) known += (known.empty() ? "" : ", ") + kv.first;
        throw ModelError("unsupported architecture '" + arch + "': neurotap taps dense SwiGLU/GeGLU models (" +
                         known + ")");
    }
    return it->second;
}

std::string moe_activation_tensor_for(const std::string& arch) {
    // Architectures whose MoE layers llama-graph.cpp's build_moe_ffn builds in the form the tap
    // reads (activation, ids, gate weights applied after the down projection), every layer MoE.
    static const std::map<std::string, std::string> table = {
        {"qwen3moe", "ffn_moe_swiglu"}, {"qwen2moe", "ffn_moe_swiglu"}, {"olmoe", "ffn_moe_swiglu"},
        {"llama", "ffn_moe_swiglu"},    // Mixtral-style
        {"gpt-oss", "ffn_moe_swiglu_oai"},
    };
    // Known MoE families the tap refuses, and why (anything else is refused as unknown).
    static const std::map<std::string, std::string> refused = {
        {"llama4", "it applies the gate weights before the experts' FFN (weight_before_ffn), so an activation "
                   "is not the neuron's output times its gate"},
        {"deepseek2", "its first layers are dense and its experts are chosen per group (mixed layer widths)"},
        {"qwen3next", "it is a hybrid model with recurrent (linear-attention) layers"},
        {"granitehybrid", "it is a hybrid model with recurrent (Mamba) layers"},
        {"jamba", "it is a hybrid model with recurrent (Mamba) layers"},
        {"lfm2moe", "it is a hybrid model with convolution layers and dense leading layers"},
    };
    auto it = table.find(arch);
    if (it != table.end()) return it->second;
    auto why = refused.find(arch);
    std::string known;
    for (auto& kv : table) known += (known.empty() ? "" : ", ") + kv.first;
    throw ModelError("unsupported mixture-of-experts architecture '" + arch + "'" +
                     (why != refused.end() ? ": " + why->second : std::string()) + "; neurotap taps the MoE layers of " +
                     known);
}

static void ensure_backend() {
    static std::once_flag once;
    std::call_once(once, [] { llama_backend_init(); });
}

// Whether the CPU backend would put weights in its AMX buffer (llama.cpp built with -march=native
// on a CPU with AMX-INT8, e.g. Sapphire Rapids). llama.cpp's AMX matmul segfaults there in the
// first decode (ggml-org/llama.cpp#20824, closed unfixed; seen here with SmolLM2 Q8_0), so such
// machines load without the extra buffer types (no AMX, no CPU weight repacking) instead.
bool cpu_offers_amx_buffer() {
    static const bool offers = [] {
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!cpu) return false;
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu);
        auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
            ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts"));
        if (!get_extra) return false;
        for (ggml_backend_buffer_type_t* b = get_extra(cpu); b && *b; ++b)
            if (std::strcmp(ggml_backend_buft_name(*b), "AMX") == 0) return true;
        return false;
    }();  // the backend's buffer types do not change while the process runs
    return offers;
}

struct FileId {
    uint64_t size = 0, inode = 0;
    int64_t mtime_ns = 0;
};

static FileId file_id(const std::string& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) throw ModelError("model file not found: " + path);
    return {static_cast<uint64_t>(st.st_size), static_cast<uint64_t>(st.st_ino),
            static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

// Float hyperparameters llama.cpp divides by, takes roots or logs of: a NaN, an infinity, zero or
// a negative value aborts or hangs inside llama.cpp, or silently yields NaN logits.
static void check_hparams(const GgufFile& f, const std::string& a, const std::string& path) {
    static const char* positive[] = {".attention.layer_norm_rms_epsilon", ".attention.layer_norm_epsilon",
                                     ".rope.freq_base", ".rope.freq_scale", ".rope.scaling.factor",
                                     ".attention.scale", ".final_logit_softcapping", ".attn_logit_softcapping"};
    for (const char* k : positive) {
        const std::string key = a + k;
        if (!f.has_key(key)) continue;
        double v;
        try {
            v = f.get_float(key);
        } catch (const ModelError&) {
            throw ModelError("metadata '" + key + "' of " + path + " is not a float");
        }
        if (!std::isfinite(v) || v <= 0)
            throw ModelError("metadata '" + key + "' of " + path + " is " + std::to_string(v) +
                             ": it must be a finite positive number (the file is corrupt)");
    }
    static const char* counts[] = {".context_length", ".embedding_length", ".feed_forward_length"};
    for (const char* k : counts) {
        const std::string key = a + k;
        if (!f.has_key(key)) continue;
        int64_t v = 0;
        try {
            v = f.get_int(key);
        } catch (const ModelError&) {
            continue;  // arrays (per-layer widths) are validated by llama.cpp's loader
        }
        if (v <= 0 || v > (int64_t{1} << 31))
            throw ModelError("metadata '" + key + "' of " + path + " is " + std::to_string(v) + ": out of range");
    }
}

// F64 weights: llama.cpp's CPU backend has no F64 matrix multiply or binary op (norm gains,
// biases, routers), so such a file aborts or segfaults in the first decode. A row lookup
// (get_rows) does read F64: the token embedding passes when the file has its own output matrix.
static void check_f64(const GgufFile& f, const std::string& path) {
    const bool tied = f.find_tensor("output.weight") == nullptr;
    for (const TensorInfo& t : f.tensors())
        if (t.type == GGML_TYPE_F64 && (t.name != "token_embd.weight" || tied))
            throw ModelError("unsupported model: tensor '" + t.name + "' of " + path + " is F64, which llama.cpp " +
                             "cannot compute with (it would crash in the first decode); convert the file to F32, F16 " +
                             "or a quantized type");
}

// llama.cpp's OLMoE graph normalizes K with an n_embd-wide weight (attn_k_norm): with fewer
// key/value heads than query heads, or a head size other than n_embd / n_head, K is narrower
// than that weight and ggml aborts the process (GGML_ASSERT ggml_can_repeat) in the first decode.
static void check_olmoe_heads(const GgufFile& f, const std::string& path) {
    auto get = [&](const std::string& key, int64_t fallback) -> int64_t {
        if (!f.has_key(key)) return fallback;
        try {
            return f.get_int(key);
        } catch (const ModelError&) {
            throw ModelError("unsupported model: metadata 'olmoe." + key.substr(6) + "' of " + path +
                             " is a per-layer array; llama.cpp's OLMoE graph needs one head count for every layer");
        }
    };
    const int64_t n_head = get("olmoe.attention.head_count", 0);
    const int64_t n_kv = get("olmoe.attention.head_count_kv", n_head);
    const int64_t n_embd = get("olmoe.embedding_length", 0);
    if (n_head <= 0) return;  // llama.cpp's loader reports a missing head count itself
    const int64_t head_k = get("olmoe.attention.key_length", n_embd / n_head);
    if (n_kv != n_head || head_k * n_head != n_embd)
        throw ModelError("unsupported model: olmoe file " + path + " has " + std::to_string(n_kv) +
                         " key/value heads of size " + std::to_string(head_k) + " for " + std::to_string(n_head) +
                         " query heads and n_embd " + std::to_string(n_embd) + "; llama.cpp's OLMoE graph normalizes "
                         "K with an n_embd-wide weight, so it needs head_count_kv == head_count and head size "
                         "n_embd / head_count (otherwise it aborts in the first decode)");
}

// An MoE file's expert shape, from its metadata, checked against every layer's expert tensors
// (a file whose tensors disagree with its metadata is refused here, naming the layer, before
// llama.cpp reads it).
static void inspect_moe(const GgufFile& f, ModelInfo& info) {
    const std::string& a = info.architecture;
    const std::string& path = info.path;
    auto count = [&](const std::string& key, int64_t lo, int64_t hi) -> int64_t {
        int64_t v = 0;
        try {
            v = f.get_int(key);
        } catch (const ModelError&) {
            throw ModelError("metadata '" + key + "' of " + path + " is missing or not an integer (per-layer "
                             "arrays of expert shapes are not supported)");
        }
        if (v < lo || v > hi) throw ModelError("metadata '" + key + "' of " + path + " is " + std::to_string(v) + ": out of range");
        return v;
    };
    MoeLayout& m = info.moe;
    m.n_expert = static_cast<int>(count(a + ".expert_count", 1, 4096));
    m.n_used = static_cast<int>(count(a + ".expert_used_count", 1, m.n_expert));
    const TensorInfo* d0 = f.find_tensor("blk.0.ffn_down_exps.weight");
    if (!d0) throw ModelError("unsupported model: tensor 'blk.0.ffn_down_exps.weight' missing in " + path +
                              " (leading dense layers, or merged experts, are not tapped)");
    // llama.cpp takes the expert width from expert_feed_forward_length, else (Mixtral) feed_forward_length.
    // (Qwen2/3-MoE without the key: feed_forward_length / expert_used_count, as llama.cpp does.)
    if (f.has_key(a + ".expert_feed_forward_length")) {
        m.n_ff_exp = count(a + ".expert_feed_forward_length", 1, int64_t{1} << 20);
    } else {
        m.n_ff_exp = count(a + ".feed_forward_length", 1, int64_t{1} << 24);
        if (a == "qwen2moe" || a == "qwen3moe") m.n_ff_exp /= m.n_used;
    }
    info.n_embd = d0->ne[1];
    if (a == "qwen2moe") {
        m.shexp_act = "ffn_swiglu";
        m.shexp_gate = "ffn_shexp_gate";
        const TensorInfo* s0 = f.find_tensor("blk.0.ffn_down_shexp.weight");
        if (!s0) throw ModelError("tensor 'blk.0.ffn_down_shexp.weight' missing in " + path);
        m.n_ff_shexp = s0->ne[0];
        if (f.has_key(a + ".expert_shared_feed_forward_length") &&
            count(a + ".expert_shared_feed_forward_length", 1, int64_t{1} << 20) != m.n_ff_shexp)
            throw ModelError("tensor 'blk.0.ffn_down_shexp.weight' has width " + std::to_string(m.n_ff_shexp) +
                             " but expert_shared_feed_forward_length says otherwise in " + path);
    } else if (f.has_key(a + ".expert_shared_count") && f.get_int(a + ".expert_shared_count") > 0) {
        throw ModelError("unsupported model: '" + a + "' with shared experts is not tapped (" + path + ")");
    }
    if (a == "gpt-oss") info.norm_name = "attn_post_norm";
    const int64_t E = m.n_expert, F = m.n_ff_exp, D = info.n_embd;
    for (int il = 0; il < info.n_layers; ++il) {
        const std::string p = "blk." + std::to_string(il) + ".";
        auto expect = [&](const std::string& name, std::initializer_list<int64_t> ne, bool required) {
            const TensorInfo* t = f.find_tensor(p + name);
            if (!t) {
                if (!required) return;
                throw ModelError("layer " + std::to_string(il) + ": tensor '" + p + name + "' missing in " + path +
                                 " (every layer must be a mixture-of-experts layer)");
            }
            int k = 0;
            for (int64_t v : ne) {
                if (t->ne[k] != v) {
                    std::string want, got;
                    for (int64_t x : ne) want += (want.empty() ? "" : " x ") + std::to_string(x);
                    for (int j = 0; j < static_cast<int>(ne.size()); ++j)
                        got += (j ? " x " : "") + std::to_string(t->ne[j]);
                    throw ModelError("layer " + std::to_string(il) + ": tensor '" + p + name + "' has shape " + got +
                                     " but the metadata (expert_count " + std::to_string(E) + ", expert width " +
                                     std::to_string(F) + ", n_embd " + std::to_string(D) + ") says " + want + " in " + path);
                }
                ++k;
            }
            for (; k < 4; ++k)
                if (t->ne[k] != 1)
                    throw ModelError("layer " + std::to_string(il) + ": tensor '" + p + name + "' has too many dimensions in " + path);
        };
        expect("ffn_gate_inp.weight", {D, E}, true);
        expect("ffn_down_exps.weight", {F, D, E}, true);
        expect("ffn_up_exps.weight", {D, F, E}, true);
        // No gate: llama.cpp computes a plain SiLU (ffn_moe_silu), which the tap does not read.
        if (!f.find_tensor(p + "ffn_gate_exps.weight"))
            throw ModelError("layer " + std::to_string(il) + ": unsupported model: tensor '" + p +
                             "ffn_gate_exps.weight' missing in " + path + " (only gated experts are tapped)");
        expect("ffn_gate_exps.weight", {D, F, E}, true);
        if (m.n_ff_shexp > 0) expect("ffn_down_shexp.weight", {m.n_ff_shexp, D}, true);
    }
    info.n_ff = m.width();
}

// Whether ggml's CPU backend may repack a weight of this type (ggml-cpu/repack.cpp,
// ggml_repack_get_optimal_repack_type, on any CPU it supports; Q8_0 on ARM and RISC-V only).
static bool repackable(ggml_type t) {
    switch (t) {
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_K: case GGML_TYPE_Q2_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ4_NL: case GGML_TYPE_MXFP4:
            return true;
        case GGML_TYPE_Q8_0:
#if defined(__x86_64__) || defined(_M_X64)
            return false;
#else
            return true;
#endif
        default:
            return false;
    }
}

// Reads what the tap needs from the file itself: architecture, layer count, FFN width.
static ModelInfo inspect(const std::string& path) {
    GgufFile f(path);
    ModelInfo info;
    info.path = path;
    const FileId id = file_id(path);
    info.file_size = id.size;
    info.file_inode = id.inode;
    info.file_mtime_ns = id.mtime_ns;
    info.architecture = f.architecture();
    for (const TensorInfo& t : f.tensors())
        if (t.ne[1] > 1 && repackable(t.type)) info.repackable_weights = true;
    const std::string a = info.architecture;
    const bool moe = f.has_key(a + ".expert_count") && f.get_int(a + ".expert_count") > 0;
    info.act_name = moe ? moe_activation_tensor_for(a) : activation_tensor_for(a);
    info.n_layers = static_cast<int>(f.get_int(a + ".block_count"));
    if (info.n_layers <= 0 || info.n_layers > 1024) throw ModelError("implausible block_count in " + path);
    check_hparams(f, a, path);
    check_f64(f, path);
    if (a == "olmoe") check_olmoe_heads(f, path);
    for (auto [key, dst] : {std::make_pair(a + ".attention.key_length", &info.head_dim_k),
                            std::make_pair(a + ".attention.value_length", &info.head_dim_v)}) {
        if (!f.has_key(key)) continue;
        try {
            *dst = f.get_int(key);
        } catch (const ModelError&) {
        }
        if (*dst < 0 || *dst > 65536) throw ModelError("metadata '" + key + "' of " + path + " is out of range");
    }
    if (moe) {
        inspect_moe(f, info);
        return info;
    }
    for (int il = 0; il < info.n_layers; ++il) {
        const std::string name = "blk." + std::to_string(il) + ".ffn_down.weight";
        const TensorInfo* t = f.find_tensor(name);
        if (!t) throw ModelError("tensor '" + name + "' missing in " + path);
        if (il == 0) {
            info.n_ff = t->ne[0];
            info.n_embd = t->ne[1];
        } else if (t->ne[0] != info.n_ff) {
            throw ModelError("unsupported model: FFN width differs across layers in " + path);
        }
    }
    return info;
}

static void fill_from_llama(ModelInfo& info, llama_model* m) {
    char buf[256];
    llama_model_desc(m, buf, sizeof(buf));
    info.description = buf;
    info.n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(m));
    info.n_ctx_train = llama_model_n_ctx_train(m);
    // Head sizes: the file's key/value lengths where it states them (Qwen3, Gemma), else n_embd / n_head.
    const int n_head = std::max(1, llama_model_n_head(m));
    info.n_head = llama_model_n_head(m);
    const int64_t dk = info.head_dim_k > 0 ? info.head_dim_k : info.n_embd / n_head;
    const int64_t dv = info.head_dim_v > 0 ? info.head_dim_v : info.n_embd / n_head;
    info.kv_bytes_per_cell = static_cast<uint64_t>(info.n_layers) * std::max(0, llama_model_n_head_kv(m)) *
                             static_cast<uint64_t>(dk + dv) * 2;
    info.n_params = llama_model_n_params(m);
    info.size_bytes = llama_model_size(m);
    info.has_chat_template = llama_model_chat_template(m, nullptr) != nullptr;
    if (llama_model_n_layer(m) != info.n_layers || llama_model_n_embd(m) != info.n_embd)
        throw ModelError("llama.cpp and the GGUF file disagree on the model shape: " + info.path);
}

Model::Model(llama_model* m, bool owned, ModelInfo info)
    : model_(m), owned_(owned), vocab_(llama_model_get_vocab(m)), info_(std::move(info)) {}

Model::~Model() { close(); }

void Model::check_open() const {
    if (closed_.load())
        throw RuntimeError("the model " + info_.path + " was closed" +
                           (owned_ ? "" : " (its llama_cpp.Llama was closed)") + ": load it again");
}

void Model::attach(TappedContext* tc) {
    std::lock_guard<std::mutex> lock(contexts_mu_);
    contexts_.push_back(tc);
}

void Model::detach(TappedContext* tc) {
    std::lock_guard<std::mutex> lock(contexts_mu_);
    contexts_.erase(std::remove(contexts_.begin(), contexts_.end(), tc), contexts_.end());
}

void Model::close() {
    {
        // Held throughout: a context being destroyed meanwhile waits in detach() until this is done.
        std::lock_guard<std::mutex> lock(contexts_mu_);
        if (closed_.exchange(true)) return;
        for (TappedContext* tc : contexts_) tc->close();  // each waits for its decode in flight
    }
    if (owned_ && model_) llama_model_free(model_);
    model_ = nullptr;
}

void Model::check_file_unchanged() const {
    FileId now;
    try {
        now = file_id(info_.path);
    } catch (const ModelError&) {
        throw RuntimeError("the model file " + info_.path + " was removed since it was loaded");
    }
    if (now.size != info_.file_size || now.inode != info_.file_inode || now.mtime_ns != info_.file_mtime_ns)
        throw RuntimeError("the model file " + info_.path + " changed on disk since it was loaded: what is read "
                           "from it now (contribution weights) would not match the loaded weights; load it again");
}

static const char* device_type_name(enum ggml_backend_dev_type t) {
    switch (t) {
        case GGML_BACKEND_DEVICE_TYPE_CPU: return "cpu";
        case GGML_BACKEND_DEVICE_TYPE_GPU: return "gpu";
        case GGML_BACKEND_DEVICE_TYPE_IGPU: return "igpu";
        case GGML_BACKEND_DEVICE_TYPE_ACCEL: return "accel";
        default: return "meta";
    }
}

std::vector<DeviceInfo> list_devices() {
    ensure_backend();
    std::vector<DeviceInfo> out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        DeviceInfo d;
        d.name = ggml_backend_dev_name(dev);
        d.description = ggml_backend_dev_description(dev);
        d.type = device_type_name(ggml_backend_dev_type(dev));
        ggml_backend_dev_memory(dev, &d.memory_free, &d.memory_total);
        out.push_back(std::move(d));
    }
    return out;
}

static bool is_gpu(ggml_backend_dev_t dev) {
    const auto t = ggml_backend_dev_type(dev);
    return t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU;
}

static std::string devices_text() {
    std::string s;
    for (const DeviceInfo& d : list_devices()) s += (s.empty() ? "" : ", ") + d.name + " (" + d.description + ")";
    return s;
}

// llama.cpp clamps n_gpu_layers to the model and quietly runs on the CPU when no GPU device is
// there (a CPU-only build, a missing driver): a user who asked for offload would never know.
// Returns the one device to use, or nullptr to let llama.cpp pick every GPU.
static ggml_backend_dev_t check_device_settings(const ModelInfo& info, int n_gpu_layers, const std::string& device) {
    if (n_gpu_layers < -1)
        throw ParamError("n_gpu_layers must be -1 (every layer), 0 (none) or a number of layers, got " +
                         std::to_string(n_gpu_layers));
    if (n_gpu_layers > info.n_layers + 1)
        throw ParamError("n_gpu_layers=" + std::to_string(n_gpu_layers) + " but the model has " +
                         std::to_string(info.n_layers) + " layers: give at most " + std::to_string(info.n_layers + 1) +
                         " (every layer and the output layer), or -1 for all");
    ggml_backend_dev_t chosen = nullptr;
    if (!device.empty()) {
        chosen = ggml_backend_dev_by_name(device.c_str());
        if (!chosen || !is_gpu(chosen))
            throw ModelError("no GPU device named '" + device + "' in this llama.cpp build; its devices: " +
                             devices_text());
    }
    if (n_gpu_layers != 0 && !chosen) {
        bool any = false;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) any = any || is_gpu(ggml_backend_dev_get(i));
        if (!any)
            throw ModelError("n_gpu_layers=" + std::to_string(n_gpu_layers) +
                             " asks for a GPU, but this llama.cpp build sees none (devices: " + devices_text() +
                             "). Install a GPU build of llama-cpp-python (CMAKE_ARGS=\"-DGGML_CUDA=on\" or "
                             "\"-DGGML_VULKAN=on\"; Metal is on by default on Apple) and check the driver, or use "
                             "n_gpu_layers=0");
    }
    return chosen;
}

std::shared_ptr<Model> Model::load(const std::string& path, int n_gpu_layers, const std::string& device) {
    ensure_backend();
    ModelInfo info = inspect(path);
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = n_gpu_layers;
    ggml_backend_dev_t only[2] = {check_device_settings(info, n_gpu_layers, device), nullptr};
    if (only[0]) mp.devices = only;  // read during the load only
    if (cpu_offers_amx_buffer()) mp.use_extra_bufts = false;
    take_logged_errors();
    llama_model* m = llama_model_load_from_file(path.c_str(), mp);
    if (!m) {
        std::string why = take_logged_errors();
        throw ModelError("llama.cpp could not load " + path + (why.empty() ? "" : ": " + why));
    }
    try {
        fill_from_llama(info, m);
    } catch (...) {
        llama_model_free(m);
        throw;
    }
    return std::shared_ptr<Model>(new Model(m, true, std::move(info)));
}

std::shared_ptr<Model> Model::borrow(llama_model* m, const std::string& path, bool amx_safe) {
    if (!m) throw ModelError("the llama_cpp.Llama object has no loaded model");
    ensure_backend();
    if (!amx_safe && cpu_offers_amx_buffer())
        throw ModelError("this llama.cpp build puts weights in AMX buffers, whose matmul segfaults "
                         "(ggml-org/llama.cpp#20824), and a llama_cpp.Llama loads them there: use neurotap.load(), "
                         "which loads without them, or rebuild llama-cpp-python with "
                         "CMAKE_ARGS=\"-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8\"");
    ModelInfo info = inspect(path);
    fill_from_llama(info, m);
    return std::shared_ptr<Model>(new Model(m, false, std::move(info)));
}

std::shared_ptr<const ContributionWeights> Model::contribution_weights() const {
    std::lock_guard<std::mutex> lock(weights_mu_);
    if (!weights_) {
        check_open();
        check_file_unchanged();
        GgufFile f(info_.path);
        weights_ = std::make_shared<const ContributionWeights>(f, info_.n_layers, info_.n_ff, info_.n_embd, info_.n_vocab,
                                                              &info_.moe);
    }
    return weights_;
}

size_t Model::contribution_weights_loaded() const {
    std::lock_guard<std::mutex> lock(weights_mu_);
    return weights_ ? weights_->mapped_bytes() : 0;
}

std::vector<llama_token> Model::tokenize(const std::string& text, bool add_special, bool parse_special) const {
    if (text.size() > static_cast<size_t>(INT32_MAX / 2)) throw ParamError("prompt too long to tokenize");
    check_open();
    std::vector<llama_token> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                               static_cast<int32_t>(out.size()), add_special, parse_special);
    if (n < 0) {
        out.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                           static_cast<int32_t>(out.size()), add_special, parse_special);
        if (n < 0) throw RuntimeError("tokenization failed");
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

std::string Model::token_piece(llama_token tok) const {
    check_open();
    char buf[256];
    int32_t n = llama_token_to_piece(vocab_, tok, buf, sizeof(buf), 0, false);
    if (n >= 0) return std::string(buf, static_cast<size_t>(n));
    std::string big(static_cast<size_t>(-n), '\0');
    n = llama_token_to_piece(vocab_, tok, big.data(), static_cast<int32_t>(big.size()), 0, false);
    if (n < 0) throw RuntimeError("detokenization failed for token " + std::to_string(tok));
    big.resize(static_cast<size_t>(n));
    return big;
}

std::string Model::detokenize(const std::vector<llama_token>& toks) const {
    std::string s;
    for (llama_token t : toks) s += token_piece(t);
    return s;
}

std::string Model::apply_chat_template(const std::vector<std::pair<std::string, std::string>>& messages,
                                       bool add_assistant) const {
    const char* tmpl = llama_model_chat_template(get(), nullptr);
    if (!tmpl) throw ParamError("model has no chat template: pass a plain prompt instead of messages");
    std::vector<llama_chat_message> msgs;
    size_t total = 0;
    for (auto& m : messages) {
        msgs.push_back({m.first.c_str(), m.second.c_str()});
        total += m.first.size() + m.second.size();
    }
    std::vector<char> buf(total * 2 + 256);
    int32_t n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_assistant, buf.data(),
                                          static_cast<int32_t>(buf.size()));
    if (n < 0) throw ParamError("the model's chat template is not supported by llama.cpp's template engine");
    if (static_cast<size_t>(n) > buf.size()) {
        buf.resize(static_cast<size_t>(n));
        n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_assistant, buf.data(),
                                      static_cast<int32_t>(buf.size()));
    }
    return std::string(buf.data(), static_cast<size_t>(n));
}

}  // namespace neurotap
