// The segany command, run as a user runs it: files written, their contents consistent with each
// other, and every bad input turned into a message and exit code 2 (never a crash).
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "model/config.h"
#include "model/sam.h"
#include "pipeline/amg_utils.h"
#include "segany/image.h"
#include "test_util.h"

namespace segany {
namespace {

namespace fs = std::filesystem;

struct CliRun {
  int code = -1;
  std::string out, err;
};

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Single quotes for the shell: our paths have no quotes in them.
std::string q(const std::string& s) { return "'" + s + "'"; }

// Runs `segany ARGS` with stdout and stderr captured in files under `dir`.
CliRun segany(const std::string& args, const std::string& dir) {
  static int calls = 0;
  const std::string base = dir + "/run" + std::to_string(calls++);
  const std::string cmd = q(SEGANY_CLI_PATH) + " " + args + " >" + q(base + ".out") + " 2>" + q(base + ".err");
  const int status = std::system(cmd.c_str());
  CliRun r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;  // -1: killed by a signal, i.e. crashed
  r.out = read_text(base + ".out");
  r.err = read_text(base + ".err");
  return r;
}

#define EXPECT_CONTAINS(text, part) \
  EXPECT_NE(std::string(text).find(part), std::string::npos) << "'" << (text) << "' lacks '" << (part) << "'"

// Exit code 2 and a message that names the problem.
#define EXPECT_FAILS_WITH(run, part)                              \
  do {                                                            \
    const CliRun& r_ = (run);                                        \
    EXPECT_EQ(r_.code, 2) << "stdout: " << r_.out << "\nstderr: " << r_.err; \
    EXPECT_CONTAINS(r_.err, part);                                \
  } while (0)

std::string micro() { return test::golden_dir() + "/micro_h64"; }
std::string checkpoint() { return micro() + "/checkpoint.pth"; }
std::string config() { return micro() + "/config.json"; }
std::string dog() { return test::shared_dir() + "/images/dog.jpg"; }  // 800x534
// The micro model on the dog, with whatever else the test asks for.
std::string segment_args(const std::string& extra) {
  return "segment " + q(checkpoint()) + " " + q(dog()) + " --config " + q(config()) + " " + extra;
}

int64_t golden_parameters() {
  return count_parameters(SamConfig::from_json_file(config()), io::load_checkpoint(checkpoint()));
}

// ---------------------------------------------------------------------------------------------
// Usage

TEST(Cli, HelpOfEverySubcommandListsItsOptions) {
  const std::string dir = test::temp_dir("cli_help");
  const std::vector<std::pair<std::string, std::vector<std::string>>> commands = {
      {"segment", {"--point", "--box", "--mask-input", "--multimask", "--out", "--dump", "--device", "--threads", "--config",
                   "--prompts", "--png", "--batch", "--workers", "--dtype"}},
      {"info", {"--config", "--json"}},
      {"convert", {"--dtype"}},
      {"init", {"--arch", "--seed", "--config"}},
      {"bench", {"--arch", "--device", "--dtype", "--batch", "--iters", "--warmup", "--checkpoint", "--threads", "--prompts"}},
      {"embed", {"--config", "--device", "--dtype", "--batch", "--out", "--threads", "--workers"}},
      {"everything", {"--points-per-side", "--points-per-batch", "--pred-iou-thresh", "--stability-score-thresh",
                      "--stability-score-offset", "--box-nms-thresh", "--crop-n-layers", "--crop-nms-thresh",
                      "--crop-overlap-ratio", "--crop-n-points-downscale-factor", "--min-mask-region-area",
                      "--output-mode", "--overlay", "--out", "--device", "--config", "--dtype"}},
  };
  const CliRun top = segany("--help", dir);
  EXPECT_EQ(top.code, 0) << top.err;
  for (const auto& [name, options] : commands) {
    EXPECT_CONTAINS(top.out, name);
    const CliRun r = segany(name + " --help", dir);
    EXPECT_EQ(r.code, 0) << name << ": " << r.err;
    for (const std::string& o : options) EXPECT_CONTAINS(r.out, o);
  }
  const CliRun v = segany("--version", dir);
  EXPECT_EQ(v.code, 0);
  EXPECT_CONTAINS(v.out, "segany ");
}

TEST(Cli, UsageErrorsExitWithTwo) {
  const std::string dir = test::temp_dir("cli_usage");
  EXPECT_FAILS_WITH(segany("", dir), "subcommand");
  EXPECT_FAILS_WITH(segany("frobnicate", dir), "frobnicate");
  EXPECT_FAILS_WITH(segany("info", dir), "checkpoint");
  if (test::have_golden()) {  // existing files, so that the option or positional is what fails
    EXPECT_FAILS_WITH(segany("segment --no-such-option " + q(checkpoint()) + " " + q(dog()), dir), "--no-such-option");
    EXPECT_FAILS_WITH(segany("segment " + q(checkpoint()), dir), "image");  // a positional missing
  }
  EXPECT_FAILS_WITH(segany("init " + q(dir + "/x.safetensors"), dir), "--arch");                  // neither --arch nor --config
  EXPECT_FAILS_WITH(segany("init --arch vit_q " + q(dir + "/x.safetensors"), dir), "vit_q");
  EXPECT_FAILS_WITH(segany("bench --arch vit_b --device tpu", dir), "tpu");
  EXPECT_FAILS_WITH(segany("bench --arch vit_b --dtype fp8", dir), "--device cuda");  // fp8 is for the GPU
  if (test::have_golden())
    EXPECT_FAILS_WITH(segany("embed " + q(checkpoint()) + " " + q(dog()) + " --dtype fp8 --out " + q(dir + "/e"), dir),
                      "device cuda");
  EXPECT_FAILS_WITH(segany("bench --arch vit_b --device cuda --dtype int4", dir), "int4");
}

// ---------------------------------------------------------------------------------------------
// segment

// Every mask PNG is 0/255, and result.json's area and bbox are those of the PNG.
void expect_consistent(const std::string& out, int expected_masks) {
  const nlohmann::json j = nlohmann::json::parse(read_text(out + "/result.json"));
  EXPECT_EQ(j.at("image").get<std::string>(), dog());
  EXPECT_EQ(j.at("width").get<int>(), 800);
  EXPECT_EQ(j.at("height").get<int>(), 534);
  ASSERT_EQ(j.at("masks").size(), static_cast<size_t>(expected_masks));
  for (int m = 0; m < expected_masks; ++m) {
    const nlohmann::json& mj = j["masks"][m];
    const std::string file = mj.at("file").get<std::string>();
    EXPECT_EQ(file, "mask_" + std::to_string(m) + ".png");
    EXPECT_TRUE(std::isfinite(mj.at("score").get<double>()));
    const Image mask = load_image(out + "/" + file);
    ASSERT_EQ(mask.width, 800);
    ASSERT_EQ(mask.height, 534);
    int64_t area = 0;
    int x0 = mask.width, y0 = mask.height, x1 = -1, y1 = -1;
    for (int y = 0; y < mask.height; ++y)
      for (int x = 0; x < mask.width; ++x) {
        const uint8_t* p = mask.pixel(x, y);
        ASSERT_TRUE((p[0] == 0 || p[0] == 255) && p[1] == p[0] && p[2] == p[0]) << file << " at " << x << "," << y;
        if (!p[0]) continue;
        ++area;
        x0 = std::min(x0, x);
        y0 = std::min(y0, y);
        x1 = std::max(x1, x);
        y1 = std::max(y1, y);
      }
    EXPECT_EQ(mj.at("area").get<int64_t>(), area) << file;
    const std::vector<int> bbox = area ? std::vector<int>{x0, y0, x1 - x0 + 1, y1 - y0 + 1} : std::vector<int>{0, 0, 0, 0};
    EXPECT_EQ(mj.at("bbox").get<std::vector<int>>(), bbox) << file;
  }
  const Image overlay = load_image(out + "/overlay.png");
  EXPECT_EQ(overlay.width, 800);
  EXPECT_EQ(overlay.height, 534);
}

TEST(Cli, SegmentWritesMasksOverlayAndResult) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_segment"), out = dir + "/out";
  const CliRun r = segany(segment_args("--point 400,250 --out " + q(out)), dir);
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* f : {"mask_0.png", "overlay.png", "result.json"}) EXPECT_TRUE(fs::exists(out + "/" + f)) << f;
  expect_consistent(out, 1);
}

