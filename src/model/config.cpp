#include "model/config.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace segany {

bool ImageEncoderConfig::is_global(int block) const {
  return std::find(global_attn_indexes.begin(), global_attn_indexes.end(), block) != global_attn_indexes.end();
}

SamConfig SamConfig::vit_b() { return SamConfig{}; }

SamConfig SamConfig::vit_l() {
  SamConfig c;
  c.arch = "vit_l";
  c.image_encoder.embed_dim = 1024;
  c.image_encoder.depth = 24;
  c.image_encoder.num_heads = 16;
  c.image_encoder.global_attn_indexes = {5, 11, 17, 23};
  return c;
}

SamConfig SamConfig::vit_h() {
  SamConfig c;
  c.arch = "vit_h";
  c.image_encoder.embed_dim = 1280;
  c.image_encoder.depth = 32;
  c.image_encoder.num_heads = 16;
  c.image_encoder.global_attn_indexes = {7, 15, 23, 31};
  return c;
}

SamConfig SamConfig::from_arch(const std::string& arch) {
  if (arch == "vit_b") return vit_b();
  if (arch == "vit_l") return vit_l();
  if (arch == "vit_h") return vit_h();
  throw Error("unknown architecture '" + arch + "' (expected vit_b, vit_l or vit_h)");
}

namespace {

// Names the official configs so that `info` can say "vit_h" rather than "custom".
std::string name_of(const SamConfig& c) {
  for (const SamConfig& ref : {SamConfig::vit_b(), SamConfig::vit_l(), SamConfig::vit_h()})
    if (ref.describe() == SamConfig(c).describe()) return ref.arch;
  return "custom";
}

int count_prefixed(const io::TensorMap& w, const std::string& prefix, const std::string& suffix) {
  int n = 0;
  while (w.contains(prefix + std::to_string(n) + suffix)) ++n;
  return n;
}

void positive(int v, const std::string& what, const std::string& where) {
  check(v > 0, where + ": " + what + " must be positive, found " + std::to_string(v));
}

void check_config(const SamConfig& c, const std::string& where) {
  const auto& e = c.image_encoder;
  positive(e.embed_dim, "image_encoder.embed_dim", where);
  positive(e.depth, "image_encoder.depth", where);
  positive(e.num_heads, "image_encoder.num_heads", where);
  positive(e.window_size, "image_encoder.window_size", where);
  positive(e.patch_size, "image_encoder.patch_size", where);
  positive(e.img_size, "image_encoder.img_size", where);
  positive(e.mlp_ratio, "image_encoder.mlp_ratio", where);
  positive(e.out_chans, "image_encoder.out_chans", where);
  check(e.embed_dim % e.num_heads == 0, where + ": embed_dim " + std::to_string(e.embed_dim) +
                                            " is not a multiple of num_heads " + std::to_string(e.num_heads));
  check(e.img_size % e.patch_size == 0, where + ": img_size is not a multiple of patch_size");
  for (int g : e.global_attn_indexes)
    check(g >= 0 && g < e.depth, where + ": global attention block " + std::to_string(g) + " outside depth " +
                                     std::to_string(e.depth));
  const auto& d = c.mask_decoder;
  positive(d.transformer_dim, "mask_decoder.transformer_dim", where);
  positive(d.depth, "mask_decoder.depth", where);
  positive(d.num_heads, "mask_decoder.num_heads", where);
  positive(d.mlp_dim, "mask_decoder.mlp_dim", where);
  positive(d.num_multimask_outputs, "mask_decoder.num_multimask_outputs", where);
  check(d.iou_head_depth >= 2, where + ": mask_decoder.iou_head_depth must be at least 2");
  check(d.transformer_dim % (d.num_heads * d.attention_downsample_rate) == 0 && d.transformer_dim % 8 == 0,
        where + ": mask_decoder.transformer_dim " + std::to_string(d.transformer_dim) +
            " does not split into heads");
  check(c.prompt_encoder.embed_dim == d.transformer_dim && e.out_chans == d.transformer_dim,
        where + ": image_encoder.out_chans, prompt_encoder.embed_dim and mask_decoder.transformer_dim must agree");
  check(c.prompt_encoder.mask_in_chans % 4 == 0 && c.prompt_encoder.mask_in_chans > 0,
        where + ": prompt_encoder.mask_in_chans must be a positive multiple of 4");
}

}  // namespace

