// Checkpoint I/O: torch.save archives through the restricted unpickler, and safetensors.
// Fixtures are built here byte by byte (a small pickle writer and a small zip writer), so every
// damaged or hostile input is spelled out in the test that uses it.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "io/mmap_file.h"
#include "io/zip_reader.h"
#include "test_util.h"

namespace segany::io {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Fixture writers.

void put_le(std::string& s, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

// Pickle opcodes, emitted the way CPython's protocol-2 pickler does for a torch state_dict.
struct PickleWriter {
  std::string b;
  PickleWriter& op(uint8_t c) { b.push_back(static_cast<char>(c)); return *this; }
  PickleWriter& proto(uint8_t v = 2) { return op(0x80).op(v); }
  PickleWriter& global(const std::string& module, const std::string& name) {
    op('c');
    b += module + "\n" + name + "\n";
    return *this;
  }
  PickleWriter& str(const std::string& s) {
    op('X');
    put_le(b, s.size(), 4);
    b += s;
    return *this;
  }
  PickleWriter& integer(int64_t v) {
    if (v >= 0 && v < 256) return op('K').op(static_cast<uint8_t>(v));
    if (v >= INT32_MIN && v <= INT32_MAX) {
      op('J');
      put_le(b, static_cast<uint64_t>(v), 4);
    } else {  // LONG1 with 8 bytes, two's complement
      op(0x8a).op(8);
      put_le(b, static_cast<uint64_t>(v), 8);
    }
    return *this;
  }
  PickleWriter& mark() { return op('('); }
  PickleWriter& tuple() { return op('t'); }
  PickleWriter& ints(const std::vector<int64_t>& v) {
    mark();
    for (int64_t x : v) integer(x);
    return tuple();
  }
  PickleWriter& ordered_dict() { return global("collections", "OrderedDict").op(')').op('R'); }
  // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
  PickleWriter& tensor(const std::string& storage_type, const std::string& key, int64_t numel, int64_t offset,
                       const std::vector<int64_t>& size, const std::vector<int64_t>& stride) {
    global("torch._utils", "_rebuild_tensor_v2").mark();
    mark().str("storage").global("torch", storage_type).str(key).str("cpu").integer(numel).tuple().op('Q');
    integer(offset).ints(size).ints(stride).op(0x89).ordered_dict();
    return tuple().op('R');
  }
  PickleWriter& stop() { return op('.'); }
};

uint32_t crc32(const std::string& s) {
  uint32_t c = 0xffffffffu;
  for (unsigned char ch : s) {
    c ^= ch;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
  }
  return ~c;
}

struct ZipEntry {
  std::string name, data;
  uint16_t method = 0;
};

// A zip archive as torch.save writes it: STORED entries whose data start on a 64-byte boundary
// (padded with an extra field), plus `misalign` bytes to test unaligned storages. With `zip64`,
// sizes and offsets go through ZIP64 extra fields and a ZIP64 end record, as for files over 4 GiB.
std::string make_zip(const std::vector<ZipEntry>& entries, bool zip64 = false, size_t misalign = 0) {
  std::string out, cd;
  for (const ZipEntry& e : entries) {
    const uint64_t local = out.size();
    const size_t unpadded = local + 30 + e.name.size() + 4;
    const size_t pad = (64 - unpadded % 64) % 64 + misalign;
    put_le(out, 0x04034b50, 4);
    put_le(out, 20, 2);
    put_le(out, 0x0808, 2);  // data descriptor + UTF-8, as torch: sizes here are zero
    put_le(out, e.method, 2);
    put_le(out, 0, 4);
    put_le(out, 0, 4);  // crc, sizes: in the central directory only
    put_le(out, 0, 4);
    put_le(out, 0, 4);
    put_le(out, e.name.size(), 2);
    put_le(out, 4 + pad, 2);
    out += e.name;
    put_le(out, 0x4246, 2);  // torch's "FB" padding field
    put_le(out, pad, 2);
    out.append(pad, 'Z');
    out += e.data;

    std::string extra;
    if (zip64) {
      put_le(extra, 0x0001, 2);
      put_le(extra, 24, 2);
      put_le(extra, e.data.size(), 8);
      put_le(extra, e.data.size(), 8);
      put_le(extra, local, 8);
    }
    put_le(cd, 0x02014b50, 4);
    put_le(cd, 45, 2);
    put_le(cd, 45, 2);
    put_le(cd, 0x0808, 2);
    put_le(cd, e.method, 2);
    put_le(cd, 0, 4);
    put_le(cd, crc32(e.data), 4);
    put_le(cd, zip64 ? 0xffffffffu : e.data.size(), 4);
    put_le(cd, zip64 ? 0xffffffffu : e.data.size(), 4);
    put_le(cd, e.name.size(), 2);
    put_le(cd, extra.size(), 2);
    put_le(cd, 0, 2);
    put_le(cd, 0, 2);
    put_le(cd, 0, 2);
    put_le(cd, 0, 4);
    put_le(cd, zip64 ? 0xffffffffu : local, 4);
    cd += e.name + extra;
  }
  const uint64_t cd_offset = out.size();
  out += cd;
  if (zip64) {
    const uint64_t z = out.size();
    put_le(out, 0x06064b50, 4);
    put_le(out, 44, 8);
    put_le(out, 45, 2);
    put_le(out, 45, 2);
    put_le(out, 0, 4);
    put_le(out, 0, 4);
    put_le(out, entries.size(), 8);
    put_le(out, entries.size(), 8);
    put_le(out, cd.size(), 8);
    put_le(out, cd_offset, 8);
    put_le(out, 0x07064b50, 4);
    put_le(out, 0, 4);
    put_le(out, z, 8);
    put_le(out, 1, 4);
  }
  put_le(out, 0x06054b50, 4);
  put_le(out, 0, 2);
  put_le(out, 0, 2);
  put_le(out, zip64 ? 0xffff : entries.size(), 2);
  put_le(out, zip64 ? 0xffff : entries.size(), 2);
  put_le(out, zip64 ? 0xffffffffu : cd.size(), 4);
  put_le(out, zip64 ? 0xffffffffu : cd_offset, 4);
  put_le(out, 0, 2);
  return out;
}

template <class T>
std::string raw(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// A .pth archive: data.pkl plus storages named by key, under `root`.
std::string make_pth(const std::string& pickle, const std::vector<std::pair<std::string, std::string>>& storages,
                     const std::string& root = "archive", bool zip64 = false, size_t misalign = 0) {
  std::vector<ZipEntry> e{{root + "/data.pkl", pickle}};
  for (const auto& [key, bytes] : storages) e.push_back({root + "/data/" + key, bytes});
  e.push_back({root + "/version", "3\n"});
  return make_zip(e, zip64, misalign);
}

// The message of the segany::Error that `f` throws ("" when it throws none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_ERROR_HAS(expr, text)                              \
  do {                                                            \
    const std::string msg_ = error_of([&] { (void)(expr); });     \
    EXPECT_NE(msg_.find(text), std::string::npos)                 \
        << "expected an Error mentioning '" << (text) << "', got '" << msg_ << "'"; \
  } while (0)

std::string bytes_of(const Tensor& t) { return std::string(static_cast<const char*>(t.data()), t.nbytes()); }

// ---------------------------------------------------------------------------------------------
// The golden checkpoints written by torch.save.

TEST(Pth, LoadsGoldenMicroH64InPlace) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string path = test::golden_dir() + "/micro_h64/checkpoint.pth";
  TensorMap m = load_pth(path);
  EXPECT_EQ(m.source, path);
  ASSERT_EQ(m.size(), 188u);
  EXPECT_EQ(m.items().front().first, "image_encoder.pos_embed");
  EXPECT_EQ(m.items().back().first, "mask_decoder.iou_prediction_head.layers.2.bias");

  const Tensor& pos = m.at("image_encoder.pos_embed", {1, 64, 64, 128});
  EXPECT_EQ(pos.dtype(), DType::F32);
  EXPECT_FLOAT_EQ(pos.data_as<float>()[0], 0.16242752969264984f);
  EXPECT_FLOAT_EQ(pos.data_as<float>()[2], -0.011993941850960255f);
  const Tensor& iou = m.at("mask_decoder.iou_token.weight", {1, 128});
  EXPECT_FLOAT_EQ(iou.data_as<float>()[1], -0.08412671089172363f);
  const Tensor& bias = m.at("mask_decoder.iou_prediction_head.layers.2.bias", {4});
  EXPECT_FLOAT_EQ(bias.data_as<float>()[1], 0.13820160925388336f);

  // Zero copy: every tensor views the one mapping (torch aligns storages at 64 bytes).
  for (const auto& [name, t] : m.items()) {
    EXPECT_EQ(t.owner(), pos.owner()) << name << " is not a view of the mapped file";
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u) << name;
  }
}

TEST(Pth, LoadsGoldenMicroH80ThroughDispatch) {
  SEGANY_REQUIRE_GOLDEN();
  TensorMap m = load_checkpoint(test::golden_dir() + "/micro_h80/checkpoint.pth");
  ASSERT_EQ(m.size(), 174u);
  const Tensor& pos = m.at("image_encoder.pos_embed", {1, 64, 64, 160});
  EXPECT_FLOAT_EQ(pos.data_as<float>()[2], 0.06214866042137146f);
  EXPECT_FLOAT_EQ(m.at("mask_decoder.iou_token.weight", {1, 256}).data_as<float>()[0], 1.6405746936798096f);
}

TEST(Pth, TensorsKeepTheMappingAlive) {
  SEGANY_REQUIRE_GOLDEN();
  Tensor pos;
  {
    TensorMap m = load_pth(test::golden_dir() + "/micro_h64/checkpoint.pth");
    pos = m.at("image_encoder.pos_embed");
  }
  EXPECT_FLOAT_EQ(pos.data_as<float>()[1], 0.21153424680233002f);
}

TEST(Pth, GoldenSurvivesSafetensorsRoundTrip) {
  SEGANY_REQUIRE_GOLDEN();
  TensorMap pth = load_pth(test::golden_dir() + "/micro_h64/checkpoint.pth");
  const std::string out = test::temp_dir("io_golden_rt") + "/micro_h64.safetensors";
  save_safetensors(out, pth.items(), {{"format", "pt"}});
  TensorMap st = load_checkpoint(out);
  ASSERT_EQ(st.size(), pth.size());
  for (size_t i = 0; i < pth.size(); ++i) {
    const auto& [name, a] = pth.items()[i];
    const auto& [name2, b] = st.items()[i];
    ASSERT_EQ(name, name2);
    ASSERT_EQ(a.shape(), b.shape()) << name;
    ASSERT_EQ(a.dtype(), b.dtype()) << name;
    ASSERT_EQ(bytes_of(a), bytes_of(b)) << name;
  }
}

TEST(Pth, TruncatedGoldenIsAnError) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string whole = read_file(test::golden_dir() + "/micro_h64/checkpoint.pth");
  ASSERT_GT(whole.size(), 1000u);
  const std::string dir = test::temp_dir("io_truncated_pth");
  for (size_t len : {size_t{0}, size_t{3}, size_t{100}, whole.size() / 2, whole.size() - 10, whole.size() - 1}) {
    const std::string path = dir + "/cut_" + std::to_string(len) + ".pth";
    write_file(path, whole.substr(0, len));
    EXPECT_THROW(load_pth(path), Error) << "cut at " << len;
    EXPECT_THROW(load_checkpoint(path), Error) << "cut at " << len;
  }
  // The directory intact but the pickle zeroed from its 36th byte: opcode 0x00 is refused.
  std::string holed = whole;
  std::memset(holed.data() + 100, 0, 4096);
  write_file(dir + "/holed.pth", holed);
  EXPECT_ERROR_HAS(load_pth(dir + "/holed.pth"), "opcode 0x00");
}

