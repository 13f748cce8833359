// Tests of kvc/simd/reference.hpp against hand-computed values.
#include <kvc/simd/reference.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

TEST_CASE("scalar reference kernels on hand-computed inputs", "[simd][reference]") {
  const std::vector<float> a{1, 2, 3}, b{4, -5, 6};
  CHECK(kvc::simd::reference::dot(a.data(), b.data(), 3) == 12.0F);  // 4 − 10 + 18
  std::vector<float> y{1, 1, 1};
  kvc::simd::reference::axpy(2.0F, a.data(), y.data(), 3);
  CHECK(y == std::vector<float>{3, 5, 7});
  CHECK(kvc::simd::reference::max_value(b.data(), 3) == 6.0F);
  std::vector<float> x{0.0F, std::log(2.0F), -INFINITY};
  CHECK(kvc::simd::reference::exp_shift_sum(x.data(), 3, 0.0F) == Approx(3.0F));
  CHECK(x[2] == 0.0F);
  // scores[r][j] = q_r · k_j with q = [[1,0],[0,1]], k = [[2,3],[4,5]] → [[2,4],[3,5]].
  const std::vector<float> q{1, 0, 0, 1}, k{2, 3, 4, 5};
  std::vector<float> scores(4);
  kvc::simd::reference::dot_block(q.data(), 2, 2, k.data(), 2, 2, 2, scores.data(), 2);
  CHECK(scores == std::vector<float>{2, 4, 3, 5});
  std::vector<float> acc(4, 0.0F);
  const std::vector<float> p{1, 1, 0, 2};  // row 0: k0 + k1; row 1: 2·k1
  kvc::simd::reference::axpy_block(p.data(), 2, 2, k.data(), 2, 2, 2, acc.data(), 2);
  CHECK(acc == std::vector<float>{6, 8, 8, 10});
}