TEST(Cli, SegmentMultimaskGivesThreeMasks) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_multimask"), out = dir + "/out";
  const CliRun r = segany(segment_args("--point 400,250 --point 100,80,0 --box 200,100,600,500 --multimask --out " + q(out)), dir);
  ASSERT_EQ(r.code, 0) << r.err;
  expect_consistent(out, 3);
  const nlohmann::json j = nlohmann::json::parse(read_text(out + "/result.json"));
  EXPECT_EQ(j["prompt"]["points"], nlohmann::json::parse("[[400.0, 250.0, 1], [100.0, 80.0, 0]]"));
  EXPECT_EQ(j["prompt"]["box"], nlohmann::json::parse("[200.0, 100.0, 600.0, 500.0]"));
}

TEST(Cli, SegmentDumpsTensorsThatFeedBackAsMaskInput) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_dump"), dump = dir + "/dump.safetensors";
  const CliRun r = segany(segment_args("--point 400,250 --multimask --out " + q(dir + "/a") + " --dump " + q(dump)), dir);
  ASSERT_EQ(r.code, 0) << r.err;
  const io::TensorMap t = io::load_safetensors(dump);
  EXPECT_EQ(t.at("image_embedding").shape(), (Shape{1, 128, 64, 64}));
  EXPECT_EQ(t.at("low_res_logits").shape(), (Shape{3, 256, 256}));
  EXPECT_EQ(t.at("iou_predictions").shape(), (Shape{3}));
  EXPECT_EQ(t.at("mask_input").shape(), (Shape{1, 256, 256}));
  for (const char* name : {"image_embedding", "low_res_logits", "iou_predictions", "mask_input"})
    EXPECT_EQ(t.at(name).dtype(), DType::F32) << name;
  // result.json's scores are the dumped predictions.
  const nlohmann::json j = nlohmann::json::parse(read_text(dir + "/a/result.json"));
  for (int m = 0; m < 3; ++m)
    EXPECT_NEAR(j["masks"][m]["score"].get<double>(), t.at("iou_predictions").data_as<const float>()[m], 1e-5);

  const CliRun again = segany(segment_args("--point 400,250 --mask-input " + q(dump) + " --out " + q(dir + "/b")), dir);
  ASSERT_EQ(again.code, 0) << again.err;
  expect_consistent(dir + "/b", 1);
}

