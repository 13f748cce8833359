// tinyllm::Model against transformers itself, on two checkpoints of different layouts:
//  - examples/tinyllm/model, the shipped trained model (fp32, untied, 4 query / 2 kv heads of
//    64, rope_theta 10000), with fixtures/model.logits.json;
//  - examples/tinyllm/fixtures/random-llama, a random LlamaForCausalLM (BF16 weights, tied
//    embeddings, rope_theta 500000, 6 query / 3 kv heads of 16), with random-llama.logits.json.
// Each fixture holds the fp32 logits HF computed for a 77-token prompt plus its greedy
// continuation (examples/tinyllm/make_fixture.py). No Python is needed here.
#include <tinyllm/model.hpp>
#include <tinyllm/sample.hpp>

#include <catch2/catch.hpp>

#include <kvc/core/kv_cache.hpp>
#include <kvc/runtime/any_cache.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <span>
#include <vector>

#ifndef TINYLLM_FIXTURES
#error "tests/CMakeLists.txt defines TINYLLM_FIXTURES (examples/tinyllm/fixtures)"
#endif

namespace {

void check_against_fixture(const tinyllm::Model& model, const std::filesystem::path& fixture_file) {
  std::ifstream in(fixture_file, std::ios::binary);
  REQUIRE(in);
  const auto fixture = nlohmann::json::parse(in);
  const auto tokens = fixture.at("tokens").get<std::vector<int>>();
  const auto expected = fixture.at("logits").get<std::vector<std::vector<float>>>();
  const auto greedy = fixture.at("greedy").get<std::vector<int>>();
  REQUIRE(expected.size() == tokens.size());

  kvc::CacheModel<kvc::KvCache<>> cache("full", model.geometry());
  const kvc::SequenceId seq = cache.open_sequence();
  tinyllm::RowMatrix logits(tokens.size(), model.config().vocab_size);
  model.forward(cache, seq, tokens, logits);
  double error = 0.0, scale = 0.0;
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    for (std::size_t i = 0; i < expected[t].size(); ++i) {
      const float got = logits(static_cast<Eigen::Index>(t), static_cast<Eigen::Index>(i));
      error = std::max(error, static_cast<double>(std::abs(got - expected[t][i])));
      scale = std::max(scale, static_cast<double>(std::abs(expected[t][i])));
    }
  }
  INFO("max |logit - HF| = " << error << ", max |HF logit| = " << scale);
  CHECK(error < 1e-3);
  CHECK(scale > 1.0);

  // Greedy decode, one token a step, from the prompt's last logits.
  std::vector<float> last(model.config().vocab_size);
  Eigen::Map<Eigen::RowVectorXf>(last.data(), static_cast<Eigen::Index>(last.size())) =
      logits.bottomRows(1);
  std::vector<int> generated;
  for (std::size_t i = 0; i < greedy.size(); ++i) {
    generated.push_back(tinyllm::argmax(last));
    model.forward_last(cache, seq, std::span<const int>(&generated.back(), 1), last);
  }
  CHECK(generated == greedy);
}

}  // namespace

TEST_CASE("forward matches transformers' logits and greedy continuation on a random bf16 model",
          "[tinyllm][model][hf]") {
  const std::filesystem::path fixtures = TINYLLM_FIXTURES;
  const tinyllm::Model model = tinyllm::Model::load(fixtures / "random-llama");
  CHECK(model.config().tie_word_embeddings);
  CHECK(model.config().rope_theta == 500000.0);
  check_against_fixture(model, fixtures / "random-llama.logits.json");
}

TEST_CASE("forward matches transformers' logits and greedy continuation on the shipped model",
          "[tinyllm][model][hf]") {
  const std::filesystem::path fixtures = TINYLLM_FIXTURES;
  const tinyllm::Model model = tinyllm::Model::load(fixtures.parent_path() / "model");
  CHECK_FALSE(model.config().tie_word_embeddings);
  CHECK(model.config().head_dim == 64);
  CHECK(model.config().num_attention_heads > model.config().num_key_value_heads);
  check_against_fixture(model, fixtures / "model.logits.json");
}
