// NEAT calibration files (the JSON that `neurotap neat calibrate` writes) read without Python, so
// that C++ programs can run NEAT's early exit through the core library alone.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "runtime/model.h"
#include "methods/neat.h"

namespace neurotap {

struct NeatCalibrationFile {
    int version = 0;
    std::vector<std::pair<int, int>> neurons;  // (layer, index)
    std::vector<float> reference;
    float exit_similarity = 0.6f, ban_similarity = 0.4f, magnitude = 0.0f;
    bool line_starts_only = true;
    std::string marker, answer_prefix;
    std::vector<std::string> ban_words;
    // What it was calibrated on (the "model" object): checked against the loaded model.
    std::string architecture, file;
    int n_layers = 0;
    long long n_ff = 0;
};

// Parses and validates a calibration file; ModelError names the file and the problem.
NeatCalibrationFile load_neat_calibration(const std::string& path);

// The run-time configuration for `model`: ban words tokenized (each word with and without a
// leading space, only where it is one token, as in Python), exit tokens = marker + answer prefix.
// ModelError when the calibration was made for another shape or architecture.
NeatConfig neat_config(const NeatCalibrationFile& cal, const Model& model);

}  // namespace neurotap