TEST(Cli, SegmentRejectsBadInputsWithExitTwo) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_errors"), out = " --out " + q(dir + "/out");

  EXPECT_FAILS_WITH(segany("segment " + q(dir + "/absent.pth") + " " + q(dog()) + " --point 1,1", dir), "absent.pth");

  const std::string truncated = dir + "/truncated.pth";
  {
    std::ifstream in(checkpoint(), std::ios::binary);
    std::vector<char> head(1000);
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    std::ofstream(truncated, std::ios::binary).write(head.data(), static_cast<std::streamsize>(head.size()));
  }
  EXPECT_FAILS_WITH(segany("segment " + q(truncated) + " " + q(dog()) + " --point 1,1" + out, dir), "segany: error:");

  const std::string not_an_image = dir + "/x.jpg";
  std::ofstream(not_an_image) << "this is text, not a JPEG\n";
  EXPECT_FAILS_WITH(segany("segment " + q(checkpoint()) + " " + q(not_an_image) + " --config " + q(config()) +
                               " --point 1,1" + out, dir),
                    "x.jpg");

  EXPECT_FAILS_WITH(segany(segment_args("--point abc" + out), dir), "--point 'abc'");
  EXPECT_FAILS_WITH(segany(segment_args("--point 1,2,3,4" + out), dir), "--point '1,2,3,4'");
  EXPECT_FAILS_WITH(segany(segment_args("--point 1,2x" + out), dir), "--point '1,2x'");
  EXPECT_FAILS_WITH(segany(segment_args("--box 1,2,3" + out), dir), "--box '1,2,3'");
  EXPECT_FAILS_WITH(segany(segment_args(out), dir), "--point");  // no prompt at all
  // Checked by the Predictor once it knows the image.
  EXPECT_FAILS_WITH(segany(segment_args("--point 5000,10" + out), dir), "outside");
  EXPECT_FAILS_WITH(segany(segment_args("--point nan,3" + out), dir), "finite");
  EXPECT_FAILS_WITH(segany(segment_args("--point 10,10,7" + out), dir), "label");
  EXPECT_FAILS_WITH(segany(segment_args("--box 300,10,100,200" + out), dir), "x0 <= x1");

  const std::string no_mask = dir + "/no_mask.safetensors", small_mask = dir + "/small_mask.safetensors";
  io::save_safetensors(no_mask, {{"something_else", Tensor::zeros({1, 256, 256})}});
  EXPECT_FAILS_WITH(segany(segment_args("--point 1,1 --mask-input " + q(no_mask) + out), dir), "mask_input");
  io::save_safetensors(small_mask, {{"mask_input", Tensor::zeros({1, 64, 64})}});
  EXPECT_FAILS_WITH(segany(segment_args("--point 1,1 --mask-input " + q(small_mask) + out), dir), "mask input");

  EXPECT_FAILS_WITH(segany(segment_args("--point 1,1 --device gpu" + out), dir), "gpu");
}