SamConfig SamConfig::from_json_file(const std::string& path) {
  std::ifstream f(path);
  check(f.good(), "cannot open config '" + path + "'");
  nlohmann::json j;
  try {
    f >> j;
    SamConfig c;
    c.arch = "custom";
    const auto& e = j.at("image_encoder");
    auto& ie = c.image_encoder;
    ie.embed_dim = e.at("embed_dim").get<int>();
    ie.depth = e.at("depth").get<int>();
    ie.num_heads = e.at("num_heads").get<int>();
    ie.global_attn_indexes = e.at("global_attn_indexes").get<std::vector<int>>();
    ie.window_size = e.value("window_size", 14);
    ie.patch_size = e.value("patch_size", 16);
    ie.img_size = e.value("img_size", 1024);
    ie.mlp_ratio = e.value("mlp_ratio", 4);
    ie.out_chans = e.value("out_chans", 256);
    const auto& p = j.at("prompt_encoder");
    c.prompt_encoder.embed_dim = p.value("embed_dim", ie.out_chans);
    c.prompt_encoder.mask_in_chans = p.value("mask_in_chans", 16);
    const auto& d = j.at("mask_decoder");
    auto& md = c.mask_decoder;
    md.transformer_dim = d.value("transformer_dim", ie.out_chans);
    md.depth = d.value("depth", 2);
    md.mlp_dim = d.value("mlp_dim", 2048);
    md.num_heads = d.value("num_heads", 8);
    md.num_multimask_outputs = d.value("num_multimask_outputs", 3);
    md.iou_head_depth = d.value("iou_head_depth", 3);
    md.iou_head_hidden_dim = d.value("iou_head_hidden_dim", 256);
    md.attention_downsample_rate = d.value("attention_downsample_rate", 2);
    check_config(c, "config '" + path + "'");
    c.arch = name_of(c);
    return c;
  } catch (const nlohmann::json::exception& ex) {
    throw Error("config '" + path + "': " + ex.what());
  }
}

SamConfig SamConfig::infer(const io::TensorMap& w) {
  const std::string where = "inferring the architecture of " + (w.source.empty() ? "checkpoint" : w.source);
  auto dim = [&](const std::string& name, int i) {
    const Tensor& t = w.at(name);
    check(t.ndim() > i, where + ": tensor '" + name + "' has shape " + shape_str(t.shape()));
    return static_cast<int>(t.dim(i));
  };
  SamConfig c;
  auto& e = c.image_encoder;
  e.embed_dim = dim("image_encoder.patch_embed.proj.weight", 0);
  e.patch_size = dim("image_encoder.patch_embed.proj.weight", 2);
  e.img_size = dim("image_encoder.pos_embed", 1) * e.patch_size;
  e.depth = count_prefixed(w, "image_encoder.blocks.", ".norm1.weight");
  check(e.depth > 0, where + ": no image_encoder.blocks.*");
  const int head_dim = dim("image_encoder.blocks.0.attn.rel_pos_h", 1);
  check(head_dim > 0 && e.embed_dim % head_dim == 0,
        where + ": rel_pos_h head dim " + std::to_string(head_dim) + " does not divide embed_dim");
  e.num_heads = e.embed_dim / head_dim;
  const int global_len = 2 * e.grid() - 1;
  e.global_attn_indexes.clear();
  e.window_size = 14;
  for (int i = 0; i < e.depth; ++i) {
    const int len = dim("image_encoder.blocks." + std::to_string(i) + ".attn.rel_pos_h", 0);
    if (len == global_len)
      e.global_attn_indexes.push_back(i);
    else
      e.window_size = (len + 1) / 2;
  }
  e.mlp_ratio = dim("image_encoder.blocks.0.mlp.lin1.weight", 0) / e.embed_dim;
  e.out_chans = dim("image_encoder.neck.0.weight", 0);
  c.prompt_encoder.embed_dim = dim("prompt_encoder.no_mask_embed.weight", 1);
  c.prompt_encoder.mask_in_chans = dim("prompt_encoder.mask_downscaling.3.weight", 0);
  auto& d = c.mask_decoder;
  d.transformer_dim = dim("mask_decoder.iou_token.weight", 1);
  d.depth = count_prefixed(w, "mask_decoder.transformer.layers.", ".norm1.weight");
  d.mlp_dim = dim("mask_decoder.transformer.layers.0.mlp.lin1.weight", 0);
  d.num_heads = 8;  // not visible in shapes; every official model has 8
  d.num_multimask_outputs = dim("mask_decoder.mask_tokens.weight", 0) - 1;
  d.iou_head_depth = count_prefixed(w, "mask_decoder.iou_prediction_head.layers.", ".weight");
  d.iou_head_hidden_dim = dim("mask_decoder.iou_prediction_head.layers.0.weight", 0);
  d.attention_downsample_rate =
      d.transformer_dim / std::max(1, dim("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight", 0));
  check_config(c, where);
  c.arch = name_of(c);
  return c;
}