TEST(Pth, MissingFileIsAnError) {
  EXPECT_ERROR_HAS(load_pth("/nonexistent/model.pth"), "/nonexistent/model.pth");
  EXPECT_ERROR_HAS(load_checkpoint("/nonexistent/model.pth"), "/nonexistent/model.pth");
}

// ---------------------------------------------------------------------------------------------
// Hand-made archives: the accepted forms.

TEST(Pth, ReadsEveryStorageTypeWrappedAndOffset) {
  const std::vector<float> f32{1.5f, -2.f, 3.25f, 4.f, 5.f, 6.f, 7.f};
  const std::vector<int64_t> i64{-1, 1LL << 40, 3};
  const std::vector<uint16_t> f16{f32_to_f16(0.5f), f32_to_f16(-1.f)};
  const std::vector<uint16_t> bf16{f32_to_bf16(2.f), f32_to_bf16(-3.f)};
  const std::vector<uint8_t> flags{1, 0, 1};
  const std::vector<int8_t> i8{-5, 7};
  const std::vector<double> f64{3.141592653589793};

  PickleWriter p;
  p.proto().op('}').str("epoch").integer(7).op('s').str("model").ordered_dict().mark();
  // [2, 3] at storage offset 1: elements 1..6 of the storage.
  p.str("w").tensor("FloatStorage", "0", 7, 1, {2, 3}, {3, 1});
  // An nn.Parameter around a tensor, as torch pickles a module's parameters sometimes.
  p.str("p").global("torch._utils", "_rebuild_parameter");
  p.tensor("LongStorage", "1", 3, 0, {3}, {1}).op(0x88).ordered_dict().op(0x87).op('R');
  p.str("h").tensor("HalfStorage", "2", 2, 0, {2}, {1});
  p.str("b").tensor("BFloat16Storage", "3", 2, 0, {1, 2}, {2, 1});
  p.str("m").tensor("BoolStorage", "4", 3, 0, {3}, {1});
  p.str("c").tensor("CharStorage", "5", 2, 0, {2}, {1});
  p.str("d").tensor("DoubleStorage", "6", 1, 0, {}, {});
  // Shares storage 0 with "w"; size-1 dimensions may carry any stride.
  p.str("w0").tensor("FloatStorage", "0", 7, 0, {1, 1, 7}, {99, 5, 1});
  p.op('u');
  // OrderedDict state (`_metadata`), set with BUILD after the items, as torch does.
  p.op('}').str("_metadata").ordered_dict().op('s').op('b');
  p.op('s').stop();

  const std::string path = test::temp_dir("io_pth_kinds") + "/model.pth";
  write_file(path, make_pth(p.b, {{"0", raw(f32)}, {"1", raw(i64)}, {"2", raw(f16)}, {"3", raw(bf16)},
                                  {"4", raw(flags)}, {"5", raw(i8)}, {"6", raw(f64)}},
                            "checkpoint"));
  TensorMap m = load_checkpoint(path);
  ASSERT_EQ(m.size(), 8u);
  std::vector<std::string> names;
  for (const auto& it : m.items()) names.push_back(it.first);
  EXPECT_EQ(names, (std::vector<std::string>{"w", "p", "h", "b", "m", "c", "d", "w0"}));

  const Tensor& w = m.at("w", {2, 3});
  EXPECT_EQ(w.dtype(), DType::F32);
  EXPECT_EQ(w.data_as<float>()[0], -2.f);
  EXPECT_EQ(w.data_as<float>()[5], 7.f);
  const Tensor& pl = m.at("p", {3});
  EXPECT_EQ(pl.dtype(), DType::I64);
  EXPECT_EQ(pl.data_as<int64_t>()[1], 1LL << 40);
  EXPECT_EQ(m.at("h").dtype(), DType::F16);
  EXPECT_EQ(f16_to_f32(m.at("h").data_as<uint16_t>()[1]), -1.f);
  EXPECT_EQ(m.at("b", {1, 2}).dtype(), DType::BF16);
  EXPECT_EQ(bf16_to_f32(m.at("b").data_as<uint16_t>()[1]), -3.f);
  EXPECT_EQ(m.at("m").dtype(), DType::Bool);
  EXPECT_EQ(m.at("m").data_as<uint8_t>()[2], 1);
  EXPECT_EQ(m.at("c").dtype(), DType::I8);
  EXPECT_EQ(m.at("c").data_as<int8_t>()[0], -5);
  EXPECT_EQ(m.at("d", {}).dtype(), DType::F64);
  EXPECT_EQ(m.at("d").data_as<double>()[0], 3.141592653589793);
  EXPECT_EQ(m.at("w0", {1, 1, 7}).data(), m.at("w").data_as<float>() - 1);  // the same bytes, in place
}