// ---------------------------------------------------------------------------------------------
// info, init, convert, bench

TEST(Cli, InfoPrintsArchitectureAndParameterCount) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_info");
  const int64_t params = golden_parameters();
  const CliRun text = segany("info " + q(checkpoint()) + " --config " + q(config()), dir);
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_CONTAINS(text.out, "custom");
  EXPECT_CONTAINS(text.out, "embed_dim 128");
  const std::string digits = std::to_string(params);
  std::string grouped;  // 2231104 -> 2,231,104
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) grouped += ',';
    grouped += digits[i];
  }
  EXPECT_CONTAINS(text.out, grouped);

  const CliRun json = segany("info --json " + q(checkpoint()) + " --config " + q(config()), dir);
  ASSERT_EQ(json.code, 0) << json.err;
  const nlohmann::json j = nlohmann::json::parse(json.out);
  EXPECT_EQ(j.at("arch"), "custom");
  EXPECT_EQ(j.at("parameters").get<int64_t>(), params);
  EXPECT_EQ(j.at("tensors").get<size_t>(), io::load_checkpoint(checkpoint()).size());
  EXPECT_EQ(j.at("dtypes").at("F32").get<size_t>(), j.at("tensors").get<size_t>());
  EXPECT_EQ(j.at("file_size").get<uint64_t>(), fs::file_size(checkpoint()));

  // Without the config the micro model's head counts cannot be known, but nothing breaks silently:
  // it either infers something that validates or says why not.
  const CliRun inferred = segany("info " + q(checkpoint()), dir);
  EXPECT_TRUE(inferred.code == 0 || inferred.code == 2) << inferred.err;
}

TEST(Cli, InitMakesARandomModelThatInfoAndSegmentRead) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_init"), model = dir + "/random.safetensors";
  const CliRun r = segany("init --config " + q(config()) + " --seed 7 " + q(model), dir);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_CONTAINS(r.err, "meaningless");
  const CliRun info = segany("info --json " + q(model) + " --config " + q(config()), dir);
  ASSERT_EQ(info.code, 0) << info.err;
  EXPECT_EQ(nlohmann::json::parse(info.out).at("parameters").get<int64_t>(), golden_parameters());
  const CliRun seg = segany("segment " + q(model) + " " + q(dog()) + " --config " + q(config()) +
                             " --point 400,250 --out " + q(dir + "/out"),
                         dir);
  ASSERT_EQ(seg.code, 0) << seg.err;
  expect_consistent(dir + "/out", 1);
}

TEST(Cli, InitVitBIsInferredAsVitB) {
  const std::string dir = test::temp_dir("cli_init_vit_b"), model = dir + "/vit_b.safetensors";
  const CliRun r = segany("init --arch vit_b " + q(model), dir);
  ASSERT_EQ(r.code, 0) << r.err;
  const CliRun info = segany("info --json " + q(model), dir);  // no config: the shapes say it all
  ASSERT_EQ(info.code, 0) << info.err;
  const nlohmann::json j = nlohmann::json::parse(info.out);
  EXPECT_EQ(j.at("arch"), "vit_b");
  // As the original's sum(p.numel() for p in model.parameters()) for vit_b (the Fourier matrix
  // of the prompt encoder is a buffer there).
  EXPECT_EQ(j.at("parameters").get<int64_t>(), 93735472);
  fs::remove_all(dir);  // 375 MB
}