std::vector<std::pair<std::string, Shape>> SamConfig::parameter_shapes() const {
  std::vector<std::pair<std::string, Shape>> p;
  auto add = [&](const std::string& n, Shape s) { p.emplace_back(n, std::move(s)); };
  auto linear = [&](const std::string& n, int64_t out, int64_t in, bool bias = true) {
    add(n + ".weight", {out, in});
    if (bias) add(n + ".bias", {out});
  };
  auto norm = [&](const std::string& n, int64_t c) {
    add(n + ".weight", {c});
    add(n + ".bias", {c});
  };
  const auto& e = image_encoder;
  const int64_t C = e.embed_dim, G = e.grid();
  add("image_encoder.pos_embed", {1, G, G, C});
  add("image_encoder.patch_embed.proj.weight", {C, 3, e.patch_size, e.patch_size});
  add("image_encoder.patch_embed.proj.bias", {C});
  for (int i = 0; i < e.depth; ++i) {
    const std::string b = "image_encoder.blocks." + std::to_string(i);
    const int64_t len = e.is_global(i) ? 2 * G - 1 : 2 * e.window_size - 1;
    norm(b + ".norm1", C);
    add(b + ".attn.rel_pos_h", {len, e.head_dim()});
    add(b + ".attn.rel_pos_w", {len, e.head_dim()});
    linear(b + ".attn.qkv", 3 * C, C);
    linear(b + ".attn.proj", C, C);
    norm(b + ".norm2", C);
    linear(b + ".mlp.lin1", C * e.mlp_ratio, C);
    linear(b + ".mlp.lin2", C, C * e.mlp_ratio);
  }
  const int64_t O = e.out_chans;
  add("image_encoder.neck.0.weight", {O, C, 1, 1});
  norm("image_encoder.neck.1", O);
  add("image_encoder.neck.2.weight", {O, O, 3, 3});
  norm("image_encoder.neck.3", O);

  const int64_t E = prompt_encoder.embed_dim, M = prompt_encoder.mask_in_chans;
  add("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", {2, E / 2});
  for (int i = 0; i < 4; ++i) add("prompt_encoder.point_embeddings." + std::to_string(i) + ".weight", {1, E});
  add("prompt_encoder.not_a_point_embed.weight", {1, E});
  add("prompt_encoder.mask_downscaling.0.weight", {M / 4, 1, 2, 2});
  add("prompt_encoder.mask_downscaling.0.bias", {M / 4});
  norm("prompt_encoder.mask_downscaling.1", M / 4);
  add("prompt_encoder.mask_downscaling.3.weight", {M, M / 4, 2, 2});
  add("prompt_encoder.mask_downscaling.3.bias", {M});
  norm("prompt_encoder.mask_downscaling.4", M);
  add("prompt_encoder.mask_downscaling.6.weight", {E, M, 1, 1});
  add("prompt_encoder.mask_downscaling.6.bias", {E});
  add("prompt_encoder.no_mask_embed.weight", {1, E});

  const auto& d = mask_decoder;
  const int64_t D = d.transformer_dim, Di = D / d.attention_downsample_rate;
  auto attention = [&](const std::string& n, int64_t internal) {
    linear(n + ".q_proj", internal, D);
    linear(n + ".k_proj", internal, D);
    linear(n + ".v_proj", internal, D);
    linear(n + ".out_proj", D, internal);
  };
  for (int i = 0; i < d.depth; ++i) {
    const std::string l = "mask_decoder.transformer.layers." + std::to_string(i);
    attention(l + ".self_attn", D);
    norm(l + ".norm1", D);
    attention(l + ".cross_attn_token_to_image", Di);
    norm(l + ".norm2", D);
    linear(l + ".mlp.lin1", d.mlp_dim, D);
    linear(l + ".mlp.lin2", D, d.mlp_dim);
    norm(l + ".norm3", D);
    norm(l + ".norm4", D);
    attention(l + ".cross_attn_image_to_token", Di);
  }
  attention("mask_decoder.transformer.final_attn_token_to_image", Di);
  norm("mask_decoder.transformer.norm_final_attn", D);
  const int64_t T = d.num_multimask_outputs + 1;
  add("mask_decoder.iou_token.weight", {1, D});
  add("mask_decoder.mask_tokens.weight", {T, D});
  add("mask_decoder.output_upscaling.0.weight", {D, D / 4, 2, 2});
  add("mask_decoder.output_upscaling.0.bias", {D / 4});
  norm("mask_decoder.output_upscaling.1", D / 4);
  add("mask_decoder.output_upscaling.3.weight", {D / 4, D / 8, 2, 2});
  add("mask_decoder.output_upscaling.3.bias", {D / 8});
  for (int64_t t = 0; t < T; ++t) {
    const std::string h = "mask_decoder.output_hypernetworks_mlps." + std::to_string(t) + ".layers.";
    linear(h + "0", D, D);
    linear(h + "1", D, D);
    linear(h + "2", D / 8, D);
  }
  for (int i = 0; i < d.iou_head_depth; ++i) {
    const int64_t in = i == 0 ? D : d.iou_head_hidden_dim;
    const int64_t out = i == d.iou_head_depth - 1 ? T : d.iou_head_hidden_dim;
    linear("mask_decoder.iou_prediction_head.layers." + std::to_string(i), out, in);
  }
  return p;
}

