// tinyllm/error.hpp — the one exception the tinyllm loaders throw.
//
// LoadError: a checkpoint file (config.json, *.safetensors, the shard index) that cannot be
// read or does not describe a valid Llama. The message names the file, the tensor or field,
// and the bad value next to the expected one, e.g.
//   "model.safetensors: tensor 'lm_head.weight' has shape [16, 32], config.json expects [16, 64]"
// Misuse of a loaded model (a token id outside the vocabulary, a logits buffer of the wrong
// size) throws std::invalid_argument instead.
#pragma once

#include <stdexcept>

namespace tinyllm {

class LoadError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace tinyllm
