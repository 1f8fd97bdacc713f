// The `segany` command's subcommands, one file each, and the few helpers they share.
// Each add_* function declares a subcommand's options on the parser and returns what to run once
// the command line has parsed; main() runs the one that was chosen and turns errors into exit 2.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "segany/predictor.h"

namespace segany::cli {

struct Command {
  CLI::App* app = nullptr;
  std::function<void()> run;
};

Command add_segment(CLI::App& parent);
Command add_everything(CLI::App& parent);
Command add_info(CLI::App& parent);
Command add_convert(CLI::App& parent);
Command add_init(CLI::App& parent);
Command add_bench(CLI::App& parent);
Command add_embed(CLI::App& parent);

// What every subcommand that runs the model takes: the checkpoint (the first positional argument),
// --config, --device, --dtype and --threads.
struct ModelArgs {
  std::string checkpoint, config, device = "cpu", dtype = "bf16";
  int threads = 0;
  PredictorOptions predictor_options() const {
    PredictorOptions p;
    p.device = device;
    p.dtype = dtype;
    p.config = config;
    p.threads = threads;
    return p;
  }
};
// Declares them on `app`; call it before the subcommand's own positional arguments.
void add_model_args(CLI::App* app, ModelArgs& m);

// "X,Y" or "X,Y,LABEL" (LABEL an integer; 1 foreground when absent). Throws segany::Error naming
// the option and the text on anything else. Range and finiteness are the Predictor's to check.
Point parse_point(const std::string& text);
// "X0,Y0,X1,Y1".
Box parse_box(const std::string& text);

// Scores are float32 predictions: six decimals keep JSON readable and lose nothing real.
double rounded(double v);
// JSON for people and programs alike: one line per key and one per record of an array of objects
// (masks, annotations), rather than one line per number; files of many masks stay diffable.
std::string format_result(const nlohmann::ordered_json& result);

// "8.6 MB": a size in bytes for people.
std::string human_bytes(uint64_t bytes);
// "93,735,472": a count for people.
std::string group_thousands(int64_t n);

// The warning printed wherever a model with random weights is made or used.
inline constexpr const char* kRandomWeightsWarning =
    "!!! RANDOM WEIGHTS: the masks of this model are meaningless; use it for tests and benchmarks only !!!";

}  // namespace segany::cli
