// Tests of tinyllm/sample.hpp: greedy ties, temperature and top-k against the exact
// probabilities, determinism per seed, rejected logits.
#include <tinyllm/sample.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using tinyllm::Sampler;

// Frequencies of each token over `draws` samples.
std::vector<double> frequencies(Sampler& sampler, const std::vector<float>& logits, int draws) {
  std::vector<double> counts(logits.size(), 0.0);
  for (int i = 0; i < draws; ++i) counts[static_cast<std::size_t>(sampler(logits))] += 1.0;
  for (double& c : counts) c /= draws;
  return counts;
}

}  // namespace

TEST_CASE("argmax takes the first largest logit", "[tinyllm][sample]") {
  CHECK(tinyllm::argmax(std::vector<float>{1.0F, 3.0F, -2.0F, 3.0F}) == 1);
  CHECK(tinyllm::argmax(std::vector<float>{-std::numeric_limits<float>::infinity(), -5.0F}) == 1);
  CHECK(tinyllm::argmax(std::vector<float>{0.5F}) == 0);
  CHECK_THROWS_AS(tinyllm::argmax(std::vector<float>{}), std::invalid_argument);
  CHECK_THROWS_WITH(tinyllm::argmax(std::vector<float>{1.0F, std::nanf("")}),
                    Catch::Matchers::Contains("logits[1] is NaN"));
}

TEST_CASE("temperature zero and top-k one are greedy", "[tinyllm][sample]") {
  const std::vector<float> logits = {0.1F, 2.0F, 1.9F, -1.0F};
  Sampler zero({.temperature = 0.0F, .top_k = 0, .seed = 1});
  Sampler top1({.temperature = 5.0F, .top_k = 1, .seed = 1});
  for (int i = 0; i < 100; ++i) {
    CHECK(zero(logits) == 1);
    CHECK(top1(logits) == 1);
  }
}

TEST_CASE("sampling follows softmax(logits / temperature) over the top k", "[tinyllm][sample]") {
  // p = 0.1, 0.2, 0.3, 0.4 at temperature 1.
  const std::vector<float> logits = {std::log(0.1F), std::log(0.2F), std::log(0.3F),
                                     std::log(0.4F)};
  const int draws = 40000;  // standard error of a frequency <= 0.0025
  SECTION("temperature 1") {
    Sampler sampler({.temperature = 1.0F, .top_k = 0, .seed = 3});
    const auto f = frequencies(sampler, logits, draws);
    for (std::size_t i = 0; i < 4; ++i) CHECK(f[i] == Approx(0.1 * double(i + 1)).margin(0.01));
  }
  SECTION("temperature 2 flattens: p ∝ sqrt(p)") {
    Sampler sampler({.temperature = 2.0F, .top_k = 0, .seed = 4});
    const auto f = frequencies(sampler, logits, draws);
    double total = 0.0;
    for (std::size_t i = 0; i < 4; ++i) total += std::sqrt(0.1 * double(i + 1));
    for (std::size_t i = 0; i < 4; ++i) {
      CHECK(f[i] == Approx(std::sqrt(0.1 * double(i + 1)) / total).margin(0.01));
    }
  }
  SECTION("top-2 renormalises the two largest") {
    Sampler sampler({.temperature = 1.0F, .top_k = 2, .seed = 5});
    const auto f = frequencies(sampler, logits, draws);
    CHECK(f[0] == 0.0);
    CHECK(f[1] == 0.0);
    CHECK(f[2] == Approx(3.0 / 7.0).margin(0.01));
    CHECK(f[3] == Approx(4.0 / 7.0).margin(0.01));
  }
  SECTION("-inf logits are never drawn") {
    Sampler sampler({.temperature = 1.5F, .top_k = 0, .seed = 6});
    const float minus_inf = -std::numeric_limits<float>::infinity();
    const auto f = frequencies(sampler, {minus_inf, 0.0F, minus_inf, 0.0F}, 2000);
    CHECK(f[0] == 0.0);
    CHECK(f[2] == 0.0);
    CHECK(f[1] == Approx(0.5).margin(0.05));
  }
}

TEST_CASE("a seed fixes the draws", "[tinyllm][sample]") {
  std::vector<float> logits(50);
  for (std::size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(float(i));
  const auto draw = [&](std::uint32_t seed) {
    Sampler sampler({.temperature = 1.0F, .top_k = 20, .seed = seed});
    std::vector<int> tokens;
    for (int i = 0; i < 64; ++i) tokens.push_back(sampler(logits));
    return tokens;
  };
  CHECK(draw(7) == draw(7));
  CHECK(draw(7) != draw(8));
  CHECK_THROWS_AS(Sampler()(std::vector<float>{std::nanf("")}), std::invalid_argument);
}
