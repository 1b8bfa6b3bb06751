// Native tests of the neurotap core: GGUF validation, the FFN tap protocol, and generation on
// a real model, one file per component (test_<group>.cpp, a ctest group each). No framework:
// each test is a function, CHECK records failures, and the last line is "N passed, N failed". Built under NEUROTAP_BUILD_TESTS; cpp/tests/run_sanitized.sh
// runs it under ASan/UBSan.
//
// Usage: neurotap_native_tests [MODEL.gguf]   (else $NEUROTAP_TEST_MODEL)
#include "tests/common.h"

int main(int argc, char** argv) {
    std::vector<std::string> groups;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--group" && i + 1 < argc) {
            groups.push_back(argv[++i]);
        } else if (!arg.empty()) {
            g_model_path = arg;
        }
    }
    if (g_model_path.empty())
        if (const char* env = std::getenv("NEUROTAP_TEST_MODEL")) g_model_path = env;
    auto selected = [&](const TestCase& tc) {
        return groups.empty() || std::find(groups.begin(), groups.end(), tc.group) != groups.end();
    };
    const char* verbose = std::getenv("NEUROTAP_TEST_VERBOSE");
    install_log_capture(verbose && *verbose && std::strcmp(verbose, "0") != 0);

    // Model-free tests first, then those on the real model, each in component order.
    std::vector<TestCase> model_free, with_model;
    for (auto tests : {tap_tests, gguf_tests, reducers_tests, moe_tests, nad_tests, neat_tests, generate_tests, decode_loop_tests,
                       batcher_tests, neureasoner_tests})
        for (const TestCase& tc : tests()) (tc.needs_model ? with_model : model_free).push_back(tc);

    int passed = 0, failed = 0;
    auto run = [&](const TestCase& tc) {
        g_check_failures = 0;
        std::printf("[ RUN  ] %s\n", tc.name);
        std::fflush(stdout);
        try {
            tc.fn();
        } catch (const std::exception& e) {
            report_failure(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
        } catch (...) {
            report_failure(__FILE__, __LINE__, "uncaught non-std exception");
        }
        const bool ok = g_check_failures == 0;
        (ok ? passed : failed) += 1;
        std::printf("[ %s ] %s\n", ok ? " OK " : "FAIL", tc.name);
        std::fflush(stdout);
    };

    for (const TestCase& tc : model_free)
        if (selected(tc)) run(tc);
    bool needs_model = false;
    for (const TestCase& tc : with_model) needs_model = needs_model || selected(tc);
    if (needs_model && g_model_path.empty()) {
        std::fprintf(stderr, "no model: pass a GGUF path or set NEUROTAP_TEST_MODEL\n");
        failed += 1;
    } else {
        for (const TestCase& tc : with_model)
            if (selected(tc)) run(tc);
    }
    if (passed + failed == 0) {
        std::fprintf(stderr, "no test in the selected groups\n");
        failed += 1;
    }
    g_model.reset();
    std::fflush(stderr);
    std::printf("%d passed, %d failed\n", passed, failed);
    std::fflush(stdout);  // LeakSanitizer exits without flushing stdio
    return failed == 0 ? 0 : 1;
}
