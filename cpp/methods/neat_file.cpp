#include "methods/neat_file.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "base/errors.h"

namespace neurotap {

namespace {

// Just enough JSON for calibration files: objects, arrays, strings (with \uXXXX for the BMP),
// numbers, true/false/null. Depth and size are bounded; every error throws.
struct Json {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool b = false;
    double num = 0;
    std::string str;
    std::vector<Json> items;
    std::map<std::string, Json> fields;
};

class Parser {
public:
    Parser(const std::string& text, const std::string& path) : s_(text), path_(path) {}
    Json parse() {
        Json v = value(0);
        ws();
        if (i_ != s_.size()) fail("trailing characters");
        return v;
    }

private:
    [[noreturn]] void fail(const std::string& what) const {
        throw ModelError(path_ + ": not a valid NEAT calibration (JSON " + what + " at byte " + std::to_string(i_) + ")");
    }
    void ws() {
        while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
    }
    bool eat(char c) {
        ws();
        if (i_ < s_.size() && s_[i_] == c) return ++i_, true;
        return false;
    }
    void expect(char c) {
        if (!eat(c)) fail(std::string("'") + c + "' expected");
    }
    Json value(int depth) {
        if (depth > 32) fail("nesting too deep");
        ws();
        if (i_ >= s_.size()) fail("unexpected end");
        Json v;
        const char c = s_[i_];
        if (c == '{') {
            ++i_;
            v.kind = Json::Object;
            if (eat('}')) return v;
            do {
                ws();
                std::string key = string();
                expect(':');
                v.fields[key] = value(depth + 1);
            } while (eat(','));
            expect('}');
        } else if (c == '[') {
            ++i_;
            v.kind = Json::Array;
            if (eat(']')) return v;
            do v.items.push_back(value(depth + 1));
            while (eat(','));
            expect(']');
        } else if (c == '"') {
            v.kind = Json::String;
            v.str = string();
        } else if (s_.compare(i_, 4, "true") == 0) {
            v.kind = Json::Bool, v.b = true, i_ += 4;
        } else if (s_.compare(i_, 5, "false") == 0) {
            v.kind = Json::Bool, i_ += 5;
        } else if (s_.compare(i_, 4, "null") == 0) {
            i_ += 4;
        } else {
            const char* begin = s_.c_str() + i_;
            char* end = nullptr;
            v.num = std::strtod(begin, &end);
            if (end == begin) fail("value expected");
            i_ += static_cast<size_t>(end - begin);
            v.kind = Json::Number;
        }
        return v;
    }
    std::string string() {
        if (i_ >= s_.size() || s_[i_] != '"') fail("string expected");
        ++i_;
        std::string out;
        while (i_ < s_.size() && s_[i_] != '"') {
            char c = s_[i_++];
            if (c != '\\') {
                out += c;
                continue;
            }
            if (i_ >= s_.size()) fail("unterminated escape");
            c = s_[i_++];
            switch (c) {
                case 'n': out += '\n'; break;
                case 't': out += '\t'; break;
                case 'r': out += '\r'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'u': {
                    if (i_ + 4 > s_.size()) fail("short \\u escape");
                    const unsigned cp = static_cast<unsigned>(std::strtoul(s_.substr(i_, 4).c_str(), nullptr, 16));
                    i_ += 4;
                    if (cp < 0x80) out += static_cast<char>(cp);
                    else if (cp < 0x800) out += static_cast<char>(0xC0 | (cp >> 6)), out += static_cast<char>(0x80 | (cp & 0x3F));
                    else out += static_cast<char>(0xE0 | (cp >> 12)), out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F)),
                         out += static_cast<char>(0x80 | (cp & 0x3F));
                    break;
                }
                default: out += c;  // \" \\ \/
            }
        }
        if (i_ >= s_.size()) fail("unterminated string");
        ++i_;
        return out;
    }
    const std::string& s_;
    const std::string& path_;
    size_t i_ = 0;
};

}  // namespace

