// Tests of kvc/simd/reference.hpp against hand-computed values.
#include <kvc/simd/reference.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

TEST_CASE("scalar reference kernels on hand-computed inputs", "[simd][reference]") {
  const std::vector<float> a{1, 2, 3}, b{4, -5, 6};
  CHECK(kvc::simd::reference::dot(a.data(), b.data(), 3) == 12.0F);  // 4 − 10 + 18
  CHECK(kvc::simd::reference::dot(a.data(), b.data(), 0) == 0.0F);
  std::vector<float> y{1, 1, 1};
  kvc::simd::reference::axpy(2.0F, a.data(), y.data(), 3);
  CHECK(y == std::vector<float>{3, 5, 7});
  kvc::simd::reference::scale(-0.5F, y.data(), 3);
  CHECK(y == std::vector<float>{-1.5F, -2.5F, -3.5F});
  CHECK(kvc::simd::reference::max_value(b.data(), 3) == 6.0F);
  CHECK(kvc::simd::reference::max_value(b.data(), 0) == -INFINITY);
  std::vector<float> x{0.0F, std::log(2.0F), -INFINITY};
  CHECK(kvc::simd::reference::exp_shift_sum(x.data(), 3, 0.0F) == Approx(3.0F));
  CHECK(x[0] == 1.0F);
  CHECK(x[1] == Approx(2.0F));
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

TEST_CASE("scalar reference widens f16 and bf16 through Eigen", "[simd][reference]") {
  const std::vector<float> a{1.0F, 2.0F, 3.0F};
  const std::vector<Eigen::half> b_half{Eigen::half(0.5F), Eigen::half(-1.0F), Eigen::half(2.0F)};
  const std::vector<Eigen::bfloat16> b_brain{Eigen::bfloat16(0.5F), Eigen::bfloat16(-1.0F),
                                             Eigen::bfloat16(2.0F)};
  CHECK(kvc::simd::reference::dot(a.data(), b_half.data(), 3) == 4.5F);  // 0.5 − 2 + 6
  CHECK(kvc::simd::reference::dot(a.data(), b_brain.data(), 3) == 4.5F);
  std::vector<Eigen::half> narrowed(3);
  const std::vector<float> wide{1.0F / 3.0F, 65520.0F, -0.0F};
  kvc::simd::reference::convert(wide.data(), narrowed.data(), 3);
  CHECK(static_cast<float>(narrowed[0]) == static_cast<float>(Eigen::half(1.0F / 3.0F)));
  CHECK(std::isinf(static_cast<float>(narrowed[1])));  // 65520 rounds up past the f16 maximum
  CHECK(std::signbit(static_cast<float>(narrowed[2])));
}
