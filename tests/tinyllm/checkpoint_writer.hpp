// tests/tinyllm/checkpoint_writer.hpp — test-side writers for the tinyllm loaders: temporary
// directories, .safetensors files (well-formed, or with a hand-written header), random tiny
// Llama checkpoints, and a float64 re-implementation of the Llama forward pass (full causal
// attention, no cache) to check tinyllm::Model against.
#pragma once

#include <tinyllm/config.hpp>

#include <Eigen/Core>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

namespace tinyllm::test {

namespace fs = std::filesystem;

// Matches an exception whose what() contains `fragment`: CHECK_THROWS_MATCHES(call,
// LoadError, MessageContains("tensor 'w'") && MessageContains("[0, 20]")).
class MessageContains : public Catch::MatcherBase<std::exception> {
 public:
  explicit MessageContains(std::string fragment) : fragment_(std::move(fragment)) {}
  bool match(const std::exception& e) const override {
    return std::string(e.what()).find(fragment_) != std::string::npos;
  }
  std::string describe() const override { return "has a message containing \"" + fragment_ + "\""; }

 private:
  std::string fragment_;
};

// A fresh directory under the system temp dir, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("tinyllm-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  const fs::path& path() const noexcept { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

inline void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A safetensors file from a header text and a data buffer, as given (for malformed files).
inline void write_raw(const fs::path& path, const std::string& header,
                      const std::vector<std::uint8_t>& data, std::uint64_t header_length) {
  std::ofstream out(path, std::ios::binary);
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((header_length >> (8 * i)) & 0xFF));
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}
inline void write_raw(const fs::path& path, const std::string& header,
                      const std::vector<std::uint8_t>& data) {
  write_raw(path, header, data, header.size());
}

// `value` as the dtype stores it (round to nearest even), back in float.
inline float round_to(const std::string& dtype, float value) {
  if (dtype == "F16") return static_cast<float>(Eigen::half(value));
  if (dtype == "BF16") return static_cast<float>(Eigen::bfloat16(value));
  return value;
}

inline void append_encoded(std::vector<std::uint8_t>& out, const std::string& dtype,
                           std::span<const float> values) {
  for (float value : values) {
    if (dtype == "F64") {
      std::uint64_t bits = 0;
      const double wide = value;
      std::memcpy(&bits, &wide, 8);
      for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(bits >> (8 * i)));
    } else if (dtype == "F32") {
      std::uint32_t bits = 0;
      std::memcpy(&bits, &value, 4);
      for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::uint8_t>(bits >> (8 * i)));
    } else {
      const std::uint16_t bits =
          dtype == "F16" ? Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(value))
                         : Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(value));
      out.push_back(static_cast<std::uint8_t>(bits & 0xFF));
      out.push_back(static_cast<std::uint8_t>(bits >> 8));
    }
  }
}

struct Tensor {
  std::string dtype = "F32";  // F32, F16, BF16 (or F64, which tinyllm does not read)
  std::vector<std::size_t> shape;
  std::vector<float> values;  // row-major; encoded to dtype on write
};

// A well-formed safetensors file, tensors back to back in name order.
inline void write_safetensors(const fs::path& path, const std::map<std::string, Tensor>& tensors,
                              const nlohmann::json& metadata = nullptr) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<std::uint8_t> data;
  for (const auto& [name, tensor] : tensors) {
    const std::size_t begin = data.size();
    append_encoded(data, tensor.dtype, tensor.values);
    header[name] = {
        {"dtype", tensor.dtype}, {"shape", tensor.shape}, {"data_offsets", {begin, data.size()}}};
  }
  if (!metadata.is_null()) header["__metadata__"] = metadata;
  write_raw(path, header.dump(), data);
}

// A random Llama checkpoint in HF layout, its values already rounded to `dtype`.
struct TinyLlama {
  Config config;
  std::string dtype = "F32";
  std::map<std::string, Tensor> weights;

  static Config tiny_config() {
    return {.hidden_size = 32,
            .intermediate_size = 48,
            .num_hidden_layers = 2,
            .num_attention_heads = 4,
            .num_key_value_heads = 2,
            .head_dim = 8,
            .vocab_size = 16,
            .max_position_embeddings = 128,
            .rms_norm_eps = 1e-5,
            .rope_theta = 10000.0,
            .tie_word_embeddings = false};
  }