TEST(Cli, ConvertToBf16KeepsEveryTensor) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_convert"), out = dir + "/model_bf16.safetensors";
  const CliRun r = segany("convert " + q(checkpoint()) + " " + q(out) + " --dtype bf16", dir);
  ASSERT_EQ(r.code, 0) << r.err;
  const io::TensorMap before = io::load_checkpoint(checkpoint()), after = io::load_safetensors(out);
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < before.size(); ++i) {
    const auto& [name, t] = before.items()[i];
    EXPECT_EQ(after.items()[i].first, name);
    EXPECT_EQ(after.at(name).shape(), t.shape()) << name;
    EXPECT_EQ(after.at(name).dtype(), DType::BF16) << name;
  }
  // bf16 rounding: relative error at most 2^-8.
  const Tensor a = before.items()[0].second.to_f32(), b = after.items()[0].second.to_f32();
  for (int64_t i = 0; i < a.numel(); ++i)
    ASSERT_NEAR(b.data_as<const float>()[i], a.data_as<const float>()[i],
                std::abs(a.data_as<const float>()[i]) / 256 + 1e-30f);

  const CliRun info = segany("info --json " + q(out) + " --config " + q(config()), dir);
  ASSERT_EQ(info.code, 0) << info.err;
  const nlohmann::json j = nlohmann::json::parse(info.out);
  EXPECT_EQ(j.at("parameters").get<int64_t>(), golden_parameters());
  EXPECT_EQ(j.at("dtypes").at("BF16").get<size_t>(), before.size());

  // The converted model runs.
  const CliRun seg = segany("segment " + q(out) + " " + q(dog()) + " --config " + q(config()) +
                                " --point 400,250 --out " + q(dir + "/masks"),
                            dir);
  ASSERT_EQ(seg.code, 0) << seg.err;
  expect_consistent(dir + "/masks", 1);

  EXPECT_FAILS_WITH(segany("convert " + q(checkpoint()) + " " + q(out) + " --dtype f8", dir), "f8");
}

TEST(Cli, BenchPrintsOneJsonLine) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_bench");
  const CliRun r = segany("bench --config " + q(config()) + " --iters 1 --warmup 0 --prompts 2", dir);
  ASSERT_EQ(r.code, 0) << r.err;
  ASSERT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("arch"), "custom");
  EXPECT_EQ(j.at("device"), "cpu");
  EXPECT_EQ(j.at("dtype"), "f32");
  EXPECT_EQ(j.at("batch"), 1);
  EXPECT_GE(j.at("threads").get<int>(), 1);
  EXPECT_GT(j.at("encoder_ms_per_image").get<double>(), 0);
  EXPECT_GT(j.at("encoder_img_per_s").get<double>(), 0);
  EXPECT_GT(j.at("decoder_ms_per_prompt").get<double>(), 0);
  EXPECT_GT(j.at("ms_per_batch").get<double>(), 0);
  EXPECT_EQ(j.at("params").get<int64_t>(), golden_parameters());
  EXPECT_FALSE(j.contains("peak_gpu_gib"));  // device memory is reported on cuda only
}

// ---------------------------------------------------------------------------------------------
// embed

TEST(Cli, EmbedWritesOneFilePerImageAndSkipsABadOne) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_embed"), out = dir + "/emb";
  const std::string bad = dir + "/broken.png";
  std::ofstream(bad) << "not a png";
  const CliRun r = segany("embed " + q(checkpoint()) + " " + q(bad) + " " + q(dog()) + " --config " + q(config()) +
                              " --batch 2 --out " + q(out),
                          dir);
  EXPECT_FAILS_WITH(r, "broken.png");
  EXPECT_CONTAINS(r.err, "1 of 2 images");
  EXPECT_CONTAINS(r.out, "batch 1: 1 image");
  EXPECT_CONTAINS(r.out, "img/s");
  EXPECT_FALSE(fs::exists(out + "/broken.safetensors"));
  const io::TensorMap t = io::load_safetensors(out + "/dog.safetensors");
  const Tensor& emb = t.at("image_embedding");
  EXPECT_EQ(emb.dtype(), DType::F32);
  EXPECT_EQ(emb.shape(), (Shape{1, 128, 64, 64}));
  const Tensor& original = t.at("original_size");
  const Tensor& input = t.at("input_size");
  ASSERT_EQ(original.dtype(), DType::I32);
  ASSERT_EQ(input.dtype(), DType::I32);
  EXPECT_EQ(original.data_as<const int32_t>()[0], 534);
  EXPECT_EQ(original.data_as<const int32_t>()[1], 800);
  EXPECT_EQ(input.data_as<const int32_t>()[0], 684);
  EXPECT_EQ(input.data_as<const int32_t>()[1], 1024);
  // The same embedding as the golden reference.
  const io::TensorMap golden = io::load_safetensors(micro() + "/golden.safetensors");
  const Tensor want = golden.at("image.embedding").to_f32();
  ASSERT_EQ(want.numel(), emb.numel());
  float worst = 0;
  for (int64_t i = 0; i < want.numel(); ++i)
    worst = std::max(worst, std::fabs(emb.data_as<const float>()[i] - want.data_as<const float>()[i]));
  EXPECT_LE(worst, 1e-3f);

  // All good: exit 0; two images of one stem are refused before anything runs.
  EXPECT_EQ(segany("embed " + q(checkpoint()) + " " + q(dog()) + " --config " + q(config()) + " --out " + q(out), dir).code,
            0);
  EXPECT_FAILS_WITH(segany("embed " + q(checkpoint()) + " " + q(dog()) + " " + q(dog()) + " --config " + q(config()) +
                               " --out " + q(out),
                           dir),
                    "would both write");
}

}  // namespace
}  // namespace segany

