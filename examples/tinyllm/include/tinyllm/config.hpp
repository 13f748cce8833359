// tinyllm/config.hpp — the fields of a Hugging Face LlamaForCausalLM config.json that the
// forward pass needs, parsed and validated.
//
//   const tinyllm::Config config = tinyllm::Config::load(directory / "config.json");
//
// Required: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
// vocab_size, rms_norm_eps, max_position_embeddings. Optional, with HF's defaults:
// num_key_value_heads (= num_attention_heads), head_dim (= hidden_size / num_attention_heads),
// rope_theta (10000), tie_word_embeddings (false). torch_dtype / dtype and every other key
// are ignored, except the ones that would change the computation, which are checked:
// rope_scaling must be absent or null, model_type "llama", hidden_act "silu", attention_bias
// and mlp_bias false. Integers must be JSON integers > 0; rms_norm_eps and rope_theta finite
// numbers > 0; num_attention_heads a multiple of num_key_value_heads; head_dim even (RoPE
// rotates pairs); without head_dim, hidden_size a multiple of num_attention_heads;
// vocab_size at most INT_MAX (token ids are int). Any violation: tinyllm::LoadError naming
// the file, the field and its value.
#pragma once

#include <tinyllm/error.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

namespace tinyllm {

struct Config {
  std::size_t hidden_size = 0;
  std::size_t intermediate_size = 0;
  std::size_t num_hidden_layers = 0;
  std::size_t num_attention_heads = 0;
  std::size_t num_key_value_heads = 0;
  std::size_t head_dim = 0;
  std::size_t vocab_size = 0;
  std::size_t max_position_embeddings = 0;
  double rms_norm_eps = 0.0;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;

  // Parses config.json's object; `source` names it in errors (usually the file path).
  static Config parse(const nlohmann::json& json, std::string_view source = "config.json") {
    const Reader read{json, source};
    if (!json.is_object()) read.fail("the file is a JSON {}, not an object", json.type_name());
    read.expect_string("model_type", "llama");
    read.expect_string("hidden_act", "silu");
    read.expect_false("attention_bias");
    read.expect_false("mlp_bias");
    if (const auto it = json.find("rope_scaling"); it != json.end() && !it->is_null()) {
      read.fail("rope_scaling is {}; only null (plain RoPE) is supported", it->dump());
    }

    Config c;
    c.hidden_size = read.count("hidden_size");
    c.intermediate_size = read.count("intermediate_size");
    c.num_hidden_layers = read.count("num_hidden_layers");
    c.num_attention_heads = read.count("num_attention_heads");
    c.num_key_value_heads = read.count("num_key_value_heads", c.num_attention_heads);
    c.vocab_size = read.count("vocab_size");
    c.max_position_embeddings = read.count("max_position_embeddings");
    c.rms_norm_eps = read.positive("rms_norm_eps");
    c.rope_theta = read.positive("rope_theta", 10000.0);
    if (const auto it = json.find("tie_word_embeddings"); it != json.end()) {
      if (!it->is_boolean()) read.fail("tie_word_embeddings is {}, not a boolean", it->dump());
      c.tie_word_embeddings = it->get<bool>();
    }

    if (c.num_attention_heads % c.num_key_value_heads != 0) {
      read.fail("num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads, c.num_key_value_heads);
    }
    if (const auto it = json.find("head_dim"); it != json.end() && !it->is_null()) {
      c.head_dim = read.count("head_dim");
    } else {
      if (c.hidden_size % c.num_attention_heads != 0) {
        read.fail("hidden_size {} is not a multiple of num_attention_heads {} (and no head_dim)",
                  c.hidden_size, c.num_attention_heads);
      }
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    if (c.head_dim % 2 != 0) read.fail("head_dim {} is odd; RoPE needs pairs", c.head_dim);
    if (c.vocab_size > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
      read.fail("vocab_size {} does not fit token ids of type int", c.vocab_size);
    }
    return c;
  }

  // Reads and parses a config.json file.
  static Config load(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw LoadError(path.string() + ": cannot open the file");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    nlohmann::json json;
    try {
      json = nlohmann::json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
      throw LoadError(path.string() + ": not valid JSON: " + e.what());
    }
    return parse(json, path.string());
  }

  friend bool operator==(const Config&, const Config&) = default;

 private:
  // Typed field access with errors that name the source and the field.
  struct Reader {
    const nlohmann::json& json;
    std::string_view source;

    template <class... Args>
    [[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) const {
      throw LoadError(fmt::format("{}: ", source) +
                      fmt::format(format, std::forward<Args>(args)...));
    }

    const nlohmann::json* find(const char* key) const {
      const auto it = json.find(key);
      return it == json.end() || it->is_null() ? nullptr : &*it;
    }

    // A JSON integer > 0 (a missing key takes `fallback`, 0 = required).
    std::size_t count(const char* key, std::size_t fallback = 0) const {
      const nlohmann::json* value = find(key);
      if (value == nullptr) {
        if (fallback == 0) fail("missing {}", key);
        return fallback;
      }
      const bool positive = value->is_number_unsigned()
                                ? value->get<std::uint64_t>() > 0
                                : value->is_number_integer() && value->get<std::int64_t>() > 0;
      if (!positive) {
        fail("{} is {}, not a positive integer", key, value->dump());
      }
      return value->get<std::size_t>();
    }

    // A finite JSON number > 0 (a missing key takes `fallback`, 0 = required).
    double positive(const char* key, double fallback = 0.0) const {
      const nlohmann::json* value = find(key);
      if (value == nullptr) {
        if (fallback == 0.0) fail("missing {}", key);
        return fallback;
      }
      if (!value->is_number() || !std::isfinite(value->get<double>()) ||
          !(value->get<double>() > 0.0)) {
        fail("{} is {}, not a finite number > 0", key, value->dump());
      }
      return value->get<double>();
    }

    void expect_string(const char* key, std::string_view expected) const {
      const nlohmann::json* value = find(key);
      if (value != nullptr && (!value->is_string() || value->get<std::string>() != expected)) {
        fail("{} is {}; tinyllm runs only \"{}\"", key, value->dump(), expected);
      }
    }

    void expect_false(const char* key) const {
      const nlohmann::json* value = find(key);
      if (value != nullptr && *value != false) {
        fail("{} is {}; tinyllm's Llama has no biases", key, value->dump());
      }
    }
  };
};

}  // namespace tinyllm