  static TinyLlama random(const Config& config, std::uint32_t seed, std::string dtype = "F32") {
    TinyLlama m{config, std::move(dtype), {}};
    std::mt19937 rng(seed);
    const Config& c = config;
    const std::size_t q = c.num_attention_heads * c.head_dim,
                      kv = c.num_key_value_heads * c.head_dim;
    // Projections ~ N(0, gain² / in) so activations stay O(1); norm weights ~ 1 ± 0.2.
    const auto matrix = [&](const std::string& name, std::size_t rows, std::size_t cols,
                            double gain) {
      std::normal_distribution<double> normal(0.0, gain / std::sqrt(static_cast<double>(cols)));
      m.add(name, {rows, cols}, [&] { return normal(rng); });
    };
    const auto norm = [&](const std::string& name) {
      std::normal_distribution<double> normal(1.0, 0.2);
      m.add(name, {c.hidden_size}, [&] { return normal(rng); });
    };
    {
      std::normal_distribution<double> normal(0.0, 1.0);
      m.add("model.embed_tokens.weight", {c.vocab_size, c.hidden_size},
            [&] { return normal(rng); });
    }
    for (std::size_t i = 0; i < c.num_hidden_layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      norm(p + "input_layernorm.weight");
      matrix(p + "self_attn.q_proj.weight", q, c.hidden_size, 2.0);
      matrix(p + "self_attn.k_proj.weight", kv, c.hidden_size, 2.0);
      matrix(p + "self_attn.v_proj.weight", kv, c.hidden_size, 1.0);
      matrix(p + "self_attn.o_proj.weight", c.hidden_size, q, 1.0);
      norm(p + "post_attention_layernorm.weight");
      matrix(p + "mlp.gate_proj.weight", c.intermediate_size, c.hidden_size, 1.0);
      matrix(p + "mlp.up_proj.weight", c.intermediate_size, c.hidden_size, 1.0);
      matrix(p + "mlp.down_proj.weight", c.hidden_size, c.intermediate_size, 1.0);
    }
    norm("model.norm.weight");
    if (!c.tie_word_embeddings) matrix("lm_head.weight", c.vocab_size, c.hidden_size, 2.0);
    return m;
  }

  template <class Draw>
  void add(const std::string& name, std::vector<std::size_t> shape, Draw draw) {
    Tensor t{dtype, std::move(shape), {}};
    std::size_t n = 1;
    for (std::size_t e : t.shape) n *= e;
    for (std::size_t i = 0; i < n; ++i) t.values.push_back(round_to(dtype, float(draw())));
    weights[name] = std::move(t);
  }

  const std::vector<float>& w(const std::string& name) const { return weights.at(name).values; }

  nlohmann::json config_json() const {
    const Config& c = config;
    return {{"architectures", {"LlamaForCausalLM"}},
            {"model_type", "llama"},
            {"hidden_act", "silu"},
            {"attention_bias", false},
            {"hidden_size", c.hidden_size},
            {"intermediate_size", c.intermediate_size},
            {"num_hidden_layers", c.num_hidden_layers},
            {"num_attention_heads", c.num_attention_heads},
            {"num_key_value_heads", c.num_key_value_heads},
            {"head_dim", c.head_dim},
            {"vocab_size", c.vocab_size},
            {"max_position_embeddings", c.max_position_embeddings},
            {"rms_norm_eps", c.rms_norm_eps},
            {"rope_theta", c.rope_theta},
            {"rope_scaling", nullptr},
            {"tie_word_embeddings", c.tie_word_embeddings},
            {"torch_dtype", dtype == "F32"   ? "float32"
                            : dtype == "F16" ? "float16"
                                             : "bfloat16"}};
  }

  // config.json + model.safetensors into `directory`.
  void write(const fs::path& directory) const {
    write_text(directory / "config.json", config_json().dump(2));
    write_safetensors(directory / "model.safetensors", weights, {{"format", "pt"}});
  }

  // config.json + `shards` files + model.safetensors.index.json, tensors dealt round-robin.
  void write_sharded(const fs::path& directory, std::size_t shards) const {
    write_text(directory / "config.json", config_json().dump(2));
    std::vector<std::map<std::string, Tensor>> parts(shards);
    nlohmann::json map = nlohmann::json::object();
    std::size_t i = 0;
    for (const auto& [name, tensor] : weights) {
      const std::size_t shard = i++ % shards;
      parts[shard][name] = tensor;
      map[name] = shard_name(shard, shards);
    }
    for (std::size_t s = 0; s < shards; ++s) {
      write_safetensors(directory / shard_name(s, shards), parts[s]);
    }
    write_text(directory / "model.safetensors.index.json",
               nlohmann::json{{"metadata", {{"total_size", 0}}}, {"weight_map", map}}.dump());
  }

