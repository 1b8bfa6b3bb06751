// A GGUF model validated for tapping: llama_model (owned, or borrowed from llama_cpp.Llama),
// its vocabulary, and which FFN activation tensor the tap reads.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "llama.h"
#include "runtime/ffn_tap.h"

namespace neurotap {

class ContributionWeights;
class TappedContext;

struct ModelInfo {
    std::string path;
    std::string architecture;
    std::string description;  // llama_model_desc
    std::string act_name;     // activation tensor, without the "-<layer>" suffix
    int n_layers = 0;
    int64_t n_ff = 0;          // neurons per layer; MoE: n_expert * n_ff_exp + n_ff_shexp (moe.width())
    MoeLayout moe;             // n_expert == 0 for a dense model
    std::string norm_name = "ffn_norm";  // the normed FFN input's tensor (gpt-oss: attn_post_norm)
    int64_t n_embd = 0;
    int n_vocab = 0;
    int n_ctx_train = 0;
    uint64_t n_params = 0;
    uint64_t size_bytes = 0;
    bool has_chat_template = false;
    // Bytes of K and V per KV cell (all layers, f16 cache): what a context's n_ctx costs.
    uint64_t kv_bytes_per_cell = 0;
    int64_t head_dim_k = 0, head_dim_v = 0;  // from the file when it states them (0: n_embd / n_head)
    int n_head = 0;                           // attention heads (query heads) per layer
    // The file as it was at load: what is read from it later (contribution weights) must come
    // from the same file, not one replaced on disk since.
    uint64_t file_size = 0;
    int64_t file_mtime_ns = 0;
    uint64_t file_inode = 0;
    // Some weight has a type llama.cpp's CPU backend may repack for its gemm/gemv kernels (Q4_0,
    // Q4_K, MXFP4, ...): a row's values then depend on its index in the batch mod 4 (see
    // kLargeBatch in tapped_context.h). Without such weights a matmul row does not.
    bool repackable_weights = false;
};

// Whether llama.cpp's CPU backend offers its AMX weight buffer, whose matmul crashes: models
// are then loaded with use_extra_bufts = false.
bool cpu_offers_amx_buffer();

// One device llama.cpp's backends offer in this build (ggml_backend_dev_*).
struct DeviceInfo {
    std::string name;         // "CPU", "Vulkan0", "CUDA0", "MTL0": what load(device=) takes
    std::string description;  // the driver's name for it ("llvmpipe (LLVM 15.0.6, 256 bits)")
    std::string type;         // "cpu", "gpu", "igpu", "accel" or "meta"
    size_t memory_free = 0, memory_total = 0;  // as the backend reports them (bytes)
};
// Every device of this llama.cpp build, in ggml's registry order.
std::vector<DeviceInfo> list_devices();

// Activation tensor name for a supported architecture; throws ModelError otherwise.
std::string activation_tensor_for(const std::string& arch);
// The same for a mixture-of-experts architecture (expert_count > 0): the compact activation
// ("ffn_moe_swiglu"); ModelError with the reason for one the tap cannot read correctly.
std::string moe_activation_tensor_for(const std::string& arch);

class Model {
public:
    // Validates the file (exists, GGUF, not truncated, supported architecture) before
    // llama.cpp sees it. Throws ModelError. n_gpu_layers: the last n layers go to the GPU
    // (n_layers + 1 also the output layer, -1 everything); device: a name from list_devices()
    // to use alone ("" lets llama.cpp use every GPU). ParamError/ModelError for a setting that
    // llama.cpp would silently ignore (more layers than the model has, no GPU device).
    static std::shared_ptr<Model> load(const std::string& path, int n_gpu_layers, const std::string& device = "");
    // Shares a llama_model loaded elsewhere (llama_cpp.Llama); it is never freed here.
    // amx_safe: the caller loaded it without AMX buffers (the C interface's applications).
    static std::shared_ptr<Model> borrow(llama_model* model, const std::string& path, bool amx_safe = false);
    ~Model();
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    // The llama.cpp handles; RuntimeError once the model is closed.
    llama_model* get() const { check_open(); return model_; }
    const llama_vocab* vocab() const { check_open(); return vocab_; }
    const ModelInfo& info() const { return info_; }

    // Frees every context created on this model (waiting for a decode in flight), then the
    // weights when this object owns them. Called for a borrowed model just before its owner
    // (llama_cpp.Llama.close) frees it. Afterwards every use raises RuntimeError.
    void close();
    bool closed() const { return closed_.load(); }
    void check_open() const;
    // RuntimeError when the file at info().path is no longer the one loaded (replaced or changed).
    void check_file_unchanged() const;
    // Contexts register themselves so that close() can free them before the weights.
    void attach(TappedContext* tc);
    void detach(TappedContext* tc);

    std::vector<llama_token> tokenize(const std::string& text, bool add_special, bool parse_special) const;
    std::string token_piece(llama_token tok) const;
    std::string detokenize(const std::vector<llama_token>& toks) const;
    // Messages are (role, content). Uses the model's built-in chat template.
    std::string apply_chat_template(const std::vector<std::pair<std::string, std::string>>& messages,
                                    bool add_assistant) const;
    bool is_eog(llama_token tok) const { return llama_vocab_is_eog(vocab(), tok); }
    // W_down columns and the unembedding for NAD contributions, read from the file on first use
    // and shared by every run afterwards.
    std::shared_ptr<const ContributionWeights> contribution_weights() const;
    // Bytes of the file mapped by the contribution weights, 0 until they are first used.
    size_t contribution_weights_loaded() const;

private:
    Model(llama_model* m, bool owned, ModelInfo info);
    llama_model* model_;
    bool owned_;
    const llama_vocab* vocab_;
    ModelInfo info_;
    std::atomic<bool> closed_{false};
    std::mutex contexts_mu_;
    std::vector<TappedContext*> contexts_;
    mutable std::mutex weights_mu_;
    mutable std::shared_ptr<const ContributionWeights> weights_;
};

}  // namespace neurotap
