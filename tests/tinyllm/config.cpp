// Tests of tinyllm/config.hpp: an HF LlamaForCausalLM config.json, HF's defaults, and each
// rejected value named in the error.
#include <tinyllm/config.hpp>

#include <catch2/catch.hpp>

#include "checkpoint_writer.hpp"

#include <string>

namespace {

using Catch::Matchers::Contains;
using tinyllm::Config;
using tinyllm::LoadError;
using tinyllm::test::MessageContains;

// What transformers 4.57 writes for a LlamaConfig (examples/tinyllm/fixtures/random-llama).
nlohmann::json hf_config() {
  return nlohmann::json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": null, "dtype": "bfloat16", "eos_token_id": null, "head_dim": 16,
    "hidden_act": "silu", "hidden_size": 96, "initializer_range": 0.02,
    "intermediate_size": 200, "max_position_embeddings": 512, "mlp_bias": false,
    "model_type": "llama", "num_attention_heads": 6, "num_hidden_layers": 3,
    "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
    "rope_scaling": null, "rope_theta": 500000.0, "tie_word_embeddings": true,
    "transformers_version": "4.57.1", "use_cache": true, "vocab_size": 256})");
}

// Parsing `json` throws a LoadError whose message holds every fragment.
void require_rejected(const nlohmann::json& json, const std::vector<std::string>& fragments) {
  try {
    Config::parse(json, "dir/config.json");
    FAIL("no LoadError for " << json.dump());
  } catch (const LoadError& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK_THAT(message, Contains("dir/config.json: "));
    for (const std::string& fragment : fragments) CHECK_THAT(message, Contains(fragment));
  }
}

}  // namespace

TEST_CASE("config parses an HF LlamaForCausalLM config.json", "[tinyllm][config]") {
  const Config c = Config::parse(hf_config());
  CHECK(c.hidden_size == 96);
  CHECK(c.intermediate_size == 200);
  CHECK(c.num_hidden_layers == 3);
  CHECK(c.num_attention_heads == 6);
  CHECK(c.num_key_value_heads == 3);
  CHECK(c.head_dim == 16);
  CHECK(c.vocab_size == 256);
  CHECK(c.max_position_embeddings == 512);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.rope_theta == 500000.0);
  CHECK(c.tie_word_embeddings);

  tinyllm::test::TempDir dir;
  tinyllm::test::write_text(dir / "config.json", hf_config().dump(2));
  CHECK(Config::load(dir / "config.json") == c);
}

TEST_CASE("config applies HF's defaults", "[tinyllm][config]") {
  nlohmann::json json = hf_config();
  for (const char* key : {"num_key_value_heads", "head_dim", "rope_theta", "tie_word_embeddings",
                          "rope_scaling", "model_type", "hidden_act", "attention_bias"}) {
    json.erase(key);
  }
  json["rope_theta"] = nullptr;  // null reads as absent
  const Config c = Config::parse(json);
  CHECK(c.num_key_value_heads == 6);  // = num_attention_heads
  CHECK(c.head_dim == 16);            // = 96 / 6
  CHECK(c.rope_theta == 10000.0);
  CHECK_FALSE(c.tie_word_embeddings);

  json["head_dim"] = 32;       // an explicit head_dim need not divide hidden_size
  json["rope_theta"] = 10000;  // an integer is a number
  CHECK(Config::parse(json).head_dim == 32);
  CHECK(Config::parse(json).rope_theta == 10000.0);
}

TEST_CASE("config rejects what the forward pass cannot run", "[tinyllm][config]") {
  nlohmann::json json = hf_config();
  SECTION("missing required field") {
    json.erase("hidden_size");
    require_rejected(json, {"missing hidden_size"});
  }
  SECTION("zero layers") {
    json["num_hidden_layers"] = 0;
    require_rejected(json, {"num_hidden_layers is 0", "positive integer"});
  }
  SECTION("negative vocabulary") {
    json["vocab_size"] = -5;
    require_rejected(json, {"vocab_size is -5"});
  }
  SECTION("fractional head count") {
    json["num_attention_heads"] = 6.5;
    require_rejected(json, {"num_attention_heads is 6.5"});
  }
  SECTION("string where a number belongs") {
    json["intermediate_size"] = "200";
    require_rejected(json, {"intermediate_size is \"200\""});
  }
  SECTION("query heads not a multiple of kv heads") {
    json["num_key_value_heads"] = 4;
    require_rejected(json, {"num_attention_heads 6 is not a multiple of num_key_value_heads 4"});
  }
  SECTION("hidden size not a multiple of the heads without head_dim") {
    json.erase("head_dim");
    json["hidden_size"] = 100;
    require_rejected(json, {"hidden_size 100 is not a multiple of num_attention_heads 6"});
  }
  SECTION("odd head_dim") {
    json["head_dim"] = 15;
    require_rejected(json, {"head_dim 15 is odd"});
  }
  SECTION("rope_scaling other than null") {
    json["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
    require_rejected(json, {"rope_scaling is", "llama3", "only null"});
  }
  SECTION("non-positive rms_norm_eps") {
    json["rms_norm_eps"] = 0;
    require_rejected(json, {"rms_norm_eps is 0", "finite number > 0"});
  }
  SECTION("negative rope_theta") {
    json["rope_theta"] = -1.0;
    require_rejected(json, {"rope_theta is -1.0"});
  }
  SECTION("another architecture") {
    json["model_type"] = "mistral";
    require_rejected(json, {"model_type is \"mistral\"", "\"llama\""});
  }
  SECTION("another activation") {
    json["hidden_act"] = "gelu";
    require_rejected(json, {"hidden_act is \"gelu\""});
  }
  SECTION("attention bias") {
    json["attention_bias"] = true;
    require_rejected(json, {"attention_bias is true", "no biases"});
  }
  SECTION("tie_word_embeddings not a boolean") {
    json["tie_word_embeddings"] = 1;
    require_rejected(json, {"tie_word_embeddings is 1"});
  }
  SECTION("vocabulary beyond int token ids") {
    json["vocab_size"] = 4294967296LL;
    require_rejected(json, {"vocab_size 4294967296"});
  }
  SECTION("not an object") {
    require_rejected(nlohmann::json::array(), {"JSON array, not an object"});
  }
}

TEST_CASE("config load names the file it could not read", "[tinyllm][config]") {
  tinyllm::test::TempDir dir;
  CHECK_THROWS_MATCHES(Config::load(dir / "config.json"), LoadError,
                       MessageContains("config.json: cannot open"));
  tinyllm::test::write_text(dir / "config.json", "{\"hidden_size\": 4,");
  CHECK_THROWS_MATCHES(Config::load(dir / "config.json"), LoadError,
                       MessageContains("config.json: not valid JSON"));
}
