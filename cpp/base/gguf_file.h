// Read-only view of a GGUF file: validated header, metadata and tensor table, and
// dequantized tensor reads. Everything read from the file is bounds-checked against its size.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ggml.h"

struct gguf_context;

namespace neurotap {

struct TensorInfo {
    std::string name;
    ggml_type type = GGML_TYPE_F32;
    int64_t ne[4] = {1, 1, 1, 1};
    uint64_t file_offset = 0;  // absolute offset of the data in the file
    uint64_t nbytes = 0;
};

class GgufFile {
public:
    // Throws ModelError naming the problem: missing, unreadable, not GGUF, truncated.
    explicit GgufFile(const std::string& path);
    ~GgufFile();
    GgufFile(const GgufFile&) = delete;
    GgufFile& operator=(const GgufFile&) = delete;

    const std::string& path() const { return path_; }
    uint64_t file_size() const { return file_size_; }

    bool has_key(const std::string& key) const;
    std::string get_string(const std::string& key) const;       // throws if missing / wrong type
    int64_t get_int(const std::string& key) const;              // any integer type
    double get_float(const std::string& key) const;             // f32 / f64
    std::string architecture() const { return get_string("general.architecture"); }

    const std::vector<TensorInfo>& tensors() const { return tensors_; }
    const TensorInfo* find_tensor(const std::string& name) const;  // nullptr if absent

    // Dequantized rows [row0, row0 + n_rows) of a 2-D tensor, each ne[0] floats.
    std::vector<float> read_rows(const std::string& name, int64_t row0, int64_t n_rows) const;
    std::vector<float> read_all(const std::string& name) const;
    // The raw, still encoded bytes of a 2-D tensor (size checked against its type and shape).
    std::vector<uint8_t> read_raw(const std::string& name) const;

private:
    std::string path_;
    uint64_t file_size_ = 0;
    gguf_context* ctx_ = nullptr;
    std::vector<TensorInfo> tensors_;
};

}  // namespace neurotap
