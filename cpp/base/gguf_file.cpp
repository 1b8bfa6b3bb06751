#include "base/gguf_file.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <sys/stat.h>

#include "base/errors.h"
#include "gguf.h"
#include "base/log_capture.h"

namespace neurotap {

namespace {
struct FileCloser {
    void operator()(FILE* f) const { if (f) std::fclose(f); }
};
}  // namespace

GgufFile::GgufFile(const std::string& path) : path_(path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) throw ModelError("model file not found: " + path);
    if (!S_ISREG(st.st_mode)) throw ModelError("model path is not a regular file: " + path);
    file_size_ = static_cast<uint64_t>(st.st_size);

    {
        std::ifstream in(path, std::ios::binary);
        if (!in) throw ModelError("cannot open model file: " + path);
        char magic[4] = {0, 0, 0, 0};
        in.read(magic, 4);
        if (in.gcount() != 4 || std::memcmp(magic, "GGUF", 4) != 0)
            throw ModelError("not a GGUF file (bad magic bytes): " + path);
    }

    take_logged_errors();
    gguf_init_params params{/*no_alloc=*/true, /*ctx=*/nullptr};
    ctx_ = gguf_init_from_file(path.c_str(), params);
    if (!ctx_) {
        std::string why = take_logged_errors();
        throw ModelError("corrupt or truncated GGUF header: " + path + (why.empty() ? "" : " (" + why + ")"));
    }

    // The destructor does not run if the constructor throws: until the tensor table is
    // validated, the context is owned here.
    std::unique_ptr<gguf_context, decltype(&gguf_free)> owner(ctx_, &gguf_free);
    const uint64_t data_offset = gguf_get_data_offset(ctx_);
    const int64_t n = gguf_get_n_tensors(ctx_);
    tensors_.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        TensorInfo t;
        t.name = gguf_get_tensor_name(ctx_, i);
        t.type = gguf_get_tensor_type(ctx_, i);
        const int64_t* ne = gguf_get_tensor_ne(ctx_, i);
        for (int d = 0; d < 4; ++d) t.ne[d] = ne[d];
        // gguf accepts a zero-width tensor with any row count; keep row counts representable.
        int64_t rows;
        if (__builtin_mul_overflow(t.ne[1], t.ne[2], &rows) || __builtin_mul_overflow(rows, t.ne[3], &rows))
            throw ModelError("tensor '" + t.name + "' has an implausible shape in " + path);
        t.nbytes = gguf_get_tensor_size(ctx_, i);
        const uint64_t rel = gguf_get_tensor_offset(ctx_, i);
        if (rel > std::numeric_limits<uint64_t>::max() - data_offset ||
            data_offset + rel > std::numeric_limits<uint64_t>::max() - t.nbytes ||
            data_offset + rel + t.nbytes > file_size_) {
            throw ModelError("truncated GGUF file: tensor '" + t.name + "' extends past the end of " + path +
                             " (file is " + std::to_string(file_size_) + " bytes)");
        }
        t.file_offset = data_offset + rel;
        tensors_.push_back(std::move(t));
    }
    owner.release();
}

GgufFile::~GgufFile() {
    if (ctx_) gguf_free(ctx_);
}

bool GgufFile::has_key(const std::string& key) const { return gguf_find_key(ctx_, key.c_str()) >= 0; }

std::string GgufFile::get_string(const std::string& key) const {
    const int64_t id = gguf_find_key(ctx_, key.c_str());
    if (id < 0) throw ModelError("GGUF key '" + key + "' missing in " + path_);
    if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_STRING)
        throw ModelError("GGUF key '" + key + "' is not a string in " + path_);
    return gguf_get_val_str(ctx_, id);
}

int64_t GgufFile::get_int(const std::string& key) const {
    const int64_t id = gguf_find_key(ctx_, key.c_str());
    if (id < 0) throw ModelError("GGUF key '" + key + "' missing in " + path_);
    switch (gguf_get_kv_type(ctx_, id)) {
        case GGUF_TYPE_UINT8: return gguf_get_val_u8(ctx_, id);
        case GGUF_TYPE_INT8: return gguf_get_val_i8(ctx_, id);
        case GGUF_TYPE_UINT16: return gguf_get_val_u16(ctx_, id);
        case GGUF_TYPE_INT16: return gguf_get_val_i16(ctx_, id);
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(ctx_, id);
        case GGUF_TYPE_INT32: return gguf_get_val_i32(ctx_, id);
        case GGUF_TYPE_UINT64: return static_cast<int64_t>(gguf_get_val_u64(ctx_, id));
        case GGUF_TYPE_INT64: return gguf_get_val_i64(ctx_, id);
        default: throw ModelError("GGUF key '" + key + "' is not an integer in " + path_);
    }
}