TEST(Pth, Zip64ArchiveReads) {
  const std::vector<float> v{1.f, 2.f, 3.f, 4.f};
  PickleWriter p;
  p.proto().ordered_dict().mark().str("x").tensor("FloatStorage", "0", 4, 0, {2, 2}, {2, 1}).op('u').stop();
  const std::string path = test::temp_dir("io_pth_zip64") + "/model.pth";
  write_file(path, make_pth(p.b, {{"0", raw(v)}}, "archive", /*zip64=*/true));
  TensorMap m = load_pth(path);
  EXPECT_EQ(m.at("x", {2, 2}).data_as<float>()[3], 4.f);

  auto file = MmapFile::open(path);
  ZipReader zip(file->bytes(), path);
  ASSERT_EQ(zip.entries().size(), 3u);
  const ZipReader::Entry* e = zip.find("archive/data/0");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->size, 16u);
  EXPECT_EQ(e->data_offset % 64, 0u);
}

TEST(Pth, MisalignedStorageIsCopiedNotViewedMisaligned) {
  const std::vector<float> v{1.f, 2.f, 3.f};
  PickleWriter p;
  p.proto().ordered_dict().mark().str("x").tensor("FloatStorage", "0", 3, 0, {3}, {1}).op('u').stop();
  const std::string path = test::temp_dir("io_pth_misaligned") + "/model.pth";
  write_file(path, make_pth(p.b, {{"0", raw(v)}}, "archive", false, /*misalign=*/1));
  auto file = MmapFile::open(path);
  ZipReader zip(file->bytes(), path);
  ASSERT_EQ(zip.find("archive/data/0")->data_offset % 4, 1u);  // the fixture is what it claims
  TensorMap m = load_pth(path);
  const Tensor& x = m.at("x", {3});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(x.data()) % alignof(float), 0u);
  EXPECT_EQ(x.data_as<float>()[2], 3.f);
}

