// Tests of kvc/budget/uniform.hpp.
#include <kvc/budget/uniform.hpp>

#include <catch2/catch.hpp>

#include <vector>

TEST_CASE("Uniform gives every kv head the base budget", "[uniform]") {
  const kvc::budget::Uniform uniform;
  std::vector<std::size_t> budgets(8, 0);
  const std::vector<std::size_t> stored{100, 3, 7, 0, 55, 55, 1, 2};
  uniform.plan_layer(
      kvc::LayerPlan{
          {.layers = 4, .q_heads = 32, .kv_heads = 8, .head_dim = 128}, 2, 64, 100, stored},
      budgets);
  CHECK(budgets == std::vector<std::size_t>(8, 64));
}