// ---------------------------------------------------------------------------------------------
// everything (appended: the automatic mask generator)

namespace segany {
namespace {

// Small grids and no filters keep these fast on the micro model.
std::string everything_args(const std::string& input, const std::string& extra) {
  return "everything " + q(checkpoint()) + " " + q(input) + " --config " + q(config()) +
         " --points-per-side 4 --pred-iou-thresh 0 --stability-score-thresh 0 " + extra;
}

TEST(Cli, EverythingWritesRecordsWithEveryField) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_everything"), out = dir + "/out";
  const CliRun r = segany(everything_args(dog(), "--output-mode coco_rle --overlay --out " + q(out)), dir);
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(read_text(out + "/dog.json"));
  EXPECT_EQ(j.at("image").at("file_name"), "dog.jpg");
  EXPECT_EQ(j.at("image").at("height"), 534);
  EXPECT_EQ(j.at("image").at("width"), 800);
  ASSERT_FALSE(j.at("annotations").empty());
  for (const nlohmann::json& a : j["annotations"]) {
    EXPECT_EQ(a.at("segmentation").at("size"), nlohmann::json({534, 800}));
    EXPECT_TRUE(a.at("segmentation").at("counts").is_string());
    EXPECT_GT(a.at("area").get<int64_t>(), 0);
    EXPECT_EQ(a.at("bbox").size(), 4u);
    EXPECT_TRUE(a.at("predicted_iou").is_number());
    EXPECT_TRUE(a.at("stability_score").is_number());
    EXPECT_EQ(a.at("point_coords").size(), 1u);
    EXPECT_EQ(a.at("crop_box"), nlohmann::json({0, 0, 800, 534}));
  }
  const Image overlay = load_image(out + "/dog_overlay.png");
  EXPECT_EQ(overlay.width, 800);
  EXPECT_EQ(overlay.height, 534);

  // Uncompressed RLE counts cover the image; binary masks are PNG files named in the record.
  ASSERT_EQ(segany(everything_args(dog(), "--output-mode uncompressed_rle --out " + q(out)), dir).code, 0);
  const nlohmann::json u = nlohmann::json::parse(read_text(out + "/dog.json"));
  int64_t covered = 0;
  for (int64_t c : u["annotations"][0]["segmentation"]["counts"]) covered += c;
  EXPECT_EQ(covered, 534 * 800);
  ASSERT_EQ(segany(everything_args(dog(), "--output-mode binary_mask --out " + q(out)), dir).code, 0);
  const nlohmann::json b = nlohmann::json::parse(read_text(out + "/dog.json"));
  const Image mask = load_image(out + "/" + b["annotations"][0]["segmentation"].get<std::string>());
  EXPECT_EQ(mask.width, 800);