// ---------------------------------------------------------------------------------------------
// Hand-made archives: what must be refused.

class PthRefuses : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = test::temp_dir(std::string("io_refuse_") + ::testing::UnitTest::GetInstance()->current_test_info()->name()); }
  // Writes an archive holding `pickle` (and a 16-byte float storage "0") and returns its path.
  std::string write(const std::string& pickle, const std::string& name = "model.pth") {
    const std::string path = dir_ + "/" + name;
    write_file(path, make_pth(pickle, {{"0", raw(std::vector<float>{1, 2, 3, 4})}}));
    return path;
  }
  std::string dir_;
};

TEST_F(PthRefuses, GlobalsThatAStateDictNeverNeeds) {
  const std::string marker = dir_ + "/pwned";
  const std::pair<const char*, const char*> evil[] = {
      {"os", "system"}, {"posix", "system"}, {"builtins", "eval"}, {"__builtin__", "getattr"},
      {"subprocess", "call"}, {"torch", "load"}};
  for (const auto& [module, name] : evil) {
    PickleWriter p;
    p.proto().global(module, name).str("touch " + marker).op(0x85).op('R').stop();
    const std::string path = write(p.b);
    const std::string expected = std::string("'") + module + "." + name + "'";
    EXPECT_ERROR_HAS(load_pth(path), expected);
    EXPECT_ERROR_HAS(load_checkpoint(path), "refusing to load");
  }
  // The same through protocol 4's STACK_GLOBAL, which takes the names from the stack.
  PickleWriter p;
  p.proto(4).op(0x8c).op(2).op('o').op('s').op(0x8c).op(6);
  p.b += "system";
  p.op(0x93).str("touch " + marker).op(0x85).op('R').stop();
  EXPECT_ERROR_HAS(load_pth(write(p.b)), "'os.system'");
  EXPECT_FALSE(fs::exists(marker)) << "the pickle's command ran";
}

