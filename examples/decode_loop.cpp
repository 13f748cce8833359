// decode-loop — the quick start of README.md, verbatim (keep the two in sync): a host loop
// that appends each layer's K/V after RoPE and attends on the compressed cache.
#include <kvc/kvc.hpp>

#include <vector>

int main() {
  using Cache = kvc::KvCache<kvc::evict::H2O, kvc::quant::Dense<Eigen::half>>;
  const kvc::Geometry g{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  Cache cache(g, {.budget = kvc::Budget::tokens(256)});  // keep 256 tokens per kv head
  const kvc::SequenceId seq = cache.open_sequence();

  for (std::size_t n : {1000, 1, 1, 1}) {  // a 1000-token prompt, then three decode steps
    std::vector<float> k(g.kv_heads * n * g.head_dim, 0.5F), v = k;  // the model's K/V
    std::vector<float> q(g.q_heads * n * g.head_dim, 0.1F), out(q.size());
    for (std::size_t layer = 0; layer < g.layers; ++layer) {  // per layer, after RoPE
      cache.append(seq, layer, kvc::View<const float, 3>(k.data(), {g.kv_heads, n, g.head_dim}),
                   kvc::View<const float, 3>(v.data(), {g.kv_heads, n, g.head_dim}));
      cache.attend(seq, layer, kvc::View<const float, 3>(q.data(), {g.q_heads, n, g.head_dim}),
                   kvc::View<float, 3>(out.data(), {g.q_heads, n, g.head_dim}));
    }
  }
  fmt::print("{}\n", cache.stats());  // tokens kept, bytes held, ratio vs dense fp16
}