NeatCalibrationFile load_neat_calibration(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw ModelError("NEAT calibration file not found or unreadable: " + path);
    std::ostringstream buf;
    buf << in.rdbuf();
    const std::string text = buf.str();
    if (text.size() > (size_t{64} << 20)) throw ModelError(path + ": not a NEAT calibration (over 64 MiB)");
    const Json root = Parser(text, path).parse();
    auto bad = [&](const std::string& what) { return ModelError(path + ": not a valid NEAT calibration (" + what + ")"); };
    if (root.kind != Json::Object) throw bad("top level is not an object");
    auto field = [&](const Json& obj, const char* key, Json::Kind kind) -> const Json& {
        auto it = obj.fields.find(key);
        if (it == obj.fields.end() || it->second.kind != kind) throw bad(std::string("missing or malformed field: ") + key);
        return it->second;
    };
    auto finite = [&](const Json& v, const char* what) {
        if (!std::isfinite(v.num)) throw bad(std::string("non-finite ") + what);
        return v.num;
    };
    auto integer = [&](const Json& v, const char* what) {
        if (v.kind != Json::Number || v.num != std::floor(v.num) || std::fabs(v.num) > 1e9) throw bad(std::string("bad ") + what);
        return static_cast<long long>(v.num);
    };
    NeatCalibrationFile c;
    c.version = static_cast<int>(integer(field(root, "version", Json::Number), "version"));
    if (c.version != 1) throw bad("version " + std::to_string(c.version) + ", this neurotap reads version 1");
    for (const Json& n : field(root, "neurons", Json::Array).items) {
        if (n.kind != Json::Array || n.items.size() != 2) throw bad("a neuron is not a [layer, index] pair");
        c.neurons.emplace_back(static_cast<int>(integer(n.items[0], "layer")), static_cast<int>(integer(n.items[1], "index")));
    }
    for (const Json& r : field(root, "reference", Json::Array).items) {
        if (r.kind != Json::Number) throw bad("a reference value is not a number");
        c.reference.push_back(static_cast<float>(finite(r, "reference")));
    }
    if (c.neurons.empty() || c.neurons.size() != c.reference.size())
        throw bad("neurons and reference must be non-empty and of equal length");
    c.exit_similarity = static_cast<float>(finite(field(root, "exit_similarity", Json::Number), "exit_similarity"));
    c.ban_similarity = static_cast<float>(finite(field(root, "ban_similarity", Json::Number), "ban_similarity"));
    c.magnitude = static_cast<float>(finite(field(root, "magnitude", Json::Number), "magnitude"));
    c.line_starts_only = field(root, "line_starts_only", Json::Bool).b;
    c.marker = field(root, "marker", Json::String).str;
    auto prefix = root.fields.find("answer_prefix");
    if (prefix != root.fields.end() && prefix->second.kind == Json::String) c.answer_prefix = prefix->second.str;
    for (const Json& w : field(root, "ban_words", Json::Array).items) {
        if (w.kind != Json::String) throw bad("a ban word is not a string");
        c.ban_words.push_back(w.str);
    }
    const Json& m = field(root, "model", Json::Object);
    c.architecture = field(m, "architecture", Json::String).str;
    c.file = field(m, "file", Json::String).str;
    c.n_layers = static_cast<int>(integer(field(m, "n_layers", Json::Number), "n_layers"));
    c.n_ff = integer(field(m, "n_ff", Json::Number), "n_ff");
    return c;
}

NeatConfig neat_config(const NeatCalibrationFile& cal, const Model& model) {
    const ModelInfo& mi = model.info();
    if (cal.architecture != mi.architecture || cal.n_layers != mi.n_layers || cal.n_ff != mi.n_ff)
        throw ModelError("the NEAT calibration was made for " + cal.file + " (" + cal.architecture + ", " +
                         std::to_string(cal.n_layers) + " layers x " + std::to_string(cal.n_ff) + "), not " +
                         mi.path + " (" + mi.architecture + ", " + std::to_string(mi.n_layers) + " x " +
                         std::to_string(mi.n_ff) + "): calibrate this model with `neurotap neat calibrate`");
    NeatConfig cfg;
    cfg.neurons = cal.neurons;
    cfg.reference = cal.reference;
    cfg.exit_similarity = cal.exit_similarity;
    cfg.ban_similarity = cal.ban_similarity;
    cfg.magnitude = cal.magnitude;
    cfg.line_starts_only = cal.line_starts_only;
    for (const std::string& w : cal.ban_words) {
        for (const std::string& form : {w, " " + w}) {
            const auto ids = model.tokenize(form, false, false);
            if (ids.size() == 1 && std::find(cfg.ban_tokens.begin(), cfg.ban_tokens.end(), ids[0]) == cfg.ban_tokens.end())
                cfg.ban_tokens.push_back(ids[0]);
        }
    }
    cfg.exit_tokens = model.tokenize(cal.marker + cal.answer_prefix, false, true);
    return cfg;
}

}  // namespace neurotap