TEST_F(PthRefuses, CallingAnAllowedGlobalOtherThanAsTorchDoes) {
  PickleWriter p;  // torch.FloatStorage is allowed as a value, never as a function
  p.proto().global("torch", "FloatStorage").mark().integer(3).tuple().op('R').stop();
  EXPECT_ERROR_HAS(load_pth(write(p.b)), "torch.FloatStorage");
  PickleWriter q;  // an OrderedDict built from arguments
  q.proto().global("collections", "OrderedDict").str("x").op(0x85).op('R').stop();
  EXPECT_ERROR_HAS(load_pth(write(q.b)), "OrderedDict");
}

TEST_F(PthRefuses, UnknownOpcodes) {
  PickleWriter p;
  p.proto().op(0xff).stop();
  const std::string msg = error_of([&] { load_pth(write(p.b)); });
  EXPECT_NE(msg.find("0xff"), std::string::npos) << msg;
  EXPECT_NE(msg.find("offset 2"), std::string::npos) << msg;
  PickleWriter q;  // INST would import and call a class by name
  q.proto().op('i');
  q.b += "os\nsystem\n";
  q.stop();
  EXPECT_ERROR_HAS(load_pth(write(q.b)), "INST");
  PickleWriter r;  // protocol 1
  r.op(0x80).op(1).op('N').stop();
  EXPECT_ERROR_HAS(load_pth(write(r.b)), "protocol 1");
}

TEST_F(PthRefuses, MalformedPickles) {
  struct Case {
    const char* what;
    std::string bytes;
    const char* error;
  };
  std::vector<Case> cases;
  auto pk = [] { PickleWriter p; p.proto(); return p; };
  cases.push_back({"no STOP", pk().ordered_dict().b, "without STOP"});
  cases.push_back({"empty", "", "without STOP"});
  cases.push_back({"pop from empty stack", pk().op('R').stop().b, "empty stack"});
  cases.push_back({"TUPLE with no MARK", pk().integer(1).tuple().stop().b, "MARK"});
  cases.push_back({"pop across a MARK", pk().integer(1).mark().op(0x85).stop().b, "across a MARK"});
  cases.push_back({"MARK left open", pk().mark().op('N').stop().b, "STOP with items"});
  cases.push_back({"unset memo slot", pk().op('h').op(7).stop().b, "memo slot 7"});
  cases.push_back({"unset long memo slot", pk().op('j').op(0).op(0).op(0).op(1).stop().b, "memo slot 16777216"});
  PickleWriter longstr = pk();
  longstr.op('X');
  put_le(longstr.b, 0xfffffff0u, 4);
  longstr.b += "abc";
  cases.push_back({"string past the end", longstr.b, "runs past the end"});
  cases.push_back({"argument past the end", pk().op('J').op(1).b, "truncated"});
  PickleWriter nameless = pk();
  nameless.op('c');
  nameless.b += "collections";
  cases.push_back({"GLOBAL without newline", nameless.b, "GLOBAL name"});
  cases.push_back({"SETITEM on a list", pk().op(']').str("k").op('N').op('s').stop().b, "expected a dict"});
  cases.push_back({"odd SETITEMS", pk().op('}').mark().str("k").op('u').stop().b, "odd number"});
  cases.push_back({"LONG1 of 9 bytes", pk().op(0x8a).op(9).b + std::string(9, '\1') + ".", "9 bytes"});
  cases.push_back({"persistent id that is not a storage", pk().str("x").op('Q').stop().b, "persistent id"});
  cases.push_back({"not a dict", pk().op(']').stop().b, "holds a list, not a state_dict"});
  cases.push_back({"integer key", pk().op('}').integer(3).op('N').op('s').stop().b, "key of type int; tensor names must be strings"});
  cases.push_back({"non-tensor value", pk().op('}').str("k").integer(3).op('s').stop().b, "'k' is of type int, not a tensor"});
  std::string deep = pk().b;
  for (int i = 0; i < 5000; ++i) deep += '(';
  cases.push_back({"MARKs nested too deep", deep, "deeper than"});
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    EXPECT_ERROR_HAS(load_pth(write(c.bytes)), c.error);
  }
}