double GgufFile::get_float(const std::string& key) const {
    const int64_t id = gguf_find_key(ctx_, key.c_str());
    if (id < 0) throw ModelError("GGUF key '" + key + "' missing in " + path_);
    switch (gguf_get_kv_type(ctx_, id)) {
        case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(ctx_, id);
        case GGUF_TYPE_FLOAT64: return gguf_get_val_f64(ctx_, id);
        default: throw ModelError("GGUF key '" + key + "' is not a float in " + path_);
    }
}

const TensorInfo* GgufFile::find_tensor(const std::string& name) const {
    for (const auto& t : tensors_)
        if (t.name == name) return &t;
    return nullptr;
}

std::vector<float> GgufFile::read_rows(const std::string& name, int64_t row0, int64_t n_rows) const {
    const TensorInfo* t = find_tensor(name);
    if (!t) throw ModelError("tensor '" + name + "' not found in " + path_);
    const int64_t ne0 = t->ne[0];
    const int64_t total_rows = t->ne[1] * t->ne[2] * t->ne[3];
    if (row0 < 0 || n_rows < 0 || row0 > total_rows || n_rows > total_rows - row0)
        throw ParamError(std::to_string(n_rows) + " rows from row " + std::to_string(row0) +
                         " out of range for tensor '" + name + "' with " + std::to_string(total_rows) + " rows");
    const size_t row_bytes = ggml_row_size(t->type, ne0);
    if (row_bytes * static_cast<uint64_t>(total_rows) != t->nbytes)
        throw ModelError("tensor '" + name + "' has an inconsistent size in " + path_);
    const auto* traits = ggml_get_type_traits(t->type);
    if (t->type != GGML_TYPE_F32 && (!traits || !traits->to_float))
        throw ModelError("tensor '" + name + "' has type " + ggml_type_name(t->type) + ", which cannot be dequantized");

    std::unique_ptr<FILE, FileCloser> f(std::fopen(path_.c_str(), "rb"));
    if (!f) throw ModelError("cannot open model file: " + path_);
    const uint64_t off = t->file_offset + static_cast<uint64_t>(row0) * row_bytes;
    if (fseeko(f.get(), static_cast<off_t>(off), SEEK_SET) != 0) throw ModelError("seek failed in " + path_);
    std::vector<uint8_t> raw(row_bytes * static_cast<size_t>(n_rows));
    if (!raw.empty() && std::fread(raw.data(), 1, raw.size(), f.get()) != raw.size())
        throw ModelError("short read of tensor '" + name + "' in " + path_ + " (file changed or truncated)");
    std::vector<float> out(static_cast<size_t>(ne0 * n_rows));
    if (t->type == GGML_TYPE_F32) {
        std::memcpy(out.data(), raw.data(), raw.size());
    } else {
        for (int64_t r = 0; r < n_rows; ++r)
            traits->to_float(raw.data() + r * row_bytes, out.data() + r * ne0, ne0);
    }
    return out;
}

std::vector<uint8_t> GgufFile::read_raw(const std::string& name) const {
    const TensorInfo* t = find_tensor(name);
    if (!t) throw ModelError("tensor '" + name + "' not found in " + path_);
    const int64_t total_rows = t->ne[1] * t->ne[2] * t->ne[3];
    if (ggml_row_size(t->type, t->ne[0]) * static_cast<uint64_t>(total_rows) != t->nbytes)
        throw ModelError("tensor '" + name + "' has an inconsistent size in " + path_);
    std::unique_ptr<FILE, FileCloser> f(std::fopen(path_.c_str(), "rb"));
    if (!f) throw ModelError("cannot open model file: " + path_);
    if (fseeko(f.get(), static_cast<off_t>(t->file_offset), SEEK_SET) != 0) throw ModelError("seek failed in " + path_);
    std::vector<uint8_t> raw(t->nbytes);
    if (!raw.empty() && std::fread(raw.data(), 1, raw.size(), f.get()) != raw.size())
        throw ModelError("short read of tensor '" + name + "' in " + path_ + " (file changed or truncated)");
    return raw;
}

std::vector<float> GgufFile::read_all(const std::string& name) const {
    const TensorInfo* t = find_tensor(name);
    if (!t) throw ModelError("tensor '" + name + "' not found in " + path_);
    return read_rows(name, 0, t->ne[1] * t->ne[2] * t->ne[3]);
}

}  // namespace neurotap