  EXPECT_FAILS_WITH(segany(everything_args(dog(), "--output-mode png --out " + q(out)), dir), "--output-mode");
  EXPECT_FAILS_WITH(segany(everything_args(dog(), "--points-per-batch 0 --out " + q(out)), dir), "--points-per-batch");
  EXPECT_FAILS_WITH(segany(everything_args(dir + "/missing.jpg", "--out " + q(out)), dir), "missing.jpg");
}

TEST(Cli, EverythingOnAFolderSkipsABadImageAndResumes) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_everything_dir"), in = dir + "/in", out = dir + "/out";
  fs::create_directories(in);
  fs::copy_file(dog(), in + "/a_dog.jpg");
  fs::copy_file(dog(), in + "/c_dog.jpg");
  std::ofstream(in + "/b_broken.png") << "not a png";
  std::ofstream(in + "/notes.txt") << "not an image, not looked at";
  const CliRun first = segany(everything_args(in, "--out " + q(out)), dir);
  EXPECT_FAILS_WITH(first, "b_broken.png");
  EXPECT_CONTAINS(first.err, "1 of 3 images");
  EXPECT_CONTAINS(first.err, "img/s");
  EXPECT_CONTAINS(first.err, "ETA");
  EXPECT_TRUE(fs::exists(out + "/a_dog.json"));
  EXPECT_TRUE(fs::exists(out + "/c_dog.json"));
  EXPECT_FALSE(fs::exists(out + "/b_broken.json"));
  const nlohmann::json coco = nlohmann::json::parse(read_text(out + "/annotations.json"));
  ASSERT_EQ(coco.at("images").size(), 2u);
  EXPECT_EQ(coco["images"][0].at("file_name"), "a_dog.jpg");
  EXPECT_EQ(coco["images"][1].at("file_name"), "c_dog.jpg");
  ASSERT_FALSE(coco.at("annotations").empty());
  std::set<int64_t> ids;
  for (const nlohmann::json& a : coco["annotations"]) {
    ids.insert(a.at("id").get<int64_t>());
    const int64_t image_id = a.at("image_id").get<int64_t>();
    EXPECT_TRUE(image_id == coco["images"][0]["id"] || image_id == coco["images"][1]["id"]);
    for (const char* key : {"segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords", "crop_box"})
      EXPECT_TRUE(a.contains(key)) << key;
  }
  EXPECT_EQ(ids.size(), coco["annotations"].size());

  // Fixed image, second run: the two done are skipped, the third is segmented.
  fs::remove(in + "/b_broken.png");
  fs::copy_file(dog(), in + "/b_broken.jpg");
  const auto a_time = fs::last_write_time(out + "/a_dog.json");
  const CliRun second = segany(everything_args(in, "--out " + q(out)), dir);
  EXPECT_EQ(second.code, 0) << second.err;
  EXPECT_CONTAINS(second.err, "2 of 3 images already done");
  EXPECT_CONTAINS(second.err, "[1/1] b_broken.jpg");
  EXPECT_EQ(fs::last_write_time(out + "/a_dog.json"), a_time);
  EXPECT_EQ(nlohmann::json::parse(read_text(out + "/annotations.json")).at("images").size(), 3u);

  // Other parameters: nothing is taken as done.
  const CliRun third = segany(everything_args(in, "--box-nms-thresh 0.5 --out " + q(out)), dir);
  EXPECT_EQ(third.code, 0) << third.err;
  EXPECT_CONTAINS(third.err, "[3/3]");
}

}  // namespace
}  // namespace segany

// ---------------------------------------------------------------------------------------------
// segment --prompts (appended: many images, many prompt sets each)