TEST_F(PthRefuses, StorageOutOfBounds) {
  PickleWriter p;  // storage "0" holds 4 floats (16 bytes); [2, 3] needs 24
  p.proto().ordered_dict().mark().str("big").tensor("FloatStorage", "0", 4, 0, {2, 3}, {3, 1}).op('u').stop();
  const std::string msg = error_of([&] { load_pth(write(p.b)); });
  EXPECT_NE(msg.find("tensor 'big': storage '0' holds 16 bytes, the tensor needs 24"), std::string::npos) << msg;

  PickleWriter q;  // in bounds by size, out by offset
  q.proto().ordered_dict().mark().str("off").tensor("FloatStorage", "0", 4, 3, {2}, {1}).op('u').stop();
  EXPECT_ERROR_HAS(load_pth(write(q.b)), "the tensor needs 20");

  PickleWriter r;  // a size tuple whose byte count overflows 64 bits
  r.proto().ordered_dict().mark().str("huge");
  r.tensor("FloatStorage", "0", 4, 0, {1LL << 31, 1LL << 31, 1LL << 31}, {1LL << 62, 1LL << 31, 1}).op('u').stop();
  EXPECT_ERROR_HAS(load_pth(write(r.b)), "tensor 'huge': storage '0' holds 16 bytes, the tensor needs more than 2^64");

  PickleWriter big;  // LONG1 integers and negative BININTs read back exactly
  big.proto().ordered_dict().mark().str("neg").tensor("FloatStorage", "0", 4, -(1LL << 40), {1}, {1}).op('u').stop();
  EXPECT_ERROR_HAS(load_pth(write(big.b)), "negative storage offset");

  PickleWriter s;  // a storage key with no archive entry
  s.proto().ordered_dict().mark().str("lost").tensor("FloatStorage", "9", 4, 0, {4}, {1}).op('u').stop();
  EXPECT_ERROR_HAS(load_pth(write(s.b)), "storage '9' is missing");
}