  static std::string shard_name(std::size_t shard, std::size_t shards) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", shard + 1, shards);
    return name;
  }

  // Float64 forward pass over `tokens` from position 0: full causal attention, no cache.
  // Returns [tokens][vocab] logits.
  std::vector<std::vector<double>> reference_logits(std::span<const int> tokens) const {
    const Config& c = config;
    const std::size_t n = tokens.size(), d = c.head_dim, half = d / 2;
    const std::size_t group = c.num_attention_heads / c.num_key_value_heads;
    using Rows = std::vector<std::vector<double>>;
    const auto linear = [](const Rows& x, const std::vector<float>& weight, std::size_t out) {
      Rows y(x.size(), std::vector<double>(out, 0.0));
      const std::size_t in = x[0].size();
      for (std::size_t t = 0; t < x.size(); ++t) {
        for (std::size_t o = 0; o < out; ++o) {
          double sum = 0.0;
          for (std::size_t i = 0; i < in; ++i) sum += x[t][i] * double(weight[o * in + i]);
          y[t][o] = sum;
        }
      }
      return y;
    };
    const auto rms = [&](const Rows& x, const std::vector<float>& weight) {
      Rows y = x;
      for (auto& row : y) {
        double mean = 0.0;
        for (double v : row) mean += v * v;
        mean /= double(row.size());
        const double scale = 1.0 / std::sqrt(mean + c.rms_norm_eps);
        for (std::size_t i = 0; i < row.size(); ++i) row[i] *= scale * double(weight[i]);
      }
      return y;
    };
    const auto rope = [&](Rows& x) {
      for (std::size_t t = 0; t < n; ++t) {
        for (std::size_t h = 0; h < x[t].size() / d; ++h) {
          double* v = &x[t][h * d];
          for (std::size_t i = 0; i < half; ++i) {
            const double angle = double(t) / std::pow(c.rope_theta, double(2 * i) / double(d));
            const double x1 = v[i], x2 = v[i + half];
            v[i] = x1 * std::cos(angle) - x2 * std::sin(angle);
            v[i + half] = x2 * std::cos(angle) + x1 * std::sin(angle);
          }
        }
      }
    };

    const auto& embed = w("model.embed_tokens.weight");
    Rows x(n, std::vector<double>(c.hidden_size));
    for (std::size_t t = 0; t < n; ++t) {
      for (std::size_t i = 0; i < c.hidden_size; ++i) {
        x[t][i] = embed[std::size_t(tokens[t]) * c.hidden_size + i];
      }
    }
    for (std::size_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      const Rows h = rms(x, w(p + "input_layernorm.weight"));
      Rows q = linear(h, w(p + "self_attn.q_proj.weight"), c.num_attention_heads * d);
      Rows k = linear(h, w(p + "self_attn.k_proj.weight"), c.num_key_value_heads * d);
      const Rows v = linear(h, w(p + "self_attn.v_proj.weight"), c.num_key_value_heads * d);
      rope(q);
      rope(k);
      Rows attention(n, std::vector<double>(c.num_attention_heads * d, 0.0));
      for (std::size_t head = 0; head < c.num_attention_heads; ++head) {
        const std::size_t kv = head / group;
        for (std::size_t t = 0; t < n; ++t) {
          std::vector<double> scores(t + 1);
          double max = -INFINITY;
          for (std::size_t s = 0; s <= t; ++s) {
            double dot = 0.0;
            for (std::size_t i = 0; i < d; ++i) dot += q[t][head * d + i] * k[s][kv * d + i];
            scores[s] = dot / std::sqrt(double(d));
            max = std::max(max, scores[s]);
          }
          double total = 0.0;
          for (double& s : scores) total += (s = std::exp(s - max));
          for (std::size_t s = 0; s <= t; ++s) {
            for (std::size_t i = 0; i < d; ++i) {
              attention[t][head * d + i] += scores[s] / total * v[s][kv * d + i];
            }
          }
        }
      }
      const Rows o = linear(attention, w(p + "self_attn.o_proj.weight"), c.hidden_size);
      for (std::size_t t = 0; t < n; ++t) {
        for (std::size_t i = 0; i < c.hidden_size; ++i) x[t][i] += o[t][i];
      }
      const Rows h2 = rms(x, w(p + "post_attention_layernorm.weight"));
      Rows gate = linear(h2, w(p + "mlp.gate_proj.weight"), c.intermediate_size);
      const Rows up = linear(h2, w(p + "mlp.up_proj.weight"), c.intermediate_size);
      for (std::size_t t = 0; t < n; ++t) {
        for (std::size_t i = 0; i < c.intermediate_size; ++i) {
          gate[t][i] = gate[t][i] / (1.0 + std::exp(-gate[t][i])) * up[t][i];
        }
      }
      const Rows down = linear(gate, w(p + "mlp.down_proj.weight"), c.hidden_size);
      for (std::size_t t = 0; t < n; ++t) {
        for (std::size_t i = 0; i < c.hidden_size; ++i) x[t][i] += down[t][i];
      }
    }
    const Rows final_norm = rms(x, w("model.norm.weight"));
    return linear(final_norm,
                  c.tie_word_embeddings ? w("model.embed_tokens.weight") : w("lm_head.weight"),
                  c.vocab_size);
  }
};

}  // namespace tinyllm::test