namespace segany {
namespace {

// A mask PNG (0/255) as 0/1, row-major.
std::vector<uint8_t> png_mask(const std::string& path) {
  const Image im = load_image(path);
  std::vector<uint8_t> out(static_cast<size_t>(im.width) * im.height);
  for (size_t i = 0; i < out.size(); ++i) out[i] = im.rgb[i * 3] ? 1 : 0;
  return out;
}

TEST(Cli, SegmentPromptsFileMatchesSingleRunsAndSkipsABadImage) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("cli_prompts"), in = dir + "/in", out = dir + "/out";
  fs::create_directories(in);
  fs::copy_file(dog(), in + "/dog.jpg");
  std::ofstream(in + "/broken.png") << "not a png";
  std::ofstream(in + "/prompts.json") << R"({"images": [
    {"file": "broken.png", "prompts": [{"points": [[10, 10, 1]]}]},
    {"file": "dog.jpg", "prompts": [
      {"points": [[400, 250, 1]]},
      {"points": [[400, 250, 1], [100, 80, 0]], "box": [200, 100, 600, 500], "multimask": true}]}]})";
  const CliRun r = segany("segment " + q(checkpoint()) + " --config " + q(config()) + " --prompts " +
                              q(in + "/prompts.json") + " --png --out " + q(out),
                          dir);
  EXPECT_FAILS_WITH(r, "broken.png");
  EXPECT_CONTAINS(r.err, "1 of 2 images");

  // The same prompts one by one, as plain `segment` runs.
  const std::vector<std::string> plain = {"--point 400,250", "--point 400,250 --point 100,80,0 --box 200,100,600,500 --multimask"};
  const nlohmann::json j = nlohmann::json::parse(read_text(out + "/results.json"));
  ASSERT_EQ(j.at("images").size(), 1u);
  const nlohmann::json& im = j["images"][0];
  EXPECT_EQ(im.at("file"), "dog.jpg");
  EXPECT_EQ(im.at("width"), 800);
  EXPECT_EQ(im.at("height"), 534);
  ASSERT_EQ(im.at("results").size(), plain.size());
  for (size_t k = 0; k < plain.size(); ++k) {
    const std::string single = dir + "/single" + std::to_string(k);
    ASSERT_EQ(segany(segment_args(plain[k] + " --out " + q(single)), dir).code, 0);
    const nlohmann::json s = nlohmann::json::parse(read_text(single + "/result.json"));
    const nlohmann::json& res = im["results"][k];
    EXPECT_EQ(res.at("prompt"), k);
    ASSERT_EQ(res.at("masks").size(), s.at("masks").size()) << "prompt " << k;
    for (size_t m = 0; m < s["masks"].size(); ++m) {
      SCOPED_TRACE("prompt " + std::to_string(k) + ", mask " + std::to_string(m));
      const nlohmann::json& got = res["masks"][m];
      EXPECT_EQ(got.at("score"), s["masks"][m].at("score"));
      EXPECT_EQ(got.at("area"), s["masks"][m].at("area"));
      EXPECT_EQ(got.at("bbox"), s["masks"][m].at("bbox"));
      EXPECT_EQ(got.at("segmentation").at("size"), nlohmann::json({534, 800}));
      const Rle rle = amg::rle_from_coco_string(got["segmentation"].at("counts").get<std::string>(), 534, 800);
      const std::vector<uint8_t> want = png_mask(single + "/" + s["masks"][m].at("file").get<std::string>());
      EXPECT_TRUE(amg::rle_to_mask(rle) == want) << "the RLE is not the plain run's mask";
      EXPECT_TRUE(png_mask(out + "/dog_" + std::to_string(k) + "_" + std::to_string(m) + ".png") == want);
    }
  }

  // Errors in the file name the image and the prompt; the positional image and --prompts exclude each other.
  // A prompt that does not fit its image fails that image alone: the others are written.
  std::ofstream(in + "/bad_prompt.json") << R"({"images": [
    {"file": "dog.jpg", "prompts": [{"points": [[1, 1]]}, {"points": [[900, 10, 1]]}]},
    {"file": "dog.jpg", "prompts": [{"points": [[400, 250, 1]]}]}]})";
  const std::string out_bad = dir + "/out_bad";
  const CliRun bad = segany("segment " + q(checkpoint()) + " --config " + q(config()) + " --prompts " +
                                q(in + "/bad_prompt.json") + " --batch 1 --workers 2 --out " + q(out_bad),
                            dir);
  EXPECT_FAILS_WITH(bad, "image 0 (dog.jpg): prompt 1: point (900, 10) lies outside the 800x534 image");
  EXPECT_CONTAINS(bad.err, "1 of 2 images");
  const nlohmann::json kept = nlohmann::json::parse(read_text(out_bad + "/results.json"));
  ASSERT_EQ(kept.at("images").size(), 1u);
  EXPECT_EQ(kept["images"][0].at("results"), nlohmann::json::array({im.at("results")[0]}));  // the same prompt
  std::ofstream(in + "/bad_key.json") << R"({"images": [{"file": "dog.jpg", "prompts": [{"point": [[1, 1]]}]}]})";
  EXPECT_FAILS_WITH(segany("segment " + q(checkpoint()) + " --config " + q(config()) + " --prompts " +
                               q(in + "/bad_key.json") + " --out " + q(out),
                           dir),
                    "image 0 (dog.jpg), prompt 0: unknown key 'point'");
  std::ofstream(in + "/bad.json") << R"({"images": [)";
  EXPECT_FAILS_WITH(segany("segment " + q(checkpoint()) + " --config " + q(config()) + " --prompts " +
                               q(in + "/bad.json") + " --out " + q(out),
                           dir),
                    "not valid JSON");
  EXPECT_FAILS_WITH(segany(segment_args("--prompts " + q(in + "/prompts.json")), dir), "excludes");
}

}  // namespace
}  // namespace segany