TEST_F(PthRefuses, NonContiguousStrides) {
  PickleWriter p;  // a transposed view: size [2, 2], stride [1, 2]
  p.proto().ordered_dict().mark().str("wT").tensor("FloatStorage", "0", 4, 0, {2, 2}, {1, 2}).op('u').stop();
  const std::string msg = error_of([&] { load_pth(write(p.b)); });
  EXPECT_NE(msg.find("'wT'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("contiguous"), std::string::npos) << msg;
}

TEST_F(PthRefuses, DuplicateNames) {
  PickleWriter p;
  p.proto().ordered_dict().mark();
  p.str("x").tensor("FloatStorage", "0", 4, 0, {4}, {1});
  p.str("x").tensor("FloatStorage", "0", 4, 0, {4}, {1});
  p.op('u').stop();
  EXPECT_ERROR_HAS(load_pth(write(p.b)), "duplicate tensor 'x'");
}

TEST_F(PthRefuses, DamagedArchives) {
  PickleWriter p;
  p.proto().ordered_dict().mark().str("x").tensor("FloatStorage", "0", 4, 0, {4}, {1}).op('u').stop();
  const std::vector<float> v{1, 2, 3, 4};

  // Compressed (deflate) entries cannot be viewed in place.
  write_file(dir_ + "/deflated.pth", make_zip({{"a/data.pkl", p.b}, {"a/data/0", raw(v), 8}}));
  EXPECT_ERROR_HAS(load_pth(dir_ + "/deflated.pth"), "compressed");

  // No data.pkl at all.
  write_file(dir_ + "/nopickle.pth", make_zip({{"a/data/0", raw(v)}}));
  EXPECT_ERROR_HAS(load_pth(dir_ + "/nopickle.pth"), "data.pkl");

  // Big-endian storages.
  write_file(dir_ + "/big.pth", make_zip({{"a/data.pkl", p.b}, {"a/byteorder", "big"}, {"a/data/0", raw(v)}}));
  EXPECT_ERROR_HAS(load_pth(dir_ + "/big.pth"), "big-endian");

  // The local header offset of an entry points past the end; the directory size past its end.
  const std::string good = make_pth(p.b, {{"0", raw(v)}});
  const size_t cd = good.rfind(std::string("PK\x01\x02", 4));
  ASSERT_NE(cd, std::string::npos);
  std::string bad_local = good;
  std::memset(bad_local.data() + cd + 42, 0x7f, 4);
  write_file(dir_ + "/bad_local.pth", bad_local);
  EXPECT_ERROR_HAS(load_pth(dir_ + "/bad_local.pth"), "no local header");
  std::string bad_size = good;
  std::memset(bad_size.data() + cd + 20, 0x7f, 4);  // the last entry (version) claims ~2 GB
  std::memset(bad_size.data() + cd + 24, 0x7f, 4);
  write_file(dir_ + "/bad_size.pth", bad_size);
  EXPECT_ERROR_HAS(load_pth(dir_ + "/bad_size.pth"), "past the end of the file");
  std::string bad_eocd = good;
  std::memset(bad_eocd.data() + good.size() - 6, 0x7f, 4);  // central directory offset
  write_file(dir_ + "/bad_eocd.pth", bad_eocd);
  EXPECT_ERROR_HAS(load_pth(dir_ + "/bad_eocd.pth"), "central directory");

  // A legacy (pre-zip) torch file: a bare pickle.
  write_file(dir_ + "/legacy.pth", PickleWriter().proto().op('N').stop().b);
  EXPECT_ERROR_HAS(load_checkpoint(dir_ + "/legacy.pth"), "legacy");
}

// ---------------------------------------------------------------------------------------------
// safetensors.

TEST(Safetensors, RoundTripsEveryDtype) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  const DType all[] = {DType::F32, DType::F16, DType::BF16, DType::F64, DType::I64,
                       DType::I32, DType::I16, DType::I8,  DType::U8,  DType::Bool};
  int seed = 1;
  for (DType d : all) {
    Tensor t = Tensor::empty({3, 5}, d);  // 3*5 elements: odd byte counts for the 1-byte dtypes
    auto* p = static_cast<uint8_t*>(t.data());
    for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(seed++ * 37 + i);
    if (d == DType::Bool)
      for (size_t i = 0; i < t.nbytes(); ++i) p[i] &= 1;
    tensors.emplace_back(std::string("t_") + dtype_name(d), t);
  }
  tensors.emplace_back("scalar", Tensor::empty({}, DType::F32));
  tensors.emplace_back("empty", Tensor::empty({0, 4}, DType::F32));
  const std::string path = test::temp_dir("io_st_roundtrip") + "/all.safetensors";
  save_safetensors(path, tensors, {{"format", "pt"}, {"note", "round trip"}});
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  // The file itself: header length, JSON with metadata, data starting on 8 bytes.
  const std::string file = read_file(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<uint8_t>(file[i]);
  EXPECT_EQ((8 + n) % 8, 0u);
  const auto header = nlohmann::json::parse(file.substr(8, n));
  EXPECT_EQ(header["__metadata__"]["note"], "round trip");
  EXPECT_EQ(header["t_BF16"]["dtype"], "BF16");
  EXPECT_EQ(header["t_BOOL"]["shape"], nlohmann::json::array({3, 5}));

  TensorMap m = load_safetensors(path);
  ASSERT_EQ(m.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    EXPECT_EQ(m.items()[i].first, name);  // the order they were given
    const Tensor& u = m.at(name, t.shape());
    EXPECT_EQ(u.dtype(), t.dtype()) << name;
    EXPECT_EQ(bytes_of(u), bytes_of(t)) << name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(u.data()) % dtype_size(u.dtype()), 0u) << name;
  }
  // Saving over an existing file replaces it.
  save_safetensors(path, {{"only", Tensor::empty({2}, DType::I32)}});
  EXPECT_EQ(load_safetensors(path).size(), 1u);
}

TEST(Safetensors, LoadsGolden) {
  SEGANY_REQUIRE_GOLDEN();
  TensorMap m = load_checkpoint(test::golden_dir() + "/micro_h64/golden.safetensors");
  EXPECT_EQ(m.at("image.embedding", {1, 128, 64, 64}).dtype(), DType::F32);
  const Tensor& original = m.at("image.original", {2});  // (H, W) of dog.jpg, 800x534
  ASSERT_EQ(original.dtype(), DType::I32);
  EXPECT_EQ(original.data_as<int32_t>()[0], 534);
  EXPECT_EQ(original.data_as<int32_t>()[1], 800);
  EXPECT_EQ(m.at("image.resized_u8", {684, 1024, 3}).dtype(), DType::U8);
}

TEST(Safetensors, RefusesDamagedFiles) {
  const std::string dir = test::temp_dir("io_st_bad");
  auto with_header = [&](const std::string& name, const std::string& json, size_t data_bytes) {
    std::string s;
    put_le(s, json.size(), 8);
    s += json;
    s.append(data_bytes, '\0');
    write_file(dir + "/" + name, s);
    return dir + "/" + name;
  };
  EXPECT_ERROR_HAS(load_safetensors(with_header("json.st", "{\"a\": {\"dtype\": ", 0)), "not a JSON object");
  EXPECT_ERROR_HAS(load_safetensors(with_header("array.st", "[1, 2]", 0)), "not a JSON object");
  const std::string a = R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})";
  EXPECT_EQ(load_safetensors(with_header("ok.st", a, 16)).at("a", {2, 2}).dtype(), DType::F32);
  EXPECT_ERROR_HAS(load_safetensors(with_header("short.st", a, 15)), "outside the 15 bytes");
  EXPECT_ERROR_HAS(
      load_safetensors(with_header("size.st", R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", 16)),
      "needs 12");
  EXPECT_ERROR_HAS(
      load_safetensors(with_header("order.st", R"({"a": {"dtype": "U8", "shape": [0], "data_offsets": [9, 2]}})", 16)),
      "outside");
  EXPECT_ERROR_HAS(
      load_safetensors(with_header("dtype.st", R"({"a": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}})", 2)),
      "unknown dtype 'F8'");
  EXPECT_ERROR_HAS(
      load_safetensors(with_header("neg.st", R"({"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}})", 2)),
      "non-negative");
  EXPECT_ERROR_HAS(load_safetensors(with_header("noffs.st", R"({"a": {"dtype": "U8", "shape": [2]}})", 2)),
                   "data_offsets");
  EXPECT_ERROR_HAS(load_safetensors(with_header("huge.st", R"({"a": {"dtype": "F32", "shape": [4611686018427387904, 8], "data_offsets": [0, 0]}})", 0)),
                   "overflows");

  // Header length beyond the file, and beyond the 100 MB limit.
  std::string s;
  put_le(s, 1000, 8);
  s += "{}";
  write_file(dir + "/len.st", s);
  EXPECT_ERROR_HAS(load_safetensors(dir + "/len.st"), "claims 1000 bytes");
  std::string t;
  put_le(t, 1ull << 40, 8);
  write_file(dir + "/limit.st", t);
  EXPECT_ERROR_HAS(load_safetensors(dir + "/limit.st"), "100 MB");

  // A good file cut short anywhere is an error, never a crash.
  const std::string good = read_file(dir + "/ok.st");
  for (size_t len : {size_t{0}, size_t{4}, size_t{8}, size_t{20}, good.size() - 1}) {
    write_file(dir + "/cut.st", good.substr(0, len));
    EXPECT_THROW(load_safetensors(dir + "/cut.st"), Error) << "cut at " << len;
  }
}