void SamConfig::validate(const io::TensorMap& weights) const {
  for (const auto& [name, shape] : parameter_shapes()) {
    const Tensor& t = weights.at(name);
    // rel-pos tables of another length are resized at load, as the original does.
    if (name.find(".attn.rel_pos_") != std::string::npos) {
      check(t.ndim() == 2 && t.dim(1) == shape[1],
            "tensor '" + name + "' in " + weights.source + ": expected [*, " + std::to_string(shape[1]) + "], found " +
                shape_str(t.shape()));
      continue;
    }
    weights.at(name, shape);
  }
}

std::string SamConfig::describe() const {
  const auto& e = image_encoder;
  const auto& d = mask_decoder;
  std::ostringstream o;
  o << "image encoder: ViT embed_dim " << e.embed_dim << ", depth " << e.depth << ", heads " << e.num_heads
    << " (head dim " << e.head_dim() << "), global attention in blocks [";
  for (size_t i = 0; i < e.global_attn_indexes.size(); ++i) o << (i ? ", " : "") << e.global_attn_indexes[i];
  o << "], window " << e.window_size << ", patch " << e.patch_size << ", image " << e.img_size << ", mlp ratio "
    << e.mlp_ratio << ", out channels " << e.out_chans << "; prompt encoder: embed_dim " << prompt_encoder.embed_dim
    << ", mask channels " << prompt_encoder.mask_in_chans << "; mask decoder: dim " << d.transformer_dim << ", depth "
    << d.depth << ", mlp " << d.mlp_dim << ", heads " << d.num_heads << ", " << d.num_multimask_outputs
    << " multimask outputs, IoU head " << d.iou_head_depth << "x" << d.iou_head_hidden_dim;
  return o.str();
}

}  // namespace segany