TEST(Safetensors, TruncatedGoldenIsAnError) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string whole = read_file(test::golden_dir() + "/micro_h64/golden.safetensors");
  const std::string dir = test::temp_dir("io_st_truncated");
  for (size_t len : {size_t{100}, whole.size() / 2, whole.size() - 10}) {
    write_file(dir + "/cut.safetensors", whole.substr(0, len));
    EXPECT_THROW(load_checkpoint(dir + "/cut.safetensors"), Error) << "cut at " << len;
  }
}

TEST(Safetensors, SaveRefusesWhatItCannotWrite) {
  const std::string dir = test::temp_dir("io_st_save_bad");
  Tensor t = Tensor::empty({2});
  EXPECT_ERROR_HAS(save_safetensors(dir + "/dup.st", {{"x", t}, {"x", t}}), "appears twice");
  EXPECT_ERROR_HAS(save_safetensors(dir + "/undef.st", {{"x", Tensor()}}), "undefined");
  EXPECT_ERROR_HAS(save_safetensors(dir + "/meta.st", {{"__metadata__", t}}), "reserved");
  EXPECT_ERROR_HAS(save_safetensors(dir + "/no/such/dir/x.st", {{"x", t}}), "No such file");
  EXPECT_FALSE(fs::exists(dir + "/dup.st"));
}

}  // namespace
}  // namespace segany::io
